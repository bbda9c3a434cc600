"""Rankings: the one hit-sorting rule, run files written atomically, and runs re-scored by rank.

The rule is trec_eval's: score descending, and tied scores by docid descending (trec_eval sorts with
`strcmp(b.docno, a.docno)` on ties; usnistgov/trec_eval form_res_rels.c). Every ranking this project
writes or evaluates (first-stage hits, reranked runs, metrics) follows it, so our numbers are the numbers
every paper's table was computed with. Scores stay float64 from reading to metrics (a float32 cast turns
1e307 and 1e308 into the same inf and invents ties).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Optional

from twolar_jax.durable_io import atomic_writer
from twolar_jax.errors import OptionError, PathLike

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
Hits = list[tuple[str, float]]
TIE_RULES = ("trec_eval", "docid_ascending")


def sort_hits(pairs: Iterable[tuple[str, float]], *, ties: str = "trec_eval") -> Hits:
    """(docid, score) best first: score descending; ties by docid descending (trec_eval) or ascending."""
    hits = [(str(d), float(s)) for d, s in pairs]
    if ties == "trec_eval":
        hits.sort(key=lambda p: p[0], reverse=True)  # stable two-pass sort: docid desc within a score
        hits.sort(key=lambda p: p[1], reverse=True)
        return hits
    if ties == "docid_ascending":
        return sorted(hits, key=lambda p: (-p[1], p[0]))
    raise OptionError(f"ties={ties!r}: expected one of {TIE_RULES}")


def rank_scores(run: Run, *, depth: Optional[int] = None, ties: str = "trec_eval") -> Run:
    """The run with scores replaced by n, n-1, ... in `ties` order, so any evaluator sees exactly that order."""
    out: Run = {}
    for qid, scores in run.items():
        order = sort_hits(scores.items(), ties=ties)[:depth]
        out[qid] = {d: float(len(order) - i) for i, (d, _) in enumerate(order)}
    return out


def format_score(score: float) -> str:
    """The shortest text that reads back to the same float64 (a float32 score reads back exactly too)."""
    if not math.isfinite(score):
        raise OptionError(f"run score {score!r} is not finite")
    return repr(float(score))


def write_trec_run(path: PathLike, run: Mapping[str, Mapping[str, float]], *, tag: str = "twolar",
                   depth: Optional[int] = None) -> Path:
    """Write `qid Q0 docid rank score tag` lines, queries sorted, hits in trec_eval order, atomically."""
    if not tag or any(c.isspace() for c in tag):
        raise OptionError(f"run tag must be one non-empty word, got {tag!r}")
    with atomic_writer(path) as f:
        for qid in sorted(run):
            for rank, (docid, score) in enumerate(sort_hits(run[qid].items())[:depth], 1):
                if any(c.isspace() for c in qid + docid) or not qid or not docid:
                    raise OptionError(f"run ids must be non-empty and without whitespace: {qid!r} {docid!r}")
                f.write(f"{qid} Q0 {docid} {rank} {format_score(score)} {tag}\n")
    return Path(path)
