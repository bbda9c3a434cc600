"""eval.rerank through the Reranker's one-stream `score_groups`: the same scores as per-group calls, and
the resume log still gets each group's queries as soon as they are scored (a crash keeps them)."""
import jax
import numpy as np
import pytest

from eval import rerank as rerank_mod
from retrieval.readers import RankCandidate, RankRequest
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker

WORDS = "turing award lobster paris france neural network prize acm machine".split()
REQUESTS = [RankRequest(f"q{i}", f"query {i} {WORDS[i % 10]}",
                        [RankCandidate(f"d{i}_{j}", 0.0, " ".join(WORDS[(i + j + k) % 10] for k in range(3 + 7 * j)))
                         for j in range(4 + i % 3)]) for i in range(7)]


@pytest.fixture(scope="module")
def rr():
    params = jax.tree.map(np.asarray, init_params(preset("tiny"), 2))
    return Reranker.from_params(preset("tiny"), params, batch_size=8, max_length=64, compile_cache=False)


class CountingReranker:
    """Delegates to a Reranker, counts stream calls, and can fail after some groups."""

    def __init__(self, rr, fail_after_groups=None):
        self.rr, self.fail_after_groups, self.streams, self.groups = rr, fail_after_groups, 0, 0

    def score_pairs(self, queries, docs):
        raise AssertionError("rerank should stream through score_groups")

    def score_groups(self, groups):
        self.streams += 1
        for scores in self.rr.score_groups(groups):
            if self.fail_after_groups is not None and self.groups >= self.fail_after_groups:
                raise KeyboardInterrupt("simulated crash")
            self.groups += 1
            yield scores


def test_rerank_streams_groups_with_per_group_scores(rr):
    scorer = CountingReranker(rr)
    run = rerank_mod.rerank(scorer, REQUESTS, top_k=5, pairs_per_call=10)
    assert scorer.streams == 1 and scorer.groups == len(rerank_mod._groups(REQUESTS, 10)) > 2
    for r in REQUESTS:
        cands = r.candidates[:5]
        want = rr.score_pairs([r.query] * len(cands), [c.text for c in cands])
        got = np.array([run[r.qid][c.docid] for c in cands], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rerank_stream_resume_log_keeps_finished_groups(rr, tmp_path):
    log = tmp_path / "scores.jsonl"
    groups = rerank_mod._groups(REQUESTS, 10)
    with pytest.raises(KeyboardInterrupt):
        rerank_mod.rerank(CountingReranker(rr, fail_after_groups=2), REQUESTS, pairs_per_call=10, scores_path=log)
    logged = len(log.read_text().splitlines())
    assert logged == len(groups[0]) + len(groups[1])
    resumed = CountingReranker(rr)
    run = rerank_mod.rerank(resumed, REQUESTS, pairs_per_call=10, scores_path=log)
    assert resumed.groups == len(rerank_mod._groups(REQUESTS[logged:], 10))
    assert list(run) == [r.qid for r in REQUESTS] and len(log.read_text().splitlines()) == len(REQUESTS)
    fresh = rerank_mod.rerank(rr, REQUESTS, pairs_per_call=10)
    assert set(run) == set(fresh)
    for qid in run:
        assert run[qid] == pytest.approx(fresh[qid], abs=1e-5)


def test_rerank_groups_pack_like_before():
    sizes = [len(g) for g in rerank_mod._groups(REQUESTS, 10)]
    assert sum(sizes) == len(REQUESTS)
    assert [sum(len(r.candidates) for r in g) for g in rerank_mod._groups(REQUESTS, 10)] == [9, 10, 5, 10]
    assert [len(g) for g in rerank_mod._groups(REQUESTS, 1)] == [1] * 7  # a big request goes alone
