"""The embedded default: TWOLAR end to end, offline, on the shipped SciFact data.

    python -m twolar_jax.demo [--quick] [--output_dir runs/demo] [--stages build,train,eval,report]
                              [--force] [--gin_file=...] [--gin.NAME=VALUE ...]

The application layer: it wires data_pipeline, the trainer and eval together (nothing imports it).
Stages (gin/experiments/demo.gin; --quick uses demo_quick.gin): build a small distillation set (cropped
sentences + SciFact train claims, BM25 + a dense MiniLM retriever, the offline MiniLM teacher), train the
tiny student with the sharded trainer, evaluate BM25 / teacher / student before / student after on
held-out SciFact test queries, and report a table, metrics JSON and a loss-curve PNG. Each finished stage
leaves `stages/<name>.json`; a re-run skips finished stages (`--force` re-runs the ones asked for).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from twolar_jax import entry, gin_utils, stop_signals, user_paths
from twolar_jax.errors import OptionError
from twolar_jax.durable_io import atomic_writer, write_json_atomic, write_text_atomic

STAGES = ("build", "train", "eval", "report")
SYSTEMS = ("bm25", "teacher", "student_before", "student_after")
SYSTEM_LABELS = {"bm25": "BM25 (pyserini, k1=0.9 b=0.4)", "teacher": "teacher: all-MiniLM-L6-v2 (offline)",
                 "student_before": "student before training (tiny, random init)",
                 "student_after": "student after distillation (tiny)"}
TABLE_MEASURES = ("nDCG@10", "nDCG@1", "RR@10")  # + recall at the depth reranked (table_measures)
log = logging.getLogger("twolar.demo")


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def stage_marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"


class ScorerAsPairScorer:
    """Adapts a per-query scorer (`score(query, passages)`) to eval's `score_pairs(queries, docs)`."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(docs), np.float32)
        start = 0
        while start < len(queries):
            end = start
            while end < len(queries) and queries[end] == queries[start]:
                end += 1
            out[start:end] = self.scorer.score(queries[start], list(docs[start:end]))
            start = end
        return out


def register_configurables() -> dict[str, Callable]:
    """Everything the demo's gin file names: build, train, evaluate and their parts."""
    from data_pipeline.set_builder.configurables import register_build
    from eval import run as eval_run
    from twolar_jax import train as train_module

    configured = {"build": register_build(), "evaluate": eval_run.register_configurables()}
    configured.update(train_module.register_configurables())
    return configured


# --- stages --------------------------------------------------------------------------------------------
def stage_build(paths: DemoPaths, configured: dict[str, Callable]) -> dict:
    manifest = configured["build"](progress=True, write_gin_config=True)
    runs = manifest.get("runs") or [{}]
    status = runs[-1].get("status", "unknown")
    if status != "complete":
        raise RuntimeError(f"build stage ended with status {status!r}; see {paths.build / 'manifest.json'}")
    lines = sum(1 for _ in open(paths.build / "train.jsonl", encoding="utf-8"))
    return {"status": status, "train_queries": lines}


def stage_train(paths: DemoPaths, configured: dict[str, Callable]) -> dict:
    result = configured["train"]()
    if result.stopped_by:  # SIGTERM / Ctrl-C: the stage is not done (no marker); a re-run resumes the training
        print(f"[demo] train: stopped at step {result.step} by {result.stopped_by}, its checkpoint saved; run "
              "the demo again to resume", file=sys.stderr)
        raise SystemExit(stop_signals.exit_code(result.stopped_by))
    return {"step": result.step, "train_metrics": result.train_metrics}


