"""Metrics through ir-measures with trec_eval `-c` semantics, and result tables.

`-c` semantics: every query in the qrels counts; a judged query the run does not answer scores 0.
ir-measures already averages over all qrels queries (its "empty set" rule); we compute the mean
ourselves from per-query values so this holds whatever provider ir-measures picks.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import ir_measures

from eval.readers import Qrels, Run
from eval.runs import rank_scores

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "nDCG@1", "nDCG@5", "RR@10", "R@100")
HEADLINE = "nDCG@10"


def parse_measures(names: Iterable[str]) -> list:
    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception as e:  # ir-measures raises several types for bad names
            raise ValueError(f"unknown measure {name!r} (ir-measures syntax, e.g. nDCG@10, RR@10, R@100): {e}") from None
    return out


def evaluate_run(
    qrels: Qrels,
    run: Run,
    measures: Sequence[str] = DEFAULT_MEASURES,
    *,
    ties: str = "docid",
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over all qrels queries, per-query values) for each measure name.

    ties="docid": order by score desc then docid asc (our run files), for every measure. ties="raw": hand
    the scores to ir-measures as they are; then each provider breaks ties its own way (pytrec_eval, used
    for nDCG@k and R@k, like trec_eval: docid descending; RR@10 comes from another provider that does
    not), which is why "docid" is the default.
    """
    if not qrels:
        raise ValueError("empty qrels")
    if ties == "docid":
        run = rank_scores(run)
    elif ties != "raw":
        raise ValueError(f"ties must be 'docid' or 'raw', got {ties!r}")
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
                  *, beir_datasets: Iterable[str] = ()) -> list[dict]:
    """Rows {dataset, measure...}; a final "BEIR average" row over the named BEIR datasets present."""
    rows = [{"dataset": name, **{m: float(results[name][m]) for m in measures}} for name in results]
    beir = [n for n in beir_datasets if n in results]
    if beir:
        rows.append({"dataset": f"BEIR average ({len(beir)})",
                     **{m: sum(float(results[n][m]) for n in beir) / len(beir) for m in measures}})
    return rows


def to_markdown(rows: Sequence[Mapping], measures: Sequence[str] = DEFAULT_MEASURES, *, digits: int = 4) -> str:
    header = "| dataset | " + " | ".join(measures) + " |"
    sep = "|---|" + "---:|" * len(measures)
    lines = [header, sep]
    for row in rows:
        lines.append(f"| {row['dataset']} | " + " | ".join(f"{row[m]:.{digits}f}" for m in measures) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomic JSON write (tmp + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
