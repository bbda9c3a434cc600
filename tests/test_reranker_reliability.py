"""Reranker reliability: wrong argument types and options fail at once with messages naming them; hub ids
resolve from an offline HF cache; bad text names its pair; the compilation cache is on unless asked off."""
import jax
import numpy as np
import pytest

from twolar_jax import hub
from twolar_jax.errors import MissingFileError, OptionError
from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker
from twolar_jax.tokenizer import T5Tokenizer

CONFIG = preset("tiny")
DOCS = ["the turing award", "lobster rolls", "paris is in france"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CONFIG, 7))


@pytest.fixture(scope="module")
def rr(params):
    return Reranker.from_params(CONFIG, params, batch_size=4, max_length=64, compile_cache=False)


@pytest.fixture(scope="module")
def hf_home(params, tmp_path_factory):
    """An HF cache laid out as huggingface_hub writes it: models--owner--name/{refs/main, snapshots/<hash>/}."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--castorini--tiny-monot5"
    save_hf_checkpoint(repo / "snapshots" / COMMIT, CONFIG, params)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def test_reliab_rank_refuses_a_string_as_docs(rr):
    with pytest.raises(TypeError, match="docs must be a sequence of strings .*not str"):
        rr.rank("q", "hello")
    with pytest.raises(TypeError, match="doc_ids must be a sequence of strings .*not str"):
        rr.rank("q", ["a", "b"], doc_ids="xy")
    with pytest.raises(TypeError, match="query must be a str"):
        rr.rank(["q"], ["a"])
    with pytest.raises(TypeError, match="docs must be a sequence"):
        rr.score_pairs(["q"] * 5, "hello")
    with pytest.raises(TypeError, match=r"pair 1 is 'ab', expected a \(query, doc\) tuple"):
        rr.score_pairs([("q", "d"), "ab"])


@pytest.mark.parametrize("top_k", [-1, 0, 1.5, True, "2"])
def test_reliab_rank_rejects_bad_top_k(rr, top_k):
    with pytest.raises(OptionError, match=r"top_k="):
        rr.rank("q", DOCS, top_k=top_k)


def test_reliab_rank_top_k_larger_than_docs_keeps_all(rr):
    assert len(rr.rank("q", DOCS, top_k=10)) == 3
    assert [r.rank for r in rr.rank("q", DOCS, top_k=2)] == [1, 2]


def test_reliab_lone_surrogate_names_the_pair(rr):
    for queries, docs, where in ((["q", "q"], ["fine", "bad \ud800 text"], "pair 1: document 'bad .*character 4"),
                                 (["q", "bad \udfff"], ["a", "b"], "pair 1: query 'bad .*character 4"),
                                 (["q\ud800"], ["a"], "pair 0: query .*character 1")):
        with pytest.raises(OptionError, match=f"{where} .*lone surrogate") as info:
            rr.score_pairs(queries, docs)
        assert "\n" not in str(info.value)
    with pytest.raises(OptionError, match="pair 2: document 'abc.*character 3 .*lone surrogate"):
        rr.rank("q", ["a", "b", "abc\ud800"])
    with pytest.raises(OptionError, match="character 1 .*lone surrogate"):
        T5Tokenizer().encode("x\ud800")
    with pytest.raises(OptionError, match="text 1: character 0"):
        T5Tokenizer().encode_batch(["ok", "\ud800"])


def test_reliab_from_pretrained_checks_options_before_loading(tmp_path, monkeypatch):
    import twolar_jax.hf_conversion as hf

    def no_load(*a, **k):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(hf, "load_hf_checkpoint", no_load)
    (tmp_path / "config.json").write_text("{}")
    for kwargs, match in [({"truncation": "bogus"}, "truncation='bogus'"), ({"dtype": "fp8"}, "dtype='fp8'"),
                          ({"score_head": "sigmoid"}, "score_head='sigmoid'"), ({"batch_size": 0}, "batch_size=0"),
                          ({"max_length": 2}, "max_length=2"), ({"mesh_shape": (3, 1, 1)}, "mesh_shape="),
                          ({"logical_axis_rules": [("heads", "tensor")]}, "logical_axis_rules"),
                          ({"compile_cache": "yes"}, "compile_cache="), ({"prefetch": 0}, "prefetch=0"),
                          ({"length_buckets": (64,), "max_length": 128}, "must reach max_length=128")]:
        with pytest.raises(OptionError, match=match):
            Reranker.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(TypeError, match="batchsize"):
        Reranker.from_pretrained(tmp_path, batchsize=8)


def test_reliab_from_pretrained_hub_id_from_offline_cache(hf_home, params, rr, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_checkpoint("castorini/tiny-monot5") == hf_home / "hub" / "models--castorini--tiny-monot5" / \
        "snapshots" / COMMIT
    loaded = Reranker.from_pretrained("castorini/tiny-monot5", batch_size=4, max_length=64, compile_cache=False)
    np.testing.assert_array_equal(loaded.score_pairs(["turing"] * 3, DOCS), rr.score_pairs(["turing"] * 3, DOCS))
    assert hub.resolve_checkpoint("castorini/tiny-monot5", revision=COMMIT).name == COMMIT


def test_reliab_from_pretrained_missing_hub_id_says_where_it_looked(hf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingFileError) as info:
        Reranker.from_pretrained("castorini/monot5-base-msmarco", compile_cache=False)
    msg = str(info.value)
    assert "castorini/monot5-base-msmarco" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    assert str(hf_home / "hub" / "models--castorini--monot5-base-msmarco") in msg
    with pytest.raises(MissingFileError, match="castorini/tiny-monot5.*revision v2"):
        hub.resolve_checkpoint("castorini/tiny-monot5", revision="v2")
    with pytest.raises(MissingFileError, match="no such checkpoint directory"):
        Reranker.from_pretrained(str(tmp_path / "not" / "here"))  # a path, not a hub id: not looked up
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.hf_cache_dir() == tmp_path / "elsewhere"


def test_reliab_local_directory_wins_over_hub_lookup(hf_home, monkeypatch):
    monkeypatch.chdir(hf_home / "hub" / "models--castorini--tiny-monot5" / "snapshots")
    monkeypatch.setenv("HF_HOME", str(hf_home / "nothing"))
    assert hub.resolve_checkpoint(COMMIT).name == COMMIT  # a relative directory that exists


def test_reliab_compile_cache_on_by_default_and_off_on_request(params, tmp_path, monkeypatch):
    previous = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("TWOLAR_COMPILE_CACHE", str(tmp_path / "jax_cache"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        Reranker.from_params(CONFIG, params, max_length=64, compile_cache=False)
        assert jax.config.jax_compilation_cache_dir is None
        Reranker.from_params(CONFIG, params, max_length=64)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
