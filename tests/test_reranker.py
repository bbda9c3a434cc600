"""Reranker: sorted results with ids and raw scores, fixed compile shapes, devices, and parity with torch."""
import jax
import numpy as np
import pytest

from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker

CONFIG = preset("tiny")
DOCS = ["Geoffrey Hinton, Yann LeCun and Yoshua Bengio received the 2018 Turing Award.",
        "Lobster rolls are a sandwich native to New England.",
        "", "The Turing Award is given by the ACM. " * 40,
        "Paris is the capital of France."]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 11)


@pytest.fixture(scope="module")
def hf_dir(params, tmp_path_factory):
    return save_hf_checkpoint(tmp_path_factory.mktemp("rr") / "hf", CONFIG, params)


def test_rank_sorts_with_ids_and_raw_scores(params):
    rr = Reranker.from_params(CONFIG, params, batch_size=4, max_length=128)
    ids = [f"d{i}" for i in range(len(DOCS))]
    ranked = rr.rank("who won the turing award", DOCS, doc_ids=ids)
    scores = rr.score_pairs(["who won the turing award"] * len(DOCS), DOCS)
    assert [r.rank for r in ranked] == [1, 2, 3, 4, 5]
    assert sorted(r.doc_id for r in ranked) == sorted(ids)
    for r in ranked:
        assert r.score == pytest.approx(float(scores[ids.index(r.doc_id)]), abs=0)
        assert r.text == DOCS[ids.index(r.doc_id)]
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:]))
    assert [r.doc_id for r in rr.rank("who won the turing award", DOCS, doc_ids=ids, top_k=2)] == \
        [r.doc_id for r in ranked[:2]]


def test_empty_inputs_and_ties(params):
    rr = Reranker.from_params(CONFIG, params, batch_size=4, max_length=64)
    assert rr.rank("q", []) == []
    assert rr.score_pairs([], []).shape == (0,)
    ranked = rr.rank("q", ["same text", "same text", "same text"], doc_ids=["c", "a", "b"])
    assert [r.doc_id for r in ranked] == ["c", "a", "b"]  # equal scores keep input order
    assert np.isfinite(rr.score_pairs(["q"], [""])).all()


def test_bad_inputs(params):
    rr = Reranker.from_params(CONFIG, params, batch_size=2, max_length=64)
    with pytest.raises(ValueError, match="2 docs but 1 doc_ids"):
        rr.rank("q", ["a", "b"], doc_ids=["x"])
    with pytest.raises(TypeError, match="pair 1 is \\(str, NoneType\\)"):
        rr.score_pairs(["q", "q"], ["a", None])
    with pytest.raises(ValueError, match=r"input 1: token id 40000 is outside the vocabulary \[0, 32128\)"):
        rr.score_token_ids([[5, 1], [40000, 1]])
    with pytest.raises(ValueError, match="more than the longest length bucket 64"):
        rr.score_token_ids([[5] * 80 + [1]])
    with pytest.raises(ValueError, match="score_head='sigmoid': expected one of"):
        Reranker.from_params(CONFIG, params, score_head="sigmoid")


