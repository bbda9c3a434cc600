"""Rerank first-stage candidates with any object that has `score_pairs(queries, docs) -> float32[N]`.

That is `twolar_jax.reranker.Reranker` (contract 4), which batches pairs over all local devices; the
evaluation never touches the model otherwise. Pairs of many queries go in one call so device batches
stay full. With `scores_path`, per-query scores are appended to a JSONL file (flushed and fsynced)
and a restarted job skips the queries already there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from eval.readers import RankRequest, Run


class PairScorer(Protocol):
    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray: ...


def _load_done(scores_path: Path, wanted: dict[str, RankRequest]) -> Run:
    """Queries already scored by an earlier, interrupted run; a torn last line is dropped."""
    done: Run = {}
    if not scores_path.is_file():
        return done
    lines = scores_path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                break  # the process died mid-write
            raise ValueError(f"{scores_path}:{lineno}: invalid JSON in the scores file") from None
        qid, scores = obj["qid"], obj["scores"]
        req = wanted.get(qid)
        if req is not None and set(scores) == {c.docid for c in req.candidates}:
            done[qid] = {d: float(s) for d, s in scores.items()}
    # Rewrite without the torn line so appends start on a fresh line.
    tmp = scores_path.with_name(scores_path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"qid": q, "scores": s}) + "\n" for q, s in done.items()))
    os.replace(tmp, scores_path)
    return done


def rerank(
    scorer: PairScorer,
    requests: Sequence[RankRequest],
    *,
    top_k: int = 100,
    pairs_per_call: int = 1024,
    scores_path: str | os.PathLike | None = None,
    desc: str = "rerank",
) -> Run:
    """Scores of the top_k candidates of every request (fp32); candidates below top_k are dropped."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    todo = [RankRequest(r.qid, r.query, r.candidates[:top_k]) for r in requests]
    by_qid = {r.qid: r for r in todo}
    if len(by_qid) != len(todo):
        raise ValueError("duplicate query ids in the rerank requests")
    run: Run = {}
    sink = None
    if scores_path is not None:
        scores_path = Path(scores_path)
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        run.update(_load_done(scores_path, by_qid))
        sink = scores_path.open("a", encoding="utf-8")
    pending = [r for r in todo if r.qid not in run and r.candidates]
    for r in todo:
        if not r.candidates:
            run[r.qid] = {}
    try:
        total = sum(len(r.candidates) for r in pending)
        with tqdm(total=total, desc=desc, unit="pair", disable=total == 0) as bar:
            i = 0
            while i < len(pending):
                group = [pending[i]]
                n = len(pending[i].candidates)
                i += 1
                while i < len(pending) and n + len(pending[i].candidates) <= pairs_per_call:
                    group.append(pending[i])
                    n += len(pending[i].candidates)
                    i += 1
                queries = [r.query for r in group for _ in r.candidates]
                docs = [c.text for r in group for c in r.candidates]
                scores = np.asarray(scorer.score_pairs(queries, docs), dtype=np.float32).reshape(-1)
                if scores.shape[0] != len(docs):
                    raise ValueError(f"scorer returned {scores.shape[0]} scores for {len(docs)} pairs")
                if not np.all(np.isfinite(scores)):
                    raise FloatingPointError("scorer returned non-finite scores")
                offset = 0
                for r in group:
                    m = len(r.candidates)
                    run[r.qid] = {c.docid: float(s) for c, s in zip(r.candidates, scores[offset:offset + m])}
                    offset += m
                    if sink is not None:
                        sink.write(json.dumps({"qid": r.qid, "scores": run[r.qid]}) + "\n")
                if sink is not None:
                    sink.flush()
                    os.fsync(sink.fileno())
                bar.update(len(docs))
    finally:
        if sink is not None:
            sink.close()
    return {r.qid: run[r.qid] for r in todo}
