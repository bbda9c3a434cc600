"""Run files: one deterministic order and fp32 scores, written atomically.

trec_eval orders tied scores by docno *descending* (usnistgov/trec_eval#22); bf16 scores tie often.
We order by score descending, then docid ascending, everywhere (written files and metrics), and
write float32 scores with the shortest text that reads back to the same float32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from eval.readers import Run


def ranked(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(docid, fp32 score) best first: score descending, then docid ascending."""
    pairs = [(d, float(np.float32(s))) for d, s in scores.items()]
    return sorted(pairs, key=lambda p: (-p[1], p[0]))


def rank_scores(run: Run, *, depth: int | None = None) -> Run:
    """The run with scores replaced by n-rank, so any evaluator follows our tie-break exactly."""
    out: Run = {}
    for qid, scores in run.items():
        order = ranked(scores)[:depth]
        out[qid] = {d: float(len(order) - i) for i, (d, _) in enumerate(order)}
    return out


def format_score(score: float) -> str:
    return str(np.float32(score))


def write_trec_run(path: str | os.PathLike, run: Run, *, tag: str = "twolar", depth: int | None = None) -> Path:
    """Write `qid Q0 docid rank score tag` lines, queries in sorted order, atomically (tmp + os.replace)."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be one non-empty word, got {tag!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for qid in sorted(run):
            for rank, (docid, score) in enumerate(ranked(run[qid])[:depth], 1):
                if any(c.isspace() for c in qid + docid):
                    raise ValueError(f"ids may not contain whitespace: {qid!r} {docid!r}")
                f.write(f"{qid} Q0 {docid} {rank} {format_score(score)} {tag}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
