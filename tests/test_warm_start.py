"""Warm starts: the Reranker keeps its compiled scoring programs beside the compilation cache, and a fresh
process loads them instead of tracing and lowering the model again (twolar_jax/executable_cache.py).

The processes run as a user's would: a plain `python` with this session's environment (8 simulated CPU
devices, tests/conftest.py) and the cache folder named by TWOLAR_COMPILE_CACHE."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from twolar_jax import executable_cache
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker

CONFIG = preset("tiny")
QUERY = "who won the turing award"
DOCS = ["Geoffrey Hinton, Yann LeCun and Yoshua Bengio received the 2018 Turing Award.",
        "Lobster rolls are a sandwich native to New England.", "", "The Turing Award is given by the ACM. " * 4,
        "Paris is the capital of France.", "Alan Turing", "award ceremony in San Francisco",
        "turing machines and the halting problem", "The prize money is one million dollars.", "ACM", "award",
        "Yoshua Bengio", "a list of computer science prizes and their winners", "Turing test", "Hinton", "LeCun"]
OPTIONS = dict(batch_size=8, max_length=64)
WORKER = f"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker
rr = Reranker.from_params(preset("tiny"), init_params(preset("tiny"), 3), **{OPTIONS!r})
ranked = rr.rank({QUERY!r}, {DOCS!r})
cache = rr.executable_cache
print(json.dumps({{"scores": {{r.doc_id: r.score for r in ranked}},
                  "stats": cache.stats.as_dict() if cache is not None else None}}))
"""


def _run(tmp_path, cache_value: str, **env) -> tuple[dict, str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TWOLAR_COMPILE_CACHE": cache_value, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _scores(result: dict) -> np.ndarray:
    return np.array([result["scores"][str(i)] for i in range(len(DOCS))], np.float32)


@pytest.fixture(scope="module")
def reference_scores():
    """Today's path: the jit, no caches."""
    rr = Reranker.from_params(CONFIG, init_params(CONFIG, 3), compile_cache=False, **OPTIONS)
    return rr.score_pairs([QUERY] * len(DOCS), DOCS)


def _entries(cache_dir):
    folder = cache_dir / executable_cache.SUBDIR
    return sorted(folder.glob(f"*{executable_cache.SUFFIX}")) if folder.exists() else []


def test_warm_start_loads_stored_programs_and_a_corrupt_entry_is_rewritten(tmp_path, reference_scores):
    cache = tmp_path / "cache"
    cold, _ = _run(tmp_path, str(cache))
    assert cold["stats"]["misses"] >= 1 and cold["stats"]["disk_hits"] == 0
    assert cold["stats"]["writes"] == cold["stats"]["misses"]
    entries = _entries(cache)
    assert len(entries) == cold["stats"]["writes"] >= 2  # two batch shapes
    assert not list((cache / executable_cache.SUBDIR).glob("*.tmp"))  # written whole, then renamed

    warm, _ = _run(tmp_path, str(cache))
    assert warm["stats"]["disk_hits"] == cold["stats"]["misses"]  # every program loaded, none compiled
    assert warm["stats"]["misses"] == 0 and warm["stats"]["writes"] == 0 and warm["stats"]["rejected"] == 0
    np.testing.assert_array_equal(_scores(warm), _scores(cold))
    np.testing.assert_array_equal(_scores(warm), reference_scores)

    # One entry cut short, one written for another jax: both refused with a warning, compiled and rewritten.
    truncated, foreign = entries[0], entries[-1]
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    data = foreign.read_bytes()
    foreign.write_bytes(data.replace(f'"jax":"{jax.__version__}"'.encode(), b'"jax":"0.0.1"', 1))
    assert foreign.read_bytes() != data
    damaged = 2
    repaired, stderr = _run(tmp_path, str(cache))
    assert stderr.count("is unusable") == damaged, stderr
    assert repaired["stats"]["rejected"] == damaged and repaired["stats"]["misses"] == damaged
    assert repaired["stats"]["writes"] == damaged
    np.testing.assert_array_equal(_scores(repaired), reference_scores)
    assert _entries(cache) == entries and truncated.read_bytes()[:len(executable_cache.MAGIC)] == executable_cache.MAGIC

    again, stderr = _run(tmp_path, str(cache))
    assert "is unusable" not in stderr
    assert again["stats"]["disk_hits"] == len(entries) and again["stats"]["misses"] == 0
    np.testing.assert_array_equal(_scores(again), reference_scores)


def test_cache_off_writes_nothing(tmp_path, reference_scores):
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    xdg.mkdir()
    result, _ = _run(tmp_path, "off", HOME=str(home), XDG_CACHE_HOME=str(xdg))
    assert result["stats"] is None
    assert not any(home.rglob("*")) and not any(xdg.rglob("*"))
    np.testing.assert_array_equal(_scores(result), reference_scores)

    # compile_cache=False in a process whose compilation cache is on: no executable cache either.
    folder = executable_cache.for_compilation_cache(jax.config.jax_compilation_cache_dir)
    before = sorted(folder.directory.glob("*")) if folder is not None and folder.directory.exists() else []
    rr = Reranker.from_params(CONFIG, init_params(CONFIG, 3), compile_cache=False, **OPTIONS)
    assert rr.executable_cache is None
    rr.score_pairs([QUERY + " again"] * 3, DOCS[:3])
    after = sorted(folder.directory.glob("*")) if folder is not None and folder.directory.exists() else []
    assert after == before


@pytest.mark.parametrize("mesh_shape,devices", [((1, 8, 1), None), ((1, 2, 4), None), ((-1, 1, 1), slice(4, 8))])
def test_sharded_meshes_load_their_own_programs_and_score_alike(tmp_path, monkeypatch, mesh_shape, devices):
    """fsdp, tensor-parallel and a subset of devices: stored, loaded back (not from memory) and equal to the jit."""
    params = jax.tree.map(np.asarray, init_params(CONFIG, 3))
    picked = jax.devices()[devices] if devices else None
    kw = dict(OPTIONS, mesh_shape=mesh_shape, devices=picked)
    want = Reranker.from_params(CONFIG, params, compile_cache=False, **kw).score_pairs([QUERY] * len(DOCS), DOCS)

    directory = tmp_path / "jax_cache"
    cache = executable_cache.ExecutableCache(directory / executable_cache.SUBDIR)
    monkeypatch.setattr(executable_cache, "for_compilation_cache", lambda _dir: cache)
    first = Reranker.from_params(CONFIG, params, **kw)
    np.testing.assert_array_equal(first.score_pairs([QUERY] * len(DOCS), DOCS), want)
    assert cache.stats.writes == cache.stats.misses >= 1
    cache._loaded.clear()  # as in a fresh process: read every program back from its file
    second = Reranker.from_params(CONFIG, params, **kw)
    np.testing.assert_array_equal(second.score_pairs([QUERY] * len(DOCS), DOCS), want)
    assert cache.stats.disk_hits == cache.stats.misses and cache.stats.rejected == 0
