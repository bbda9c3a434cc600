"""Hub ids download through huggingface_hub from a loopback server that speaks the hub's API (no network):
only the files a T5 reranker reads are fetched, torch-only repos fall back to pytorch_model.bin, the
download lands in the HF cache and then serves offline, and a missing repo is one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.fake_hub_server import FakeHub
from tests.hub_download_worker import DOCS, QUERIES
from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker

CONFIG = preset("tiny")
WORKER = Path(__file__).with_name("hub_download_worker.py")
JUNK = {"flax_model.msgpack": b"\0" * 4096, "tf_model.h5": b"\0" * 4096, "README.md": b"# tiny"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A safetensors checkpoint (as save_hf_checkpoint writes it) and a copy holding pytorch_model.bin instead."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    params = jax.tree.map(np.asarray, init_params(CONFIG, 11))
    root = tmp_path_factory.mktemp("repos")
    safe = save_hf_checkpoint(root / "safe", CONFIG, params)
    torch_only = root / "torch_only"
    torch_only.mkdir()
    for name in ("config.json", "spiece.model"):
        (torch_only / name).write_bytes((safe / name).read_bytes())
    tensors = {k: torch.from_numpy(v.copy()) for k, v in load_file(safe / "model.safetensors").items()}
    torch.save(tensors, torch_only / "pytorch_model.bin")
    return safe, torch_only, params


def _run(hub: FakeHub, home: Path, repos: list[str], *, offline: bool) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(WORKER), *repos], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["repo"]: row for row in rows}


def test_hub_download_fetches_only_reranker_files_then_serves_offline(checkpoints, tmp_path):
    safe, torch_only, params = checkpoints
    want = Reranker.from_params(CONFIG, params, batch_size=4, max_length=64, compile_cache=False).score_pairs(QUERIES, DOCS)
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        sha = hub.add_repo("castorini/tiny-monot5", safe,
                           extra_files={**JUNK, "pytorch_model.bin": (torch_only / "pytorch_model.bin").read_bytes()})
        hub.add_repo("castorini/tiny-monot5-torch", torch_only, extra_files=JUNK)
        got = _run(hub, home, ["castorini/tiny-monot5", "castorini/tiny-monot5-torch", "castorini/no-such-model"],
                   offline=False)
        fetched = hub.fetched()
        hub.requests.clear()
        again = _run(hub, home, ["castorini/tiny-monot5"], offline=True)
        assert hub.requests == [], "an offline run must not touch the network"
    np.testing.assert_allclose(got["castorini/tiny-monot5"]["scores"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["castorini/tiny-monot5-torch"]["scores"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(again["castorini/tiny-monot5"]["scores"], want, rtol=1e-6, atol=1e-6)
    # The safetensors repo gave its three files, the torch-only one its .bin; no Flax/TF weights, no README.
    assert fetched == {"castorini/tiny-monot5/config.json", "castorini/tiny-monot5/spiece.model",
                       "castorini/tiny-monot5/model.safetensors", "castorini/tiny-monot5-torch/config.json",
                       "castorini/tiny-monot5-torch/spiece.model", "castorini/tiny-monot5-torch/pytorch_model.bin"}, fetched
    snapshot = home / "hub" / "models--castorini--tiny-monot5" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "spiece.model"]
    missing = got["castorini/no-such-model"]
    assert missing["error"] == "MissingFileError", missing
    assert "castorini/no-such-model" in missing["message"] and "did not provide it" in missing["message"]
    assert "\n" not in missing["message"]
