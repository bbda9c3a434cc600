"""Rerank first-stage candidates with any object that has `score_pairs(queries, docs) -> float[N]`.

That is `twolar_jax.reranker.Reranker`, which batches pairs over its device mesh; the evaluation never
touches the model otherwise. Pairs of many queries go in one group (`pairs_per_call`) so device batches
stay full, and a scorer with `score_groups` (the Reranker) scores all groups in one stream, tokenizing
the next groups while the device works. With `scores_path`, each group's per-query scores are appended
to a JSONL log as soon as they are known (twolar_jax.durable_io: flushed and fsynced, a torn last line
cut) and a restarted job skips the queries already there.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np

from retrieval.readers import RankRequest
from retrieval.runs import Run
from twolar_jax.durable_io import AppendOnlyJsonl, read_jsonl, repair_tail
from twolar_jax.errors import OptionError
from twolar_jax.progress import progress_bar


class PairScorer(Protocol):
    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray: ...


def _load_done(scores_path: Path, wanted: dict[str, RankRequest]) -> Run:
    """Queries already scored by an earlier, interrupted run (a torn last line is cut first)."""
    repair_tail(scores_path)
    return logged_scores(scores_path, wanted)


def logged_scores(scores_path: Path, wanted: dict[str, RankRequest]) -> Run:
    """The scores a log holds for the wanted queries (each with exactly its candidates), read only: a pod's
    process 0 reads every host's finished log this way (eval.multihost)."""
    done: Run = {}
    for _, obj in read_jsonl(scores_path):
        qid, scores = obj.get("qid"), obj.get("scores")
        req = wanted.get(qid)
        if req is not None and isinstance(scores, dict) and set(scores) == {c.docid for c in req.candidates}:
            done[qid] = {d: float(v) for d, v in scores.items()}
    return done


def _groups(pending: Sequence[RankRequest], pairs_per_call: int) -> list[list[RankRequest]]:
    """Consecutive requests packed up to pairs_per_call pairs (a bigger request goes alone)."""
    groups: list[list[RankRequest]] = []
    size = 0
    for r in pending:
        if groups and size + len(r.candidates) <= pairs_per_call:
            groups[-1].append(r)
            size += len(r.candidates)
        else:
            groups.append([r])
            size = len(r.candidates)
    return groups


def _score_groups(scorer: PairScorer, groups: Sequence[Sequence[RankRequest]]) -> Iterator[np.ndarray]:
    """Scores per group: one streaming call when the scorer has `score_groups` (the Reranker: the next
    groups are tokenized while the device scores this one), a listwise scorer's `score_requests` (each query
    ranked whole: eval.listwise), else one `score_pairs` call per group."""
    if hasattr(scorer, "score_requests"):
        yield from scorer.score_requests(groups)
        return
    if hasattr(scorer, "score_groups"):
        pairs = ([(r.query, c.text) for r in group for c in r.candidates] for group in groups)
        yield from scorer.score_groups(pairs)
        return
    for group in groups:
        yield scorer.score_pairs([r.query for r in group for _ in r.candidates],
                                 [c.text for r in group for c in r.candidates])


def _checked_scores(scores: Any, n: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"scorer returned {scores.shape[0]} scores for {n} pairs")
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError("scorer returned non-finite scores")
    return scores


def rerank(
    scorer: PairScorer,
    requests: Sequence[RankRequest],
    *,
    top_k: int = 100,
    pairs_per_call: int = 1024,
    scores_path: str | os.PathLike | None = None,
    desc: str = "rerank",
) -> Run:
    """Scores of the top_k candidates of every request; candidates below top_k are dropped."""
    if not isinstance(top_k, int) or top_k <= 0:
        raise OptionError(f"top_k must be a positive integer, got {top_k!r}")
    todo = [RankRequest(r.qid, r.query, r.candidates[:top_k]) for r in requests]
    by_qid = {r.qid: r for r in todo}
    if len(by_qid) != len(todo):
        raise ValueError("duplicate query ids in the rerank requests")
    run: Run = {}
    sink: Optional[AppendOnlyJsonl] = None
    if scores_path is not None:
        scores_path = Path(scores_path)
        run.update(_load_done(scores_path, by_qid))
        sink = AppendOnlyJsonl(scores_path, fsync_interval_s=1.0)
    pending = [r for r in todo if r.qid not in run and r.candidates]
    for r in todo:
        if not r.candidates:
            run[r.qid] = {}
    try:
        groups = _groups(pending, pairs_per_call)
        total = sum(len(r.candidates) for r in pending)
        with progress_bar(total=total, desc=desc, unit="pair", disable=total == 0) as bar, \
                contextlib.closing(_score_groups(scorer, groups)) as scored:
            for group, scores in zip(groups, scored, strict=True):
                scores = _checked_scores(scores, sum(len(r.candidates) for r in group))
                offset = 0
                for r in group:
                    m = len(r.candidates)
                    run[r.qid] = {c.docid: float(s) for c, s in zip(r.candidates, scores[offset:offset + m])}
                    offset += m
                    if sink is not None:
                        sink.append({"qid": r.qid, "scores": run[r.qid]})
                bar.update(offset)
    finally:
        if sink is not None:
            sink.close()
    return {r.qid: run[r.qid] for r in todo}