def stage_eval(paths: DemoPaths, configured: dict[str, Callable]) -> dict:
    import gin

    from data_pipeline.set_builder.offline_teacher import SentenceTransformerScorer
    from twolar_jax import checkpointing
    from twolar_jax.reranker import Reranker
    from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
    from twolar_jax.trainer import initial_params

    evaluate = configured["evaluate"]
    results = {}
    results["bm25"] = evaluate(output_dir=str(paths.eval / "bm25"), mode="bm25")
    results["teacher"] = evaluate(output_dir=str(paths.eval / "teacher"),
                                  reranker=ScorerAsPairScorer(gin.get_configurable(SentenceTransformerScorer)()))
    config = checkpointing.read_model_config(paths.student)
    scoring = gin_utils.query("evaluate.reranker")  # the eval job's RerankerConfig (eval/base.gin, demo.gin)
    # The student exactly as the trainer initialised it (same seed and rng path).
    before = Reranker.from_params(config, initial_params(PointwiseCrossEncoder(config), int(gin_utils.query("SEED"))),
                                  score_head=scoring.score_head, max_length=scoring.max_length,
                                  batch_size=scoring.batch_size)
    results["student_before"] = evaluate(output_dir=str(paths.eval / "student_before"), reranker=before)
    results["student_after"] = evaluate(output_dir=str(paths.eval / "student_after"),
                                        reranker=dataclasses.replace(scoring, checkpoint=str(paths.student)))
    return {name: next(iter(r.values())) for name, r in results.items()}


def plot_loss_curve(records: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], color="tab:blue", label="RankNet loss (train)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    agree_key = next((k for k in ("kendall_tau", "pairwise_agreement") if any(k in r for r in records)), None)
    if agree_key:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in records if agree_key in r], [r[agree_key] for r in records if agree_key in r],
                 color="tab:orange", label=f"{agree_key} with the teacher (train batch)")
        ax2.set_ylabel(agree_key)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=2, fontsize=8, frameon=False)
    ax.set_title("TWOLAR demo: tiny student distilled from the offline teacher")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def table_measures(top_k: int) -> tuple[str, ...]:
    """The table's columns: recall is named by the depth that was reranked (R@20 in --quick)."""
    return TABLE_MEASURES + (f"R@{top_k}",)


def results_markdown(metrics: dict[str, dict[str, float]], num_queries: int, top_k: int,
                     total_queries: int | None = None) -> str:
    measures = table_measures(top_k)
    header = "| system | " + " | ".join(measures) + " |"
    rule = "|---|" + "---|" * len(measures)
    rows = [f"| {SYSTEM_LABELS[s]} | " + " | ".join(f"{metrics[s].get(m, float('nan')):.4f}" for m in measures)
            + " |" for s in SYSTEMS if s in metrics]
    held_out = f"{num_queries} of {total_queries}" if total_queries and total_queries != num_queries else num_queries
    note = (f"\nSciFact test, {held_out} held-out queries; rerankers reorder BM25's top {top_k} "
            f"(R@{top_k}: recall of those {top_k}). The teacher is a small bi-encoder standing in for an LLM.\n")
    return "\n".join([header, rule, *rows]) + "\n" + note


def stage_report(paths: DemoPaths, configured: dict[str, Callable]) -> dict:
    from twolar_jax.summaries import read_metrics

    marker = paths.stage_marker("eval")
    if not marker.exists():
        raise RuntimeError(f"the report needs the eval stage: {marker} is missing")
    metrics = json.loads(marker.read_text())["summary"]
    first = json.loads((paths.eval / "bm25" / "beir_scifact" / "metrics.json").read_text())
    table = results_markdown(metrics, int(first["num_queries"]), int(gin_utils.query("EVAL_TOP_K")),
                             int(first.get("total_queries") or first["num_queries"]))
    write_text_atomic(paths.root / "results.md", table)
    records = read_metrics(paths.student, "train")
    curve = plot_loss_curve(records, paths.root / "loss_curve.png")
    losses = [r["loss"] for r in records if "loss" in r]
    summary = {"table": metrics, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "loss_curve": str(curve), "run_files": {s: str(paths.eval / s / "beir_scifact" / "run.trec")
                                                       for s in SYSTEMS}}
    write_json_atomic(paths.root / "results.json", summary)
    print("\n" + table)
    print(f"loss: {summary['loss_first']:.4f} (first logged step) -> {summary['loss_last']:.4f} (last); "
          f"curve: {curve}")
    print(f"run files: {paths.eval}/<system>/beir_scifact/run.trec; metrics: {paths.root / 'results.json'}")
    return summary


