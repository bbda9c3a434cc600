"""The embedded default: TWOLAR end to end, offline, on the shipped SciFact data.

    python -m twolar_jax.demo [--quick] [--output_dir runs/demo] [--stages build,train,eval,report]
                              [--force] [--gin_file=...] [--gin.NAME=VALUE ...]

The application layer: it wires data_pipeline, the trainer and eval together (nothing imports it).
Stages (gin/experiments/demo.gin; --quick uses demo_quick.gin): build a small distillation set (cropped
sentences + SciFact train claims, BM25 + a dense MiniLM retriever, the offline MiniLM teacher), train the
tiny student with the sharded trainer, evaluate BM25 / teacher / student before / student after on
held-out SciFact test queries, and report a table, metrics JSON and a loss-curve PNG. Each finished stage
leaves `stages/<name>.json`; a re-run skips finished stages (`--force` re-runs the ones asked for).
`--student listwise|both` adds a tiny Fusion-in-Decoder student (gin/experiments/demo_listwise*.gin) trained
on the same build (stage train_listwise, a child `twolar-train` run) and ranked with FIRST's method (stage
eval_listwise); the default `pointwise` runs exactly the four stages above.
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

STAGES = ("build", "train", "train_listwise", "eval", "eval_listwise", "report")
STUDENT_STAGES = {"pointwise": ("train", "eval"), "listwise": ("train_listwise", "eval_listwise")}
STUDENTS = ("pointwise", "listwise", "both")
SYSTEMS = ("bm25", "teacher", "student_before", "student_after")
LISTWISE_SYSTEMS = ("student_listwise_before", "student_listwise_after")
SYSTEM_LABELS = {"bm25": "BM25 (pyserini, k1=0.9 b=0.4)", "teacher": "teacher: all-MiniLM-L6-v2 (offline)",
                 "student_before": "student before training (tiny, random init)",
                 "student_after": "student after distillation (tiny)",
                 "student_listwise_before": "listwise FiD student before training (tiny, random init)",
                 "student_listwise_after": "listwise FiD student after distillation (tiny, FIRST)"}
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

    @property
    def listwise(self) -> Path:
        return self.root / "student_listwise"

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


def stage_train(paths: DemoPaths, configured: dict[str, Callable], split: bool = False) -> dict:
    if split:  # --student both: the shared held-out split, before gin builds the training files
        held_out_split(paths)
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


def split_distillation_set(source: Path, out_dir: Path, fraction: float) -> dict[str, Path]:
    """The build's JSONL cut into train and held-out validation files (the last lines), so the listwise
    student's validation nDCG@10 is measured on queries it never trained on; rewritten identically on resume."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    held_out = max(1, int(round(len(lines) * fraction)))
    if len(lines) - held_out < 1:
        raise RuntimeError(f"{source} has {len(lines)} queries: too few to hold out {held_out} for validation")
    files = {"train": out_dir / "train.jsonl", "validation": out_dir / "validation.jsonl"}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(files["train"], "\n".join(lines[:-held_out]) + "\n")
    write_text_atomic(files["validation"], "\n".join(lines[-held_out:]) + "\n")
    return files


def held_out_split(paths: DemoPaths) -> dict[str, Path]:
    """The build cut once into the split both students share (`--student both`: same queries held out)."""
    fraction = float(gin_utils.query("LISTWISE_VALIDATION_FRACTION"))
    return split_distillation_set(paths.build / "train.jsonl", paths.listwise / "data", fraction)


def pointwise_validation_bindings(paths: DemoPaths) -> list[str]:
    """`--student both`: the pointwise student trains on the same split as the listwise one and validates on
    its held-out queries, so the plot compares the two on equal terms (the default run binds none of this)."""
    data = paths.listwise / "data"
    return [f"DISTILL_JSONL = {str(data / 'train.jsonl')!r}", f"VALIDATION_JSONL = {str(data / 'validation.jsonl')!r}",
            "train.validation = @ValidationConfig()", "ValidationConfig.period = %BOTH_VALIDATION_PERIOD",
            "ValidationConfig.at_start = True"]


def listwise_options() -> dict[str, int]:
    """The listwise student's window, stride and passage length (demo.gin's LISTWISE_* macros): training and
    ranking share them."""
    return {"window": int(gin_utils.query("LISTWISE_WINDOW")), "stride": int(gin_utils.query("LISTWISE_STRIDE")),
            "passage_length": int(gin_utils.query("LISTWISE_PASSAGE_LENGTH"))}


