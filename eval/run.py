"""The evaluation job: first stage, rerank top-k through `Reranker`, run files, metrics, tables.

    python -m eval.run --gin_file=gin/eval/trec_dl19.gin --gin.evaluate.checkpoint="'/path/model'"
    twolar-eval --gin_file=eval/beir.gin --gin.evaluate.mode="'bm25'"

Outputs under output_dir: <dataset>/run.trec (reranked, or the first stage in bm25 mode),
<dataset>/first_stage.trec, <dataset>/metrics.json (mean + per query), <dataset>/scores.jsonl
(resume log), results.md and results.json (one row per dataset + the BEIR average), config.gin.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval import datasets as eval_sets
from eval.first_stage import requests_from_run
from eval.metrics import DEFAULT_MEASURES, evaluate_run, results_table, to_markdown, write_json, write_text
from eval.readers import read_run
from eval.rerank import PairScorer, rerank
from eval.runs import write_trec_run

log = logging.getLogger("eval")
MODES = ("rerank", "bm25")


def load_reranker(checkpoint: str, *, score: str, dtype: str, batch_size: int, max_length: int,
                  truncation: str) -> PairScorer:
    """Our MODEL_DIR or an HF T5 dir, through the public Reranker API only."""
    from twolar_jax.reranker import Reranker

    return Reranker.from_pretrained(checkpoint, score=score, dtype=dtype, batch_size=batch_size,
                                    max_length=max_length, truncation=truncation)


def evaluate(
    *,
    output_dir: str,
    datasets: Sequence[str] = ("trec_dl/dl19",),
    data_dir: str | None = None,
    mode: str = "rerank",
    checkpoint: str | None = None,
    reranker: PairScorer | None = None,
    score: str = "difference",
    dtype: str = "float32",
    batch_size: int = 32,
    max_length: int = 512,
    truncation: str = "document",
    top_k: int = 100,
    first_stage_k: int | None = None,
    first_stage_runs: Mapping[str, str] | None = None,
    split: str = "test",
    k1: float = 0.9,
    b: float = 0.4,
    remove_query: bool = True,
    cache_dir: str | None = None,
    bm25_threads: int = 1,
    measures: Sequence[str] = DEFAULT_MEASURES,
    run_tag: str = "twolar",
    pairs_per_call: int = 1024,
    max_queries: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate one model (or the first stage alone with mode="bm25") on the named datasets.

    datasets: "trec_dl/dl19", "trec_dl/dl20", "beir/<name>", "beir/*" (every BEIR dir under data_dir/beir).
    first_stage_runs: {dataset name: TREC run file} replaces BM25 / the shipped candidates for that set.
    reranker: an in-memory object with `score_pairs` (tests, notebooks); otherwise `checkpoint` is loaded.
    max_queries: keep only the first N judged queries (sorted ids) of each set: smoke runs, benchmarks;
    the metrics are then over those N queries only.
    Returns {dataset: {measure: mean}}; the tables also hold the BEIR average.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    data_dir = Path(data_dir) if data_dir else eval_sets.DEFAULT_DATA_DIR
    names = eval_sets.expand_names(list(datasets), data_dir)
    first_stage_runs = dict(first_stage_runs or {})
    unknown = set(first_stage_runs) - set(names)
    if unknown:
        raise ValueError(f"first_stage_runs names datasets not evaluated: {sorted(unknown)}")
    depth = first_stage_k or top_k
    resume_key = None  # scores.jsonl is reused only for the same checkpoint and scoring settings
    if mode == "rerank" and reranker is None:
        if not checkpoint:
            raise ValueError("mode='rerank' needs a checkpoint (evaluate.checkpoint) or a reranker object")
        reranker = load_reranker(checkpoint, score=score, dtype=dtype, batch_size=batch_size,
                                 max_length=max_length, truncation=truncation)
        resume_key = {"checkpoint": str(Path(checkpoint).resolve()), "score": score, "dtype": dtype,
                      "max_length": max_length, "truncation": truncation}
    out = Path(output_dir)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for name in names:
        start = time.time()
        ds = eval_sets.load_set(name, data_dir, split=split, cache_dir=cache_dir, k1=k1, b=b,
                                remove_query=remove_query, threads=bm25_threads) \
            if name.startswith("beir/") else eval_sets.load_set(name, data_dir)
        judged = set(ds.qrels)
        if max_queries is not None:
            ds.qrels = {q: ds.qrels[q] for q in sorted(ds.qrels)[:max_queries]}
        if name in first_stage_runs:
            first = read_run(first_stage_runs[name], known_queries=judged)
        else:
            first = ds.first_stage(depth)
        first = {q: docs for q, docs in first.items() if q in ds.qrels}
        ds_dir = out / name.replace("/", "_")
        write_trec_run(ds_dir / "first_stage.trec", first, tag="bm25", depth=depth)
        if mode == "bm25":
            final = first
        else:
            requests = requests_from_run(first, ds.queries, ds.doc_text, k=depth,
                                         source=first_stage_runs.get(name, name))
            scores_path = _resume_log(ds_dir, resume_key)
            final = rerank(reranker, requests, top_k=top_k, pairs_per_call=pairs_per_call,
                           scores_path=scores_path, desc=name)
        write_trec_run(ds_dir / "run.trec", final, tag=run_tag if mode == "rerank" else "bm25")
        aggregate, per_query = evaluate_run(ds.qrels, final, measures)
        write_json(ds_dir / "metrics.json", {"dataset": name, "mode": mode, "mean": aggregate,
                                             "num_queries": len(ds.qrels), "per_query": per_query})
        results[name] = aggregate
        timings[name] = time.time() - start
        log.info("%s: %s (%.1fs)", name, " ".join(f"{k}={v:.4f}" for k, v in aggregate.items()), timings[name])
    rows = results_table(results, measures, beir_datasets=[n for n in names if n.startswith("beir/")])
    table = to_markdown(rows, measures)
    write_text(out / "results.md", table)
    write_json(out / "results.json", {"mode": mode, "checkpoint": checkpoint, "rows": rows, "seconds": timings})
    print(table, end="")
    return results


def _resume_log(ds_dir: Path, key: dict | None) -> Path:
    """scores.jsonl of an interrupted run, kept only when written with the same checkpoint and settings."""
    log_path, meta_path = ds_dir / "scores.jsonl", ds_dir / "scores.meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if key is None or old != key:
        if log_path.exists():
            log.info("%s: not resuming (written by another model or settings)", log_path)
            log_path.unlink()
        if key is not None:
            write_json(meta_path, key)
        elif meta_path.exists():
            meta_path.unlink()
    return log_path


_CONFIGURABLE: Any = None


def register_configurables() -> Any:
    """Register `evaluate` with gin once per process (only program entries call this, t5x style)."""
    global _CONFIGURABLE
    import gin

    if _CONFIGURABLE is None:
        _CONFIGURABLE = gin.external_configurable(evaluate, name="evaluate")
    return _CONFIGURABLE


def console_main(argv: Sequence[str] | None = None) -> None:
    """`twolar-eval` / `python -m eval.run`: gin flags in, `evaluate(...)` out."""
    import gin

    from twolar_jax import gin_utils

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configured = register_configurables()

    def main(rest: list[str]) -> None:
        if rest:
            raise SystemExit(f"unknown arguments {rest}: configure the job with --gin_file / --gin.evaluate.X=V")
        configured()
        output_dir = gin.query_parameter("evaluate.output_dir")
        gin_utils.write_operative_config(output_dir)

    gin_utils.run(main, argv)


if __name__ == "__main__":
    console_main(sys.argv[1:])
