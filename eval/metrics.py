"""Metrics through ir-measures with trec_eval's semantics, and result tables.

Exactly as trec_eval computes them by default with `-c`: every query in the qrels counts (a judged query
the run does not answer scores 0), and a run is ranked by score descending with ties broken by docid
descending (trec_eval's rule, retrieval.runs.sort_hits). The run is re-scored by rank in that order
before it reaches ir-measures, so every measure sees the same order whichever provider computes it
(pytrec_eval for nDCG and recall, another one for RR). `ties="docid_ascending"` is the only other rule.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import ir_measures

from retrieval.runs import TIE_RULES, Qrels, Run, rank_scores
from twolar_jax.durable_io import write_json_atomic, write_text_atomic
from twolar_jax.errors import OptionError, check_choice


def default_measures(depth: int = 100) -> tuple[str, ...]:
    """The job's measures for runs `depth` deep: recall is named by the depth that was ranked (R@20 for a
    top-20 rerank), since a deeper cut-off would only repeat it."""
    return ("nDCG@10", "nDCG@1", "nDCG@5", "RR@10", f"R@{depth}")


DEFAULT_MEASURES: tuple[str, ...] = default_measures(100)


def queries_label(num_queries: int, total_queries: int) -> str:
    """"43", or "5 of 43" when only some of the set's judged queries were evaluated."""
    return str(num_queries) if num_queries == total_queries else f"{num_queries} of {total_queries}"


def parse_measures(names: Iterable[str]) -> list:
    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception as e:  # ir-measures raises several types for bad names
            raise OptionError(f"unknown measure {name!r} (ir-measures syntax, e.g. nDCG@10, RR@10, R@100): {e}") from None
    return out


def evaluate_run(
    qrels: Qrels,
    run: Run,
    measures: Sequence[str] = DEFAULT_MEASURES,
    *,
    ties: str = "trec_eval",
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over all qrels queries, per-query values) for each measure name, ties as trec_eval breaks them
    (module docstring) unless `ties="docid_ascending"`."""
    if not qrels:
        raise OptionError("empty qrels")
    check_choice("ties", ties, TIE_RULES)
    run = rank_scores(run, ties=ties)
    parsed = parse_measures(measures)
    names = {m: str(m) for m in parsed}
    per_query: dict[str, dict[str, float]] = {q: {str(m): 0.0 for m in parsed} for q in qrels}
    judged_run = {q: docs for q, docs in run.items() if q in qrels and docs}
    if judged_run:
        for metric in ir_measures.iter_calc(parsed, qrels, judged_run):
            if metric.query_id in per_query:
                value = float(metric.value)
                per_query[metric.query_id][names[metric.measure]] = 0.0 if math.isnan(value) else value
    aggregate = {str(m): sum(pq[str(m)] for pq in per_query.values()) / len(per_query) for m in parsed}
    return aggregate, per_query


def results_table(results: Mapping[str, Mapping[str, float]], measures: Sequence[str] = DEFAULT_MEASURES,
                  *, beir_datasets: Iterable[str] = (),
                  counts: Optional[Mapping[str, tuple[int, int]]] = None) -> list[dict]:
    """Rows {dataset, measure...}; a final "BEIR average" row over the named BEIR datasets present.

    counts: {dataset: (queries evaluated, judged queries of the set)} adds "queries" ("5 of 43"),
    "num_queries" and "total_queries" to each row (summed for the average)."""
    rows = [{"dataset": name, **{m: float(results[name][m]) for m in measures}} for name in results]
    beir = [n for n in beir_datasets if n in results]
    if beir:
        rows.append({"dataset": f"BEIR average ({len(beir)})",
                     **{m: sum(float(results[n][m]) for n in beir) / len(beir) for m in measures}})
    if counts is not None:
        for row in rows:
            names = beir if row["dataset"] not in results else [row["dataset"]]
            n, total = sum(counts[x][0] for x in names), sum(counts[x][1] for x in names)
            row.update(queries=queries_label(n, total), num_queries=n, total_queries=total)
    return rows


def to_markdown(rows: Sequence[Mapping], measures: Sequence[str] = DEFAULT_MEASURES, *, digits: int = 4) -> str:
    """A markdown table; rows with "queries" (results_table's counts) get a last column saying how many."""
    counted = any("queries" in row for row in rows)
    header = "| dataset | " + " | ".join(measures) + (" | queries |" if counted else " |")
    sep = "|---|" + "---:|" * (len(measures) + counted)
    lines = [header, sep]
    for row in rows:
        cells = [f"{row[m]:.{digits}f}" for m in measures] + ([str(row.get("queries", ""))] if counted else [])
        lines.append(f"| {row['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomic JSON write, keys in the given order."""
    return write_json_atomic(path, obj, sort_keys=False)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_text_atomic(path, text)
