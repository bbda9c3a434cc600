"""The listwise reranker (twolar_jax/listwise_reranker.py): its sliding windows equal windows applied by hand
from FiDRanker.scores, one pass of window 100 is a sort by scores, generate always returns a permutation,
batching windows across queries changes nothing, sharded programs equal the replicated one, bad options
are one-line OptionErrors. The tiny preset with random weights; tests/conftest.py gives 8 CPU devices."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from twolar_jax.errors import OptionError
from twolar_jax.listwise_reranker import ListwiseReranker
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.ranking import listwise_inputs as li
from twolar_jax.ranking.listwise import FiDRanker
from twolar_jax.tokenizer import T5Tokenizer

LENGTH = 32
QUERY = "who won the turing award"
WORDS = "the of turing award lobster roll network deep passage query relevant model prize bread 2018".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(4, 20)))) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny")
    return config, init_params(config, 0)


@pytest.fixture(scope="module")
def first20(tiny):
    config, params = tiny
    return ListwiseReranker(config, params, window=20, stride=10, passage_length=LENGTH, batch_size=4,
                            devices=jax.devices()[:1])


def _hand_scores(config, params, query, passages, window):
    tokens, mask = li.encode_window(T5Tokenizer(), query, passages, window=window, passage_length=LENGTH)
    scores = FiDRanker(config, window=window).scores(params, {"encoder_input_tokens": tokens[None],
                                                              "passage_mask": mask[None]})
    return np.asarray(scores)[0, : len(passages)]


def test_listwise_reranker_top30_equals_two_windows_by_hand(tiny, first20):
    config, params = tiny
    docs = _docs(30)
    order = list(range(30))
    for start, end in [(10, 30), (0, 20)]:  # back to front
        scores = _hand_scores(config, params, QUERY, [docs[i] for i in order[start:end]], 20)
        order = li.apply_window(order, start, end, list(np.argsort(-scores, kind="stable")))
    ranked = first20.rank(QUERY, docs, doc_ids=[f"d{i}" for i in range(30)])
    assert [r.doc_id for r in ranked] == [f"d{i}" for i in order]
    assert [r.rank for r in ranked] == list(range(1, 31))
    assert all(a.score > b.score for a, b in zip(ranked, ranked[1:]))  # the score: 1 / rank
    assert ranked[0].score == 1.0 and ranked[0].text == docs[order[0]]
    assert [r.doc_id for r in first20.rank(QUERY, docs, doc_ids=[f"d{i}" for i in range(30)], top_k=5)] == \
        [f"d{i}" for i in order[:5]]


def test_listwise_reranker_window_100_is_one_sort_by_scores(tiny):
    config, params = tiny
    docs = _docs(100, seed=1)
    rr = ListwiseReranker(config, params, window=100, stride=10, passage_length=LENGTH, batch_size=1,
                          devices=jax.devices()[:1])
    scores = _hand_scores(config, params, QUERY, docs, 100)
    want = np.argsort(-scores, kind="stable")
    assert [int(r.doc_id) for r in rr.rank(QUERY, docs)] == [int(i) for i in want]


def test_listwise_reranker_generate_returns_a_permutation(tiny):
    config, params = tiny
    rr = ListwiseReranker(config, params, method="generate", window=20, stride=10, passage_length=LENGTH,
                          batch_size=2, devices=jax.devices()[:1])
    assert rr.max_decode_length == 80
    for n in (30, 7):
        ranked = rr.rank(QUERY, _docs(n, seed=n))
        assert sorted(int(r.doc_id) for r in ranked) == list(range(n))
        assert [r.rank for r in ranked] == list(range(1, n + 1))


def test_listwise_reranker_batching_across_queries_changes_nothing(first20):
    batch = [(QUERY, _docs(30, 2)), ("what is a lobster roll", _docs(7, 3), [f"x{i}" for i in range(7)]),
             ("deep networks", _docs(25, 4)), ("empty", [])]
    together = first20.rank_many(batch)
    alone = [first20.rank(*item) for item in batch]
    assert [[(r.doc_id, r.rank) for r in q] for q in together] == [[(r.doc_id, r.rank) for r in q] for q in alone]
    assert together[3] == []


def test_listwise_reranker_sharded_scores_equal_replicated(tiny, first20):
    config, params = tiny
    windows = [_docs(20, 5), _docs(13, 6), _docs(20, 7)]
    queries = [QUERY, "lobster", "deep networks"]
    tokens, mask = first20._encode_batch(queries, windows)
    want = np.asarray(first20._program(first20.params, tokens, mask))
    for mesh in [(1, 2, 4), (2, 4, 1)]:
        rr = ListwiseReranker(config, params, passage_length=LENGTH, batch_size=4, mesh_shape=mesh)
        assert rr.parallelism in (2, 8) and rr.describe()["devices"] == 8
        got = np.asarray(rr._program(rr.params, *rr._encode_batch(queries, windows)))
        np.testing.assert_allclose(got[:3], want[:3], atol=1e-5, rtol=1e-5)
        assert rr.reorder_windows(queries, windows) == first20.reorder_windows(queries, windows)


@pytest.mark.parametrize("options,match", [
    (dict(method="beam"), "method="), (dict(window=0), "window="), (dict(window=20, stride=21), "stride="),
    (dict(passage_length=1), "passage_length="), (dict(dtype="float16"), "dtype="),
    (dict(batch_size=0), "batch_size="), (dict(mesh_shape=(3, 1, 1)), "mesh_shape=")])
def test_listwise_reranker_bad_options_are_one_line_option_errors(tiny, tmp_path, options, match):
    config, params = tiny
    with pytest.raises(OptionError, match=match) as err:
        ListwiseReranker(config, params, **options)
    assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match=match):  # before any weights are looked for
        ListwiseReranker.from_pretrained(tmp_path / "missing", **options)