@pytest.mark.parametrize("compile_cache", [True, False], ids=["stored-programs", "jit"])
def test_fixed_shapes_compile_once_per_bucket(params, compile_cache):
    """However many lengths come in, batches take at most 3 buckets x 4 row counts shapes: one program each
    (the executable cache's per-shape programs, or the jit's traces without it), none new for repeats."""
    rr = Reranker.from_params(CONFIG, params, batch_size=8, max_length=256, length_buckets=(64, 128, 256),
                              devices=jax.devices()[:1], compile_cache=compile_cache)
    if compile_cache and rr.executable_cache is None:
        pytest.skip("the compilation cache is off (TWOLAR_COMPILE_CACHE=off): no stored programs")
    assert compile_cache or rr.executable_cache is None

    def programs() -> int:
        return len(rr._program._programs) if rr.executable_cache is not None else rr._program.fn.jitted._cache_size()

    docs = [" ".join(["word"] * n) for n in range(0, 240, 7)]
    rr.score_pairs(["q"] * len(docs), docs)
    first = programs()
    assert 3 <= first <= 3 * 4  # every bucket used; 3 buckets x row counts {1, 2, 4, 8}
    rr.score_pairs(["other query"] * len(docs), docs[::-1])  # same lengths: nothing new to compile
    assert programs() == first
    more = [" ".join(["word"] * n) for n in range(0, 240, 3)]
    rr.score_pairs(["q"] * len(more), more)
    assert first <= programs() <= 3 * 4
    if rr.executable_cache is not None:
        assert rr._program.fn.jitted._cache_size() == 0  # the stored programs replace the jit: nothing traced
        assert {shape[1] for shape in rr._program._programs} == {64, 128, 256}
    assert [rr._rows_for(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]


def test_kept_heap_is_trimmed_once_per_newly_compiled_shape(params, monkeypatch):
    """The compiler's garbage goes back after the first batch of each new shape, not after every batch."""
    from twolar_jax import host_heap

    calls = []
    monkeypatch.setattr(host_heap, "trim", lambda: calls.append(1) or True)
    rr = Reranker.from_params(CONFIG, params, batch_size=4, max_length=128, length_buckets=(64, 128),
                              devices=jax.devices()[:1])
    short, long = "a short passage", "a much longer passage " * 12
    rr.score_pairs(["q"] * 8, [short] * 4 + [long] * 4)  # shapes (4, 64) and (4, 128)
    assert len(calls) == 2
    rr.score_pairs(["another query"] * 8, [long] * 4 + [short] * 4)  # the same two shapes again
    assert len(calls) == 2
    rr.score_pairs(["q"], [short])  # a partial batch: (1, 64) is new
    assert len(calls) == 3


def test_devices_and_batch_sizes_agree(params):
    assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
    one = Reranker.from_params(CONFIG, params, batch_size=3, max_length=128, devices=jax.devices()[:1])
    eight = Reranker.from_params(CONFIG, params, batch_size=16, max_length=128)
    assert eight.batch_size == 16 and one.batch_size == 3
    np.testing.assert_allclose(one.score_pairs(["q"] * 5, DOCS), eight.score_pairs(["q"] * 5, DOCS), atol=1e-5)


def test_bfloat16_close_to_float32(params):
    f32 = Reranker.from_params(CONFIG, params, max_length=128).score_pairs(["turing award"] * 5, DOCS)
    bf16 = Reranker.from_params(CONFIG, params, max_length=128, dtype="bfloat16").score_pairs(["turing award"] * 5, DOCS)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, atol=0.15 * np.abs(f32).max() + 0.05)


@pytest.mark.parametrize("head", ["difference", "softmax", "extra_id"])
def test_reranker_parity_with_torch_heads(hf_dir, head):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rr = Reranker.from_pretrained(hf_dir, score_head=head, batch_size=4, max_length=512)
    query = "who won the turing award"
    ours = rr.score_pairs([query] * len(DOCS), DOCS)
    tok = transformers.T5Tokenizer.from_pretrained(str(hf_dir))
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    enc = tok([f"Query: {query} Document: {d} Relevant:" for d in DOCS], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc, decoder_input_ids=torch.zeros((len(DOCS), 1), dtype=torch.long)).logits[:, 0, :]
    t, f, x = 1176, 6136, 32089
    ref = {"difference": logits[:, t] - logits[:, f],
           "softmax": torch.softmax(logits[:, [t, f]], dim=-1)[:, 0],
           "extra_id": logits[:, x]}[head].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Reranker.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither an HF T5 dir"):
        Reranker.from_pretrained(tmp_path)


def test_scanned_default_scores_equal_unrolled_from_either_tree(tmp_path):
    """The Reranker scores with scanned layers by default (a fresh process loads its stored programs faster):
    from an unrolled or a scanned tree, an HF dir too, the scores equal the unrolled layers' to fp32 rounding."""
    from twolar_jax.model.scan import is_scanned, stack_layers

    params = init_params(CONFIG, 11)
    queries = ["what is the capital of france", "bm25 parameters k1 and b"] * 3
    docs = [f"passage {i} about paris, lucene and ranking functions" * (1 + i % 3) for i in range(6)]
    unrolled = Reranker.from_params(CONFIG, params, scan_layers=False, compile_cache=False)
    want = unrolled.score_pairs(queries, docs)
    assert not unrolled.config.scan_layers and not is_scanned(jax.device_get(unrolled.params))
    for tree in (params, stack_layers(params, CONFIG)):
        rr = Reranker.from_params(CONFIG, tree, compile_cache=False)
        assert rr.config.scan_layers and is_scanned(jax.device_get(rr.params))
        np.testing.assert_allclose(rr.score_pairs(queries, docs), want, rtol=1e-5, atol=1e-5)
    hf = Reranker.from_pretrained(save_hf_checkpoint(tmp_path / "hf", CONFIG, params), compile_cache=False)
    assert hf.config.scan_layers
    np.testing.assert_allclose(hf.score_pairs(queries, docs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scan_layers='yes'"):
        Reranker.from_params(CONFIG, params, scan_layers="yes")
