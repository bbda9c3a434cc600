r"""Distillation training entry point (t5x style).

    python -m twolar_jax.train --gin_file=experiments/twolar_flan_t5_large_rank_net.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.DISTILL_JSONL="'/data/distill.jsonl'"

`train(...)` is a plain keyword-only function (importable and testable): it builds the ranking model (the
pointwise cross-encoder of a T5 preset, or any `RankingModel`), the partitioner and a `trainer.Trainer`, which
owns the steps, loop, validation and checkpoints; this module keeps the gin entry, signals and the HF export. The batches come from a source that gin builds: the run
file imports the task module (data_pipeline.seqio_input.tasks), so this module never imports the data
side. Multi-host: pass --multiprocess (plus --coordinator_address/--process_count/--process_index on bare
GPU hosts); each host reads its own data shard (shard_index = jax.process_index()). See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Mapping, Optional, Sequence

import jax

from twolar_jax import checkpointing, entry, gin_utils, partitioning, stop_signals, summaries, user_paths
from twolar_jax.checkpointing import CheckpointConfig
from twolar_jax.errors import OptionError
from twolar_jax.model.config import T5Config, resolve_model_config
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.partitioner import Partitioner
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.train_loop import GROUPS_WITHOUT_PAIRS, BatchSource, LoggingConfig, ValidationConfig
from twolar_jax.trainer import Trainer

log = logging.getLogger("twolar_jax.train")


@dataclasses.dataclass
class TrainResult:
    step: int
    model_dir: str
    train_metrics: dict[str, float]
    eval_metrics: Optional[dict[str, float]]
    batches_consumed: int
    stopped_early: bool = False  # the data ran out before total_steps
    batches_without_pairs: int = 0  # skipped (model unchanged) with groups_without_pairs='skip'
    stopped_by: Optional[str] = None  # "SIGTERM" or "SIGINT": stopped at `step`, whose checkpoint was saved


def train(
    *,
    model_dir: str,
    train_batches: BatchSource,
    total_steps: int,
    model: str | T5Config | Mapping[str, Any] | RankingModel = "tiny",
    model_overrides: Optional[Mapping[str, Any]] = None,
    init_checkpoint: Optional[str] = None,
    optimizer: OptimizerConfig = OptimizerConfig(),
    checkpoints: CheckpointConfig = CheckpointConfig(),
    validation: Optional[ValidationConfig] = None,
    logging_config: LoggingConfig = LoggingConfig(),
    num_microbatches: int = 1,
    loss: str = "rank_net",
    loss_options: Optional[Mapping[str, Any]] = None,
    score_head: str = "difference",
    enable_dropout: bool = True,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    num_devices: Optional[int] = None,
    logical_axis_rules: Optional[Sequence[tuple[str, Any]]] = None,
    seed: int = 0,
    export_hf_dir: Optional[str] = None,
    groups_without_pairs: str = "error",
) -> TrainResult:
    """Train a student on teacher-ordered passage groups; resumes from MODEL_DIR's latest checkpoint.

    `model`: a T5 preset name, T5Config or its dict (the pointwise cross-encoder, with `loss`, `loss_options`
    and `score_head`), or any `RankingModel`. A step is one optimizer update over a global batch (all hosts'
    batches together), split into `num_microbatches` for gradient accumulation. The mesh spans all devices
    unless `num_devices` picks the first few (single-process only). The data position is saved with each
    checkpoint and passed back to `train_batches(skip_batches=...)` on resume. groups_without_pairs: a batch
    with nothing to learn from is an error ("error"), or is skipped, logged and counted ("skip").
    Every option is checked before any file is written or any device memory is allocated. SIGTERM or
    Ctrl-C (`stop_signals`; on a pod, JAX's preemption notice on any host) stops the run after the step in
    progress, whose checkpoint is saved (`TrainResult.stopped_by`); nothing is exported then.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise OptionError(f"train.total_steps must be an integer >= 0, got {total_steps!r}")
    if not model_dir:
        raise OptionError("train.model_dir is required (MODEL_DIR)")
    ranking_model = build_model(model, model_overrides, loss=loss, loss_options=loss_options, score_head=score_head)
    partitioner = Partitioner.create(mesh_shape, devices=select_devices(num_devices),
                                     logical_axis_rules=logical_axis_rules, option="train.logical_axis_rules")
    trainer = Trainer(ranking_model, partitioner, optimizer=optimizer, total_steps=total_steps,
                      num_microbatches=num_microbatches, enable_dropout=enable_dropout, seed=seed)
    is_chief = jax.process_index() == 0
    write_gin = logging_config.write_gin_config and is_chief
    with stop_signals.StopRequest(jax.process_count()) as stop:  # SIGTERM, Ctrl-C: save the step, stop
        result = trainer.fit(model_dir=model_dir, train_batches=train_batches, total_steps=total_steps,
                             checkpoints=checkpoints, logging_config=logging_config, validation=validation,
                             init_checkpoint=init_checkpoint, groups_without_pairs=groups_without_pairs, stop=stop,
                             on_first_step=lambda step, writer: write_gin and _write_gin_config(model_dir, writer, step),
                             on_finish=lambda step, writer: write_gin and _write_gin_config(model_dir, writer, step))
    if export_hf_dir and not result.stopped_by:  # every process: the restore is collective on a pod
        out = checkpointing.export_hf(model_dir, export_hf_dir)
        if is_chief:
            log.info("exported step %d to %s", result.step, out)
    return TrainResult(step=result.step, model_dir=str(model_dir), train_metrics=result.last_train,
                       eval_metrics=result.last_eval, batches_consumed=result.batches_consumed,
                       stopped_early=result.stopped_early, batches_without_pairs=result.batches_without_pairs,
                       stopped_by=result.stopped_by)


def build_model(model: str | T5Config | Mapping[str, Any] | RankingModel, overrides: Optional[Mapping[str, Any]],
                *, loss: str, loss_options: Optional[Mapping[str, Any]], score_head: str) -> RankingModel:
    """train.model as a RankingModel: a given one as it is, else the pointwise cross-encoder of the T5 config."""
    if isinstance(model, RankingModel):
        pointwise = {"model_overrides": overrides, "loss": loss != "rank_net", "loss_options": loss_options,
                     "score_head": score_head != "difference"}
        set_here = [f"train.{k}" for k, v in pointwise.items() if v]
        if set_here:
            raise OptionError(f"{', '.join(set_here)}: train.model is a {type(model).__name__}, which carries its "
                              "own config, loss and head; set them on it")
        return model
    return PointwiseCrossEncoder(resolve_model_config(model, overrides), score_head=score_head, loss_name=loss,
                                 loss_options=tuple(sorted((loss_options or {}).items())))


def select_devices(num_devices: Optional[int]) -> Optional[list[jax.Device]]:
    """All devices (None), or the first `num_devices` (single-process debugging and tests only)."""
    if num_devices is None:
        return None
    if jax.process_count() > 1:
        raise OptionError("train.num_devices is for single-process runs; multi-host meshes use every device")
    if not 1 <= num_devices <= jax.device_count():
        raise OptionError(f"train.num_devices={num_devices}: {jax.device_count()} devices are available")
    return jax.devices()[:num_devices]


def _write_gin_config(model_dir: str, writer: summaries.SummaryWriter, step: int) -> None:
    """config.gin (redacted) in MODEL_DIR and as TensorBoard text, when gin configured this run."""
    text = gin_utils.operative_config()
    if text.strip():
        gin_utils.write_operative_config(model_dir)
        writer.text(step, "gin/operative_config", "    " + text.replace("\n", "\n    "))


# ------------------------------------------------------------------------------------- program
def register_configurables() -> dict[str, Any]:
    """Register `train` and its option objects with gin (idempotent); only program entries call this."""
    from twolar_jax import configurables

    configurables.register_library()
    return {"train": gin_utils.register(train, name="train", module="twolar_jax.train")}


EXPORT_NOTE = ("--export_only --export_hf=DIR needs only the MODEL_DIR to export: --model_dir=DIR (or "
               "--gin.MODEL_DIR=\"'DIR'\"), no gin file.")


def _flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = entry.parser_with_gin_help(
        "twolar-train", "Distil teacher rankings into a T5 student (gin configures the run).",
        "runs/distill_train", "experiments/", "models/", "mesh/", note=EXPORT_NOTE)
    parser.add_argument("--model_dir", default=None, metavar="DIR",
                        help="MODEL_DIR: checkpoints, config.gin, metrics (same as --gin.MODEL_DIR=\"'DIR'\")")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip invalid distillation lines, counted and logged (binds SKIP_INVALID = True)")
    parser.add_argument("--groups_without_pairs", choices=GROUPS_WITHOUT_PAIRS, default=None,
                        help="a batch with no query of two real passages: 'error' (default) or 'skip' "
                             "(binds train.groups_without_pairs)")
    parser.add_argument("--multiprocess", action="store_true", help="call jax.distributed.initialize")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--process_count", type=int, default=None)
    parser.add_argument("--process_index", type=int, default=None)
    parser.add_argument("--export_hf", default=None, metavar="DIR",
                        help="after training, write the last checkpoint as an HF T5 directory")
    parser.add_argument("--export_only", action="store_true",
                        help="do not train: export MODEL_DIR's checkpoint (--export_step or latest) to --export_hf")
    parser.add_argument("--export_step", type=int, default=None)
    entry.add_common_flags(parser)
    flags, unknown = parser.parse_known_args(list(argv))
    flags.unknown = unknown  # reported by main, after the more useful "no --gin_file given"
    return flags


def _flag_bindings(flags: argparse.Namespace) -> list[str]:
    """The gin bindings that flags stand for (parsed after the user's own, so the flag wins)."""
    bindings = []
    if flags.model_dir:
        bindings.append(f"MODEL_DIR = {str(flags.model_dir)!r}")
    if flags.skip_invalid:
        bindings.append("SKIP_INVALID = True")
    if flags.groups_without_pairs:
        bindings.append(f"train.groups_without_pairs = {flags.groups_without_pairs!r}")
    return bindings


def _export_only(flags: argparse.Namespace, files: list[str], bindings: list[str], paths: list[str]) -> str:
    """--export_only: MODEL_DIR from --model_dir, or from gin (a gin file or --gin.MODEL_DIR alone)."""
    if not flags.export_hf:
        raise OptionError("--export_only needs --export_hf=DIR")
    model_dir = flags.model_dir
    if not model_dir:
        if not files and not bindings:
            raise OptionError("--export_only needs --model_dir=DIR (or --gin.MODEL_DIR=\"'DIR'\")")
        gin_utils.parse_gin_flags(files, bindings, paths)
        model_dir = _gin_model_dir()
    out = checkpointing.export_hf(model_dir, flags.export_hf, flags.export_step)
    log.info("exported %s (step %s) to %s", model_dir, flags.export_step or "latest", out)
    return f"exported {model_dir} -> {out}"


def _gin_model_dir() -> str:
    """MODEL_DIR as gin has it: the macro, else train.model_dir."""
    for name in ("MODEL_DIR", "twolar_jax.train.train.model_dir"):
        try:
            value = gin_utils.query(name)
        except (ValueError, KeyError):
            continue
        if value:
            return str(value)
    raise OptionError("--export_only needs --model_dir=DIR (or --gin.MODEL_DIR=\"'DIR'\")")


def _check_before_writing(flags: argparse.Namespace) -> Optional[str]:
    """Before train() creates MODEL_DIR: the output paths can be written, and the run's distillation files
    (gin's DISTILL_FILES, whose construction validates them) are there, readable and not empty; the model
    config first, which costs nothing. Returns MODEL_DIR as gin binds it (None: train() names it missing)."""
    if gin_utils.is_bound("MODEL_CONFIG"):
        resolve_model_config(gin_utils.query("MODEL_CONFIG"))
    try:
        model_dir = _gin_model_dir()
    except OptionError:
        model_dir = None  # train() names the missing MODEL_DIR
    if model_dir:
        user_paths.check_output("--model_dir" if flags.model_dir else "MODEL_DIR", model_dir, kind="dir")
    if flags.export_hf:
        user_paths.check_output("--export_hf", flags.export_hf, kind="dir")
    if gin_utils.is_bound("DISTILL_FILES"):
        gin_utils.query("DISTILL_FILES")
    return model_dir


def main(argv: Sequence[str]) -> int:
    """Flags and gin from argv, then train (or only export); see console_main for how errors are shown."""
    files, bindings, paths, rest = gin_utils.split_gin_args(argv)
    flags = _flags(rest)
    if not files and not bindings and not flags.export_only:
        gin_utils.parse_gin_flags([], [])  # raises: every run is a gin file
    if flags.unknown:
        raise OptionError(f"unknown arguments {flags.unknown} (twolar-train --help lists the flags; gin "
                          "parameters go as --gin.NAME=VALUE)")
    entry.start(flags)
    partitioning.initialize_distributed(coordinator_address=flags.coordinator_address,
                                        process_count=flags.process_count, process_index=flags.process_index,
                                        multiprocess=flags.multiprocess)
    train_fn = register_configurables()["train"]
    if flags.export_only:
        print(_export_only(flags, files, bindings, paths))
        return 0
    gin_utils.parse_gin_flags(files, bindings + _flag_bindings(flags), paths)
    model_dir = _check_before_writing(flags)
    entry.on_interrupt(f"no step since the last checkpoint in {model_dir or 'MODEL_DIR'} was saved")
    result = train_fn(**({"export_hf_dir": flags.export_hf} if flags.export_hf else {}))
    if result.stopped_by:
        print(f"stopped at step {result.step} by {result.stopped_by}: its checkpoint is saved in "
              f"{result.model_dir}; run the same command again to resume", file=sys.stderr)
        return stop_signals.exit_code(result.stopped_by)
    print(f"done: step {result.step}, train {result.train_metrics}, eval {result.eval_metrics}")
    return 0


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """`twolar-train` console script, `twolar train` and `python -m twolar_jax.train`: exit code 0, or 2 with
    one line on stderr for a user error (--debug: with the traceback)."""
    return entry.run_console("twolar-train", main, argv)


if __name__ == "__main__":
    sys.exit(console_main())
