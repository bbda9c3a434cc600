"""The streaming scorer: a bounded tokenizer thread ahead of the device, results fetched behind dispatch,
the same scores as the old synchronous loop, producer errors in the caller and no thread left behind."""
import threading
import time

import jax
import numpy as np
import pytest

from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.prefetch import BackgroundIterator
from twolar_jax.reranker import Reranker
from twolar_jax.scoring_runtime import plan_batches

CONFIG = preset("tiny")
WORDS = "turing award machine learning lobster paris france neural network prize acm".split()
DOCS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i * 5 % 90)) for i in range(37)]
QUERIES = [f"query {i % 3} turing" for i in range(len(DOCS))]


@pytest.fixture(scope="module")
def rr():
    params = jax.tree.map(np.asarray, init_params(CONFIG, 3))
    return Reranker.from_params(CONFIG, params, batch_size=8, max_length=128, length_buckets=(64, 128),
                                compile_cache=False)


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("twolar-")}


def _score_blocking(rr, tokens):
    out = rr._program(jax.device_put(tokens, rr._batch_sharding))  # the jit (no executable cache), no stream
    return np.asarray(out)


def synchronous_scores(rr, queries, docs):
    """The same plan scored without the stream: one blocking batch after another."""
    encoded = rr.encode_pairs(queries, docs)
    scores = np.zeros(len(encoded), np.float32)
    lengths = [len(ids) for ids in encoded]
    for chunk in plan_batches(lengths, buckets=rr.length_buckets, batch_size=rr.batch_size,
                              parallelism=rr.parallelism):
        bucket_len = rr.length_buckets[np.searchsorted(rr.length_buckets, max(lengths[i] for i in chunk))]
        tokens = np.zeros((rr._rows_for(len(chunk)), bucket_len), np.int32)
        for row, idx in enumerate(chunk):
            tokens[row, :lengths[idx]] = encoded[idx]
        scores[chunk] = _score_blocking(rr, tokens)[:len(chunk)]
    return scores


def test_scores_do_not_depend_on_the_batch_a_pair_lands_in(rr):
    """Each pair alone, at its own bucket, against the planned batches (which pad it to its batch's bucket):
    the same to fp32 rounding, in any input order."""
    encoded = rr.encode_pairs(QUERIES, DOCS)
    alone = []
    for ids in encoded:
        tokens = np.zeros((rr._rows_for(1), rr.length_buckets[np.searchsorted(rr.length_buckets, len(ids))]), np.int32)
        tokens[0, :len(ids)] = ids
        alone.append(_score_blocking(rr, tokens)[0])
    np.testing.assert_allclose(rr.score_pairs(QUERIES, DOCS), np.array(alone), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rr.score_pairs(QUERIES[::-1], DOCS[::-1]), np.array(alone[::-1]), rtol=1e-5, atol=1e-6)


def test_stream_scores_equal_the_synchronous_loop(rr):
    before = _threads()
    lengths = {len(ids) for ids in rr.encode_pairs(QUERIES, DOCS)}
    assert min(lengths) <= 64 < max(lengths)  # both buckets, full and partial batches
    np.testing.assert_array_equal(rr.score_pairs(QUERIES, DOCS), synchronous_scores(rr, QUERIES, DOCS))
    assert _threads() == before


def test_stream_groups_equal_per_group_calls_and_pairs_form(rr):
    cuts = [0, 5, 5, 19, 37]  # includes an empty group
    groups = [list(zip(QUERIES[a:b], DOCS[a:b])) for a, b in zip(cuts, cuts[1:])]
    streamed = list(rr.score_groups(iter(groups)))
    assert [len(s) for s in streamed] == [5, 0, 14, 18]
    for group, got in zip(groups, streamed):
        np.testing.assert_array_equal(got, rr.score_pairs(group))  # list-of-pairs form of score_pairs
        if group:
            np.testing.assert_array_equal(got, rr.score_pairs([q for q, _ in group], [d for _, d in group]))


def test_stream_producer_errors_surface_in_the_caller_without_leftover_threads(rr):
    before = _threads()

    def groups():
        yield list(zip(QUERIES[:4], DOCS[:4]))
        raise RuntimeError("corpus reader failed")

    it = rr.score_groups(groups())
    assert len(next(it)) == 4
    with pytest.raises(RuntimeError, match="corpus reader failed"):
        next(it)
    with pytest.raises(TypeError, match="group 1: score_pairs: pair 0 is \\(str, int\\)"):
        list(rr.score_groups([[("q", "d")], [("q", 3)]]))
    assert _threads() == before


def test_stream_closed_early_stops_its_thread(rr):
    before = _threads()
    many = ([(QUERIES[i], DOCS[i]) for i in range(k, k + 4)] for k in range(0, 400, 4) if k + 4 <= len(DOCS))
    it = rr.score_groups(many)
    next(it)
    assert len(_threads() - before) == 1  # the tokenizer thread runs ahead
    it.close()
    assert _threads() == before


def test_stream_show_progress_counts_pairs(rr, capsys):
    rr.score_pairs(QUERIES[:10], DOCS[:10], show_progress=True)
    assert "10pair" in capsys.readouterr().err.replace(" ", "")
    assert len(rr.rank("q", DOCS[:3], show_progress=True)) == 3


# ------------------------------------------------------------------------------- BackgroundIterator
def test_prefetch_is_bounded_and_keeps_order():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    with BackgroundIterator(source(), size=3) as it:
        assert next(it) == 0
        time.sleep(0.2)
        assert len(produced) <= 1 + 3 + 1  # taken + queued + one blocked in put
        assert list(it) == list(range(1, 100))


def test_prefetch_reraises_the_producer_error_and_joins():
    def source():
        yield 1
        raise KeyError("boom")

    it = BackgroundIterator(source(), size=2)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)
    assert not it.alive
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_close_unblocks_a_full_queue():
    it = BackgroundIterator(iter(range(10 ** 9)), size=1)
    time.sleep(0.05)
    it.close()
    assert not it.alive
    with pytest.raises(ValueError, match="prefetch size"):
        BackgroundIterator([], size=0)