def listwise_train_command(paths: DemoPaths, files: dict[str, Path], quick: bool) -> list[str]:
    """`twolar-train` on the listwise gin: a child process, so its gin (FiDRanker, listwise batches) never
    replaces the demo's (the pointwise student's train and the eval job)."""
    options = listwise_options()
    gin_file = "experiments/demo_listwise_quick.gin" if quick else "experiments/demo_listwise.gin"
    bindings = {"MODEL_DIR": repr(str(paths.listwise)), "DISTILL_JSONL": repr(str(files["train"])),
                "VALIDATION_JSONL": repr(str(files["validation"])), "WINDOW": options["window"],
                "PASSAGE_LENGTH": options["passage_length"], "SEED": int(gin_utils.query("SEED"))}
    return [sys.executable, "-m", "twolar_jax.train", f"--gin_file={gin_file}",
            *(f"--gin.{name}={value}" for name, value in bindings.items())]


def stage_train_listwise(paths: DemoPaths, configured: dict[str, Callable], quick: bool = False) -> dict:
    """Trains (or resumes, from its checkpoint) the tiny FiD student on the build's queries."""
    import subprocess

    from twolar_jax.summaries import read_metrics

    files = held_out_split(paths)
    cmd = listwise_train_command(paths, files, quick)
    log.info("listwise student: %s", " ".join(cmd))
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode in (stop_signals.exit_code("SIGINT"), stop_signals.exit_code("SIGTERM")):
        print("[demo] train_listwise: stopped, its checkpoint saved; run the demo again to resume", file=sys.stderr)
        raise SystemExit(child.returncode)
    if child.returncode != 0:
        raise RuntimeError(f"the listwise student's training failed (exit {child.returncode}):\n"
                           f"{(child.stdout + child.stderr)[-3000:]}")
    train = read_metrics(paths.listwise, "train")
    validation = read_metrics(paths.listwise, "validation")
    return {"step": int(train[-1]["step"]) if train else 0, "train_metrics": train[-1] if train else {},
            "validation_ndcg@10": [r.get("ndcg@10") for r in validation]}


def stage_eval_listwise(paths: DemoPaths, configured: dict[str, Callable]) -> dict:
    """The FiD student before (the trainer's own initialisation) and after training, ranked with FIRST's
    method over sliding windows of the same BM25 candidates as the other systems."""
    from eval.listwise import ListwiseScorer
    from twolar_jax import checkpointing
    from twolar_jax.listwise_reranker import ListwiseReranker
    from twolar_jax.ranking.listwise import FiDRanker
    from twolar_jax.trainer import initial_params

    options = listwise_options()
    evaluate = configured["evaluate"]
    config = checkpointing.read_model_config(paths.listwise)
    scoring = gin_utils.query("evaluate.reranker")
    model = FiDRanker(config, window=options["window"], loss_name="first")
    before = ListwiseScorer(ListwiseReranker(config, initial_params(model, int(gin_utils.query("SEED"))),
                                             method="first", batch_size=8, **options))
    after = dataclasses.replace(scoring, checkpoint=str(paths.listwise), listwise="first", batch_size=8, **options)
    results = {"student_listwise_before": evaluate(output_dir=str(paths.eval / "student_listwise_before"),
                                                   reranker=before),
               "student_listwise_after": evaluate(output_dir=str(paths.eval / "student_listwise_after"),
                                                  reranker=after)}
    return {name: next(iter(r.values())) for name, r in results.items()}