STAGE_FUNCTIONS = {"build": stage_build, "train": stage_train, "eval": stage_eval, "report": stage_report}


# --- program -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The demo's flags; what remains are gin flags (--gin_file, --gin.NAME=VALUE, ...)."""
    parser = entry.ArgumentParser(
        prog="python -m twolar_jax.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=entry.gin_help("experiments/demo", note="--output_dir sets OUTPUT_DIR, MODEL_DIR and DISTILL_JSONL "
                                                        "(the required macros) under it."))
    parser.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU (CI runs this)")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--force", action="store_true", help="re-run the named stages even if finished")
    entry.add_common_flags(parser, log_level="WARNING")
    return parser.parse_known_args(list(argv))


def parse_stages(value: str) -> list[str]:
    """The --stages list, checked: a non-empty comma-separated subset of STAGES."""
    stages = [s.strip() for s in value.split(",") if s.strip()]
    if not stages:
        raise OptionError(f"--stages={value!r}: name at least one of {STAGES}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise OptionError(f"--stages={value!r}: unknown stages {unknown}; expected a subset of {STAGES}")
    return stages


def prepare_output_dir(output_dir: str) -> DemoPaths:
    """The output folder, created now: a path that cannot be created is one error naming it."""
    paths = DemoPaths(Path(output_dir).expanduser().resolve())
    user_paths.check_output("--output_dir", output_dir, kind="dir")
    try:
        (paths.root / "stages").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--output_dir={output_dir!r}: cannot create {paths.root / 'stages'} "
                          f"({e.strerror or e})") from None
    if not os.access(paths.root, os.W_OK):
        raise OptionError(f"--output_dir={output_dir!r}: {paths.root} is not writable")
    return paths


def run_demo(argv: Sequence[str]) -> dict:
    args, rest = parse_args(argv)
    stages = parse_stages(args.stages)
    files, bindings, search_paths, leftover = gin_utils.split_gin_args(rest)
    if leftover:
        raise OptionError(f"unknown arguments {leftover} (see --help)")
    entry.start(args)
    user_paths.check_output("--output_dir", args.output_dir, kind="dir")
    paths = DemoPaths(Path(args.output_dir).expanduser().resolve())
    if "report" in stages and "eval" not in stages and not paths.stage_marker("eval").exists():
        raise OptionError(f"--stages={args.stages!r}: the report needs the eval stage, which has not run in "
                          f"{paths.root} (add eval to --stages)")
    from retrieval.lucene import ensure_java

    ensure_java()  # before anything imports pyserini/jnius
    base = ["experiments/demo_quick.gin" if args.quick else "experiments/demo.gin"]
    stage_bindings = [f"OUTPUT_DIR = {str(paths.build)!r}", f"MODEL_DIR = {str(paths.student)!r}",
                      f"DISTILL_JSONL = {str(paths.build / 'train.jsonl')!r}"]
    configured = register_configurables()
    gin_utils.parse_gin_flags(base + files, stage_bindings + bindings, search_paths)
    prepare_output_dir(args.output_dir)  # only now: the flags and gin files have been checked
    entry.on_interrupt(f"every finished stage is saved in {paths.root / 'stages'}")
    summaries = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        marker = paths.stage_marker(stage)
        if marker.exists() and not args.force and stage != "report":
            print(f"[demo] {stage}: already done ({marker}); skipping")
            summaries[stage] = json.loads(marker.read_text())["summary"]
            continue
        print(f"[demo] {stage}: running")
        start = time.time()
        summary = STAGE_FUNCTIONS[stage](paths, configured)
        seconds = time.time() - start
        write_json_atomic(marker, {"stage": stage, "seconds": round(seconds, 1), "quick": args.quick,
                                   "summary": summary})
        print(f"[demo] {stage}: done in {seconds:.0f}s")
        summaries[stage] = summary
    return summaries


def _main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_demo(argv)
    return 0


def console_main(argv: Sequence[str] | None = None) -> int:
    """`twolar demo` / `python -m twolar_jax.demo`: 0, or 2 with one line on stderr for a user error."""
    return entry.run_console("twolar demo", _main, argv)


if __name__ == "__main__":
    sys.exit(console_main())
