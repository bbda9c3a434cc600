r"""Distillation training entry point (t5x style).

    python -m twolar_jax.train --gin_file=experiments/twolar_flan_t5_base_rank_net.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.DISTILL_JSONL="'/data/distill.jsonl'"

`train(...)` is a plain keyword-only function (importable and testable); only this module's
program entry registers it (and the data source `seqio_batches`) with gin. Multi-host: pass
--multiprocess (plus --coordinator_address/--process_count/--process_index on bare GPU hosts); each
host reads its own data shard (shard_index = jax.process_index()). See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import numpy as np

from twolar_jax import checkpointing, optimizers, partitioning, summaries, train_state, trainer
from twolar_jax.model import network
from twolar_jax.model.config import T5Config, preset

log = logging.getLogger("twolar_jax.train")


class BatchSource(Protocol):
    """A data source: called with this host's shard and the number of batches to skip."""

    def __call__(self, *, shard_index: int, num_shards: int, skip_batches: int) -> Iterator[Mapping[str, np.ndarray]]:
        ...


@dataclasses.dataclass
class TrainResult:
    step: int
    model_dir: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float] | None
    batches_consumed: int
    stopped_early: bool = False  # the data ran out before total_steps


def resolve_model_config(model: str | T5Config | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> T5Config:
    """A preset name ('tiny', 'flan-t5-base', ...), a T5Config or its dict, plus field overrides."""
    if isinstance(model, T5Config):
        config = model
    elif isinstance(model, str):
        config = preset(model)
    elif isinstance(model, Mapping):
        config = T5Config.from_dict(model)
    else:
        raise TypeError(f"model: expected a preset name, T5Config or dict, got {type(model).__name__}")
    return config.replace(**dict(overrides)) if overrides else config


def seqio_batches(
    *,
    task_or_mixture: str,
    split: str,
    batch_size: int,
    group_size: int,
    max_length: int,
    shuffle: bool = True,
    seed: int | None = 0,
    repeat: bool = True,
    distill_jsonl: str | None = None,
    validation_jsonl: str | None = None,
    truncation: str = "document",
    padding: str = "mask",
    shard_index: int,
    num_shards: int,
    skip_batches: int,
) -> Iterator[Mapping[str, np.ndarray]]:
    """Batches of a seqio distillation task (data_pipeline); registers the JSONL tasks first if given.

    Imported lazily: the trainer itself never imports TensorFlow.
    """
    from data_pipeline.dataset import get_distill_batches

    if distill_jsonl:
        from data_pipeline.tasks import register_distill_tasks

        register_distill_tasks(train_path=distill_jsonl, validation_path=validation_jsonl or None,
                               group_size=group_size, max_length=max_length, truncation=truncation, padding=padding)
    return get_distill_batches(
        task_or_mixture=task_or_mixture, split=split, batch_size=batch_size, group_size=group_size,
        max_length=max_length, seed=seed, shuffle=shuffle, shard_index=shard_index, num_shards=num_shards,
        skip_batches=skip_batches, repeat=repeat)


class _ShapeGuard:
    """Full validation of the first batch, cheap shape checks after (a new shape would recompile)."""

    def __init__(self, where: str, *, num_microbatches: int, batch_parallelism: int):
        self.where, self.first = where, None
        self.num_microbatches, self.batch_parallelism = num_microbatches, batch_parallelism

    def __call__(self, batch: Mapping[str, Any], index: int) -> dict[str, Any]:
        batch = trainer.select_features(batch)
        shapes = {k: np.shape(v) for k, v in batch.items()}
        if self.first is None:
            trainer.validate_batch(batch, where=f"{self.where} batch {index}")
            b = shapes["encoder_input_tokens"][0] * jax.process_count()
            micro = b // self.num_microbatches if b % self.num_microbatches == 0 else None
            if micro is None or micro % self.batch_parallelism:
                raise trainer.BatchError(
                    f"{self.where}: global batch of {b} queries must split into num_microbatches="
                    f"{self.num_microbatches} micro-batches that divide over the {self.batch_parallelism}-way "
                    f"batch sharding of the mesh")
            self.first = shapes
        elif shapes != self.first:
            trainer.validate_batch(batch, where=f"{self.where} batch {index}")
            raise trainer.BatchError(f"{self.where} batch {index}: shapes {shapes} differ from the first batch's "
                                     f"{self.first}; batches must have static shapes (drop_remainder)")
        return batch


def _log_window(pending: list[tuple[int, Any]], writer: summaries.SummaryWriter, *, t0: float,
                examples: int, tokens: int) -> dict[str, float]:
    """Fetch the window's metrics in one transfer and write one record per step; throughput on the last."""
    fetched = jax.device_get([m for _, m in pending])
    elapsed = max(time.perf_counter() - t0, 1e-9)
    last: dict[str, float] = {}
    for i, ((step, _), values) in enumerate(zip(pending, fetched)):
        last = {k: float(v) for k, v in values.items()}
        if i == len(pending) - 1:
            last["examples_per_second"] = examples / elapsed
            last["tokens_per_second"] = tokens / elapsed
            last["steps_per_second"] = len(pending) / elapsed
        writer.scalars(step, last)
    writer.flush()
    return last


def evaluate(
    eval_fn_cache: dict, eval_step: Callable, params: Any, param_shardings: Any, source: BatchSource, *,
    mesh, rules, max_batches: int | None,
) -> dict[str, float]:
    """Query-weighted means of the eval metrics over (up to max_batches of) the validation data."""
    totals: dict[str, float] = {}
    weight = 0.0
    iterator = source(shard_index=jax.process_index(), num_shards=jax.process_count(), skip_batches=0)
    for i, host_batch in enumerate(iterator):
        if max_batches is not None and i >= max_batches:
            break
        batch = trainer.select_features(host_batch)
        trainer.validate_batch(batch, where=f"validation batch {i}")
        key = tuple((k, np.shape(v)) for k, v in sorted(batch.items()))
        if key not in eval_fn_cache:
            eval_fn_cache[key] = trainer.partition_eval_step(eval_step, mesh, rules, param_shardings, batch)
        metrics = jax.device_get(eval_fn_cache[key](params, partitioning.shard_batch(batch, mesh, rules)))
        n = float(metrics["num_queries"])
        for k, v in metrics.items():
            if k != "num_queries":
                totals[k] = totals.get(k, 0.0) + float(v) * n
        weight += n
    if weight == 0:
        raise ValueError("validation: the source yielded no batch")
    return {**{k: v / weight for k, v in totals.items()}, "num_queries": weight}


def _seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init rng, dropout rng) of a run: the one place that derives them from the seed."""
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def initial_params(config: T5Config, seed: int) -> Any:
    """The parameters a run with this seed starts from (no init_checkpoint): "student before training"."""
    return network.init_params(config, _seed_rngs(seed)[0])


def train(
    *,
    model_dir: str,
    train_batches: BatchSource,
    total_steps: int,
    model: str | T5Config | Mapping[str, Any] = "tiny",
    model_overrides: Mapping[str, Any] | None = None,
    init_checkpoint: str | None = None,
    eval_batches: BatchSource | None = None,
    eval_period: int = 0,
    eval_max_batches: int | None = None,
    eval_at_start: bool = False,
    num_microbatches: int = 1,
    optimizer: str = "adamw",
    learning_rate: float = 5e-5,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    clip_norm: float | None = 1.0,
    optimizer_options: Mapping[str, Any] | None = None,
    loss: str = "rank_net",
    loss_options: Mapping[str, Any] | None = None,
    score_head: str = "difference",
    enable_dropout: bool = True,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    num_devices: int | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    seed: int = 0,
    save_period: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpoints: bool = True,
    resume: bool = True,
    log_period: int = 10,
    progress: bool = True,
    tensorboard: bool = True,
    write_gin_config: bool = True,
    export_hf_dir: str | None = None,
) -> TrainResult:
    """Train a T5 student on teacher-ordered passage groups; resumes from MODEL_DIR's latest checkpoint.

    A step is one optimizer update over a global batch (all hosts' batches together), split into
    `num_microbatches` for gradient accumulation. The mesh spans all devices unless `num_devices`
    picks the first few (single-process only). The data position (batches consumed) is saved with
    each checkpoint and passed back to `train_batches(skip_batches=...)` on resume.
    """
    from tqdm.auto import tqdm

    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    config = resolve_model_config(model, model_overrides)
    rules = partitioning.normalize_rules(logical_axis_rules or partitioning.load_logical_axis_rules())
    mesh = partitioning.make_mesh(mesh_shape, devices=_devices(num_devices))
    is_chief = jax.process_index() == 0
    log.info("mesh %s over %d devices (%d processes)", partitioning.mesh_shape_str(mesh), mesh.size,
             jax.process_count())
    if is_chief:
        checkpointing.write_model_config(model_dir, config)

    opt, schedule = optimizers.make_optimizer(
        name=optimizer, learning_rate=learning_rate, schedule=lr_schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, weight_decay=weight_decay, clip_norm=clip_norm, **dict(optimizer_options or {}))
    spec = trainer.make_step_spec(loss=loss, loss_options=loss_options, score_head=score_head,
                                  num_microbatches=num_microbatches, enable_dropout=enable_dropout,
                                  score_tokens=_score_tokens())
    init_rng, dropout_rng = _seed_rngs(seed)
    init_fn = lambda r: network.init_params(config, r)  # noqa: E731
    shapes = train_state.abstract_state(init_fn, opt, init_rng)
    shardings = train_state.state_shardings(shapes, network.logical_axes(config), mesh, rules)

    manager = checkpointing.make_manager(model_dir, max_to_keep=keep_checkpoints,
                                         async_save=async_checkpoints)
    consumed = 0
    restored = checkpointing.restore(manager, train_state.with_shardings(shapes, shardings)) if resume else None
    if restored is not None:
        state, meta = restored
        consumed = int(meta.get("batches_consumed", meta["step"]))
        log.info("resumed from step %d (%d batches consumed)", meta["step"], consumed)
    elif init_checkpoint:
        from twolar_jax.hf_conversion import load_hf_checkpoint

        ckpt_config, params = load_hf_checkpoint(init_checkpoint, scan_layers=config.scan_layers)
        if ckpt_config.replace(**_runtime_fields(config)) != config:
            raise ValueError(f"init_checkpoint {init_checkpoint}: its config {ckpt_config} does not match the model {config}")
        state = train_state.place_params(params, opt, shardings)
    else:
        state = train_state.init_sharded_state(init_fn, opt, init_rng, shardings)
    start_step = int(jax.device_get(state.step))

    writer = summaries.SummaryWriter(model_dir, "train", tensorboard=tensorboard)
    eval_writer = summaries.SummaryWriter(model_dir, "validation", tensorboard=tensorboard) if eval_batches else None
    train_step = trainer.make_train_step(config, opt, schedule, spec)
    eval_step = trainer.make_eval_step(config, spec) if eval_batches else None
    eval_cache: dict = {}
    guard = _ShapeGuard("train", num_microbatches=num_microbatches,
                        batch_parallelism=partitioning.batch_parallelism(mesh, rules))
    step_fn = None
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] | None = None
    stopped_early = False
    step = start_step
    pending: list[tuple[int, Any]] = []
    window_t0, window_examples, window_tokens = time.perf_counter(), 0, 0
    try:
        if eval_step is not None and eval_at_start and step < total_steps:
            last_eval = evaluate(eval_cache, eval_step, state.params, shardings.params, eval_batches,
                                 mesh=mesh, rules=rules, max_batches=eval_max_batches)
            eval_writer.scalars(step, last_eval)
        iterator = iter(train_batches(shard_index=jax.process_index(), num_shards=jax.process_count(),
                                      skip_batches=consumed)) if step < total_steps else iter(())
        bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not (progress and is_chief),
                   dynamic_ncols=True)
        while step < total_steps:
            try:
                host_batch = next(iterator)
            except StopIteration:
                stopped_early = True
                log.warning("training data ran out after %d batches, at step %d of %d", consumed, step, total_steps)
                break
            batch = guard(host_batch, consumed)
            if step_fn is None:
                step_fn = trainer.partition_train_step(train_step, mesh, rules, shardings, batch)
            global_batch = partitioning.shard_batch(batch, mesh, rules)
            state, metrics = step_fn(state, global_batch, dropout_rng)
            consumed += 1
            step += 1
            pending.append((step, metrics))
            b, n, length = global_batch["encoder_input_tokens"].shape
            window_examples += b
            window_tokens += int(np.sum(batch["encoder_input_tokens"] != 0)) * jax.process_count()
            if step == start_step + 1 and write_gin_config and is_chief:
                _write_gin_config(model_dir, writer, step)
            if step % max(1, log_period) == 0 or step == total_steps:
                last_train = _log_window(pending, writer, t0=window_t0, examples=window_examples, tokens=window_tokens)
                bar.set_postfix(loss=f"{last_train['loss']:.4f}", tau=f"{last_train['kendall_tau']:.3f}")
                pending, window_t0, window_examples, window_tokens = [], time.perf_counter(), 0, 0
            bar.update(1)
            checkpointing.save(manager, state, data_state={"batches_consumed": consumed}, period=save_period)
            if eval_step is not None and eval_period and step % eval_period == 0:
                last_eval = evaluate(eval_cache, eval_step, state.params, shardings.params, eval_batches,
                                     mesh=mesh, rules=rules, max_batches=eval_max_batches)
                eval_writer.scalars(step, last_eval)
        bar.close()
        if pending:
            last_train = _log_window(pending, writer, t0=window_t0, examples=window_examples, tokens=window_tokens)
            pending = []
        if step > start_step and manager.latest_step() != step:
            checkpointing.save(manager, state, data_state={"batches_consumed": consumed}, force=True)
        if eval_step is not None and (last_eval is None or not eval_period or step % eval_period):
            last_eval = evaluate(eval_cache, eval_step, state.params, shardings.params, eval_batches,
                                 mesh=mesh, rules=rules, max_batches=eval_max_batches)
            eval_writer.scalars(step, last_eval)
        if write_gin_config and is_chief:
            _write_gin_config(model_dir, writer, step)
    finally:
        if pending:  # interrupted: keep the metrics of the steps that did run
            _log_window(pending, writer, t0=window_t0, examples=window_examples, tokens=window_tokens)
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if eval_writer is not None:
            eval_writer.close()
    if export_hf_dir and is_chief:
        checkpointing.export_hf(model_dir, export_hf_dir)
        log.info("exported step %d to %s", step, export_hf_dir)
    return TrainResult(step=step, model_dir=str(model_dir), train_metrics=last_train, eval_metrics=last_eval,
                       batches_consumed=consumed, stopped_early=stopped_early)


def _devices(num_devices: int | None) -> list[jax.Device] | None:
    """All devices, or the first `num_devices` (single-process debugging and tests only)."""
    if num_devices is None:
        return None
    if jax.process_count() > 1:
        raise ValueError("num_devices is for single-process runs; multi-host meshes use every device")
    if not 1 <= num_devices <= jax.device_count():
        raise ValueError(f"num_devices={num_devices}: {jax.device_count()} devices are available")
    return jax.devices()[:num_devices]


def _runtime_fields(config: T5Config) -> dict[str, Any]:
    """Fields a run may set differently from the checkpoint it starts from (how it computes, not what)."""
    return {"dtype": config.dtype, "remat": config.remat, "dropout_rate": config.dropout_rate,
            "attention": config.attention, "scan_layers": config.scan_layers}


def _score_tokens():
    from twolar_jax.scoring import resolve_score_tokens
    from twolar_jax.tokenizer import T5Tokenizer

    return resolve_score_tokens(T5Tokenizer())


def _write_gin_config(model_dir: str, writer: summaries.SummaryWriter, step: int) -> None:
    import gin

    from twolar_jax.gin_utils import write_operative_config

    text = gin.operative_config_str()
    if text.strip():
        write_operative_config(model_dir)
        writer.text(step, "gin/operative_config", "    " + text.replace("\n", "\n    "))


# ------------------------------------------------------------------------------------- program
_REGISTERED: dict[str, Callable] = {}


def register_configurables() -> dict[str, Callable]:
    """Register `train` and `seqio_batches` with gin (idempotent); only the program entry calls this."""
    if not _REGISTERED:
        import gin

        from twolar_jax import gin_configurables  # noqa: F401  (T5Config, model_preset for gin/models/*)

        _REGISTERED["train"] = gin.external_configurable(train, name="train", module="twolar_jax.train")
        _REGISTERED["seqio_batches"] = gin.external_configurable(seqio_batches, name="seqio_batches",
                                                                 module="twolar_jax.train")
    return _REGISTERED


def _flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twolar-train", description="Distil teacher rankings into a T5 student.")
    parser.add_argument("--multiprocess", action="store_true", help="call jax.distributed.initialize")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--process_count", type=int, default=None)
    parser.add_argument("--process_index", type=int, default=None)
    parser.add_argument("--export_hf", default=None, metavar="DIR",
                        help="after training, write the last checkpoint as an HF T5 directory")
    parser.add_argument("--export_only", action="store_true",
                        help="do not train: export MODEL_DIR's checkpoint (--export_step or latest) to --export_hf")
    parser.add_argument("--export_step", type=int, default=None)
    parser.add_argument("--log_level", default="INFO")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> None:
    flags = _flags(argv)
    logging.basicConfig(level=flags.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    partitioning.initialize_distributed(coordinator_address=flags.coordinator_address,
                                        process_count=flags.process_count, process_index=flags.process_index,
                                        multiprocess=flags.multiprocess)
    train_fn = register_configurables()["train"]
    if flags.export_only:
        import gin

        if not flags.export_hf:
            raise SystemExit("--export_only needs --export_hf=DIR")
        model_dir = gin.query_parameter("twolar_jax.train.train.model_dir")
        if hasattr(model_dir, "scoped_configurable_fn"):  # a %MACRO reference
            model_dir = model_dir.scoped_configurable_fn()
        out = checkpointing.export_hf(model_dir, flags.export_hf, flags.export_step)
        print(f"exported {model_dir} -> {out}")
        return
    result = train_fn(**({"export_hf_dir": flags.export_hf} if flags.export_hf else {}))
    print(f"done: step {result.step}, train {result.train_metrics}, eval {result.eval_metrics}")


def console_main(argv: Sequence[str] | None = None) -> None:
    """`twolar-train` console script, `twolar train` and `python -m twolar_jax.train`."""
    from twolar_jax import gin_utils

    register_configurables()
    gin_utils.run(main, argv)


if __name__ == "__main__":
    console_main()