def plot_loss_curve(records: list[dict], path: Path, validation: dict[str, list[dict]] | None = None,
                    listwise_records: list[dict] | None = None) -> Path:
    """The PNG the report links: the training loss (and agreement) per step; with `validation` ({student:
    its validation records}), a second panel of each student's held-out nDCG@10 at every validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: recs for name, recs in (validation or {}).items() if any("ndcg@10" in r for r in recs)}
    fig, axes = plt.subplots(2 if curves else 1, 1, figsize=(7, 6.5 if curves else 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    _plot_train(ax, records, listwise_records or [])
    if curves:
        low = axes[1][0]
        for name, recs in curves.items():
            points = [(r["step"], r["ndcg@10"]) for r in recs if "ndcg@10" in r]
            low.plot(*zip(*points), marker="o", label=f"{name} student: held-out nDCG@10 vs the teacher")
        low.set_xlabel("step")
        low.set_ylabel("nDCG@10 (validation)")
        low.grid(alpha=0.3)
        low.legend(fontsize=8, frameon=False)
    with atomic_writer(path, "wb") as f:
        fig.tight_layout()
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def _plot_train(ax: Any, records: list[dict], listwise_records: list[dict]) -> None:
    """The top panel, as the pointwise-only demo always drew it, plus the listwise student's loss if any."""
    steps = [r["step"] for r in records if "loss" in r]
    if steps or not listwise_records:
        ax.plot(steps, [r["loss"] for r in records if "loss" in r], color="tab:blue", label="RankNet loss (train)")
    listwise_steps = [r["step"] for r in listwise_records if "loss" in r]
    if listwise_steps:
        ax.plot(listwise_steps, [r["loss"] for r in listwise_records if "loss" in r], color="tab:green",
                label="listwise FiD loss (train)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    agree_key = next((k for k in ("kendall_tau", "pairwise_agreement") if any(k in r for r in records)), None)
    if agree_key:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in records if agree_key in r], [r[agree_key] for r in records if agree_key in r],
                 color="tab:orange", label=f"{agree_key} with the teacher (train batch)")
        ax2.set_ylabel(agree_key)
    lines = ax.get_lines() + (ax2.get_lines() if agree_key else [])
    if agree_key or listwise_steps:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=2, fontsize=8, frameon=False)
    ax.set_title("TWOLAR demo: tiny student distilled from the offline teacher")
    ax.grid(alpha=0.3)


def table_measures(top_k: int) -> tuple[str, ...]:
    """The table's columns: recall is named by the depth that was reranked (R@20 in --quick)."""
    return TABLE_MEASURES + (f"R@{top_k}",)


def results_markdown(metrics: dict[str, dict[str, float]], num_queries: int, top_k: int,
                     total_queries: int | None = None) -> str:
    measures = table_measures(top_k)
    header = "| system | " + " | ".join(measures) + " |"
    rule = "|---|" + "---|" * len(measures)
    rows = [f"| {SYSTEM_LABELS[s]} | " + " | ".join(f"{metrics[s].get(m, float('nan')):.4f}" for m in measures)
            + " |" for s in SYSTEMS + LISTWISE_SYSTEMS if s in metrics]
    held_out = f"{num_queries} of {total_queries}" if total_queries and total_queries != num_queries else num_queries
    note = (f"\nSciFact test, {held_out} held-out queries; rerankers reorder BM25's top {top_k} "
            f"(R@{top_k}: recall of those {top_k}). The teacher is a small bi-encoder standing in for an LLM.\n")
    return "\n".join([header, rule, *rows]) + "\n" + note


def report_metrics(paths: DemoPaths, student: str) -> tuple[dict[str, dict[str, float]], dict]:
    """The table's rows from the finished eval stages of the chosen students (a default report never shows a
    listwise row an earlier run left), and one system's metrics.json (its query counts)."""
    metrics: dict[str, dict[str, float]] = {}
    for stage in [s for s in ("eval", "eval_listwise") if s in student_stages(student)]:
        marker = paths.stage_marker(stage)
        if marker.exists():
            metrics.update(json.loads(marker.read_text())["summary"])
    if not metrics:
        raise RuntimeError(f"the report needs an eval stage: {paths.stage_marker('eval')} is missing")
    first = next(iter(metrics))
    return metrics, json.loads((paths.eval / first / "beir_scifact" / "metrics.json").read_text())


def stage_report(paths: DemoPaths, configured: dict[str, Callable], student: str = "pointwise") -> dict:
    from twolar_jax.summaries import read_metrics

    metrics, first = report_metrics(paths, student)
    table = results_markdown(metrics, int(first["num_queries"]), int(gin_utils.query("EVAL_TOP_K")),
                             int(first.get("total_queries") or first["num_queries"]))
    write_text_atomic(paths.root / "results.md", table)
    pointwise = "eval" in student_stages(student)
    records = read_metrics(paths.student, "train") if pointwise else []
    listwise = "eval_listwise" in student_stages(student) and paths.stage_marker("eval_listwise").exists()
    validation = {"pointwise": read_metrics(paths.student, "validation") if pointwise else [],
                  "listwise": read_metrics(paths.listwise, "validation") if listwise else []}
    listwise_records = read_metrics(paths.listwise, "train") if listwise else []
    curve = plot_loss_curve(records, paths.root / "loss_curve.png", validation, listwise_records)
    losses = [r["loss"] for r in records if "loss" in r]
    summary = {"table": metrics, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "loss_curve": str(curve), "run_files": {s: str(paths.eval / s / "beir_scifact" / "run.trec")
                                                       for s in metrics}}
    for name, recs in validation.items():  # only students that validated: the default run adds no key
        if any("ndcg@10" in r for r in recs):
            summary[f"{name}_validation_ndcg@10"] = [[r["step"], r["ndcg@10"]] for r in recs if "ndcg@10" in r]
    write_json_atomic(paths.root / "results.json", summary)
    print("\n" + table)
    if losses:
        print(f"loss: {summary['loss_first']:.4f} (first logged step) -> {summary['loss_last']:.4f} (last); "
              f"curve: {curve}")
    for name in validation:
        if f"{name}_validation_ndcg@10" in summary:
            print(f"{name} student, held-out nDCG@10 vs the teacher at each validation: " + ", ".join(
                f"step {step}: {value:.4f}" for step, value in summary[f"{name}_validation_ndcg@10"]))
    print(f"run files: {paths.eval}/<system>/beir_scifact/run.trec; metrics: {paths.root / 'results.json'}")
    return summary


STAGE_FUNCTIONS = {"build": stage_build, "train": stage_train, "train_listwise": stage_train_listwise,
                   "eval": stage_eval, "eval_listwise": stage_eval_listwise, "report": stage_report}


# --- program -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The demo's flags; what remains are gin flags (--gin_file, --gin.NAME=VALUE, ...)."""
    parser = entry.ArgumentParser(
        prog="python -m twolar_jax.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=entry.gin_help("experiments/demo", note="--output_dir sets OUTPUT_DIR, MODEL_DIR and DISTILL_JSONL "
                                                        "(the required macros) under it."))
    parser.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU (CI runs this)")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {STAGES} (those of --student; "
                        "default: all of them)")
    parser.add_argument("--force", action="store_true", help="re-run the named stages even if finished")
    parser.add_argument("--student", choices=STUDENTS, default="pointwise",
                        help="which student(s) to distil and evaluate: the pointwise cross-encoder (default), the "
                             "listwise Fusion-in-Decoder T5, or both side by side")
    entry.add_common_flags(parser, log_level="WARNING")
    return parser.parse_known_args(list(argv))


def student_stages(student: str) -> set[str]:
    """The stages a --student choice runs (the others are skipped even when --stages names them)."""
    chosen = ("pointwise", "listwise") if student == "both" else (student,)
    return {"build", "report"} | {stage for s in chosen for stage in STUDENT_STAGES[s]}


def parse_stages(value: str | None, student: str = "pointwise") -> list[str]:
    """The --stages list, checked: a non-empty comma-separated subset of the --student's stages (all of them
    when not given), in STAGES order."""
    own = tuple(s for s in STAGES if s in student_stages(student))
    if value is None:
        return list(own)
    stages = [s.strip() for s in value.split(",") if s.strip()]
    if not stages:
        raise OptionError(f"--stages={value!r}: name at least one of {own}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise OptionError(f"--stages={value!r}: unknown stages {unknown}; expected a subset of {own}")
    other = [s for s in stages if s not in own]
    if other:
        raise OptionError(f"--stages={value!r}: {other} belong to another student than --student={student} "
                          "(--student listwise or both runs the listwise stages)")
    return [s for s in STAGES if s in stages]


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
    stages = parse_stages(args.stages, args.student)
    files, bindings, search_paths, leftover = gin_utils.split_gin_args(rest)
    if leftover:
        raise OptionError(f"unknown arguments {leftover} (see --help)")
    entry.start(args)
    user_paths.check_output("--output_dir", args.output_dir, kind="dir")
    paths = DemoPaths(Path(args.output_dir).expanduser().resolve())
    evals = [s for s in ("eval", "eval_listwise") if s in student_stages(args.student)]
    if "report" in stages and not any(s in stages or paths.stage_marker(s).exists() for s in evals):
        raise OptionError(f"--stages={args.stages!r}: the report needs the eval stage, which has not run in "
                          f"{paths.root} (add {evals[0]} to --stages)")
    from retrieval.lucene import ensure_java

    ensure_java()  # before anything imports pyserini/jnius
    base = ["experiments/demo_quick.gin" if args.quick else "experiments/demo.gin"]
    stage_bindings = [f"OUTPUT_DIR = {str(paths.build)!r}", f"MODEL_DIR = {str(paths.student)!r}",
                      f"DISTILL_JSONL = {str(paths.build / 'train.jsonl')!r}"]
    if args.student == "both":
        stage_bindings += pointwise_validation_bindings(paths)
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
        extra = {"train_listwise": {"quick": args.quick}, "train": {"split": args.student == "both"},
                 "report": {"student": args.student}}.get(stage, {})
        summary = STAGE_FUNCTIONS[stage](paths, configured, **extra)
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
