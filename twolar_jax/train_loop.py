"""The training loop: batches in, sharded steps, metrics windows, checkpoints and periodic validation.

Host work is kept off the device's critical path: metrics stay on device until a logging window
closes (one transfer per window), checkpoints are written by orbax in the background, and each batch
is checked on the host before anything is traced (a data bug is a message, not an XLA error).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import jax
import numpy as np

from twolar_jax import checkpointing, host_heap, partitioning, summaries, trainer
from twolar_jax.checkpointing import CheckpointConfig
from twolar_jax.errors import check_choice
from twolar_jax.lockstep_batches import lockstep_batches
from twolar_jax.stop_signals import StopRequest
from twolar_jax.train_setup import RunSetup, StartState
from twolar_jax.train_state import TrainState

log = logging.getLogger("twolar_jax.train")


class BatchSource(Protocol):
    """A data source: called with this host's shard and the number of batches to skip."""

    def __call__(self, *, shard_index: int, num_shards: int,
                 skip_batches: int) -> Iterator[Mapping[str, np.ndarray]]:
        ...


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Periodic validation (`train.validation = @ValidationConfig()`): the query-weighted mean of the eval
    metrics over (up to `max_batches` of) `batches`, every `period` steps, at the end, and at the start
    when `at_start`."""

    batches: BatchSource
    period: int = 0
    max_batches: Optional[int] = None
    at_start: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """What a run reports (`train.logging = @LoggingConfig()`): metrics every `period` steps (JSONL and,
    with `tensorboard`, TensorBoard), a tqdm bar, and the operative gin config in MODEL_DIR."""

    period: int = 10
    progress: bool = True
    tensorboard: bool = True
    write_gin_config: bool = True


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int
    batches_consumed: int
    last_train: dict[str, float]
    last_eval: Optional[dict[str, float]]
    stopped_early: bool  # the data ran out before total_steps
    batches_without_pairs: int = 0  # batches skipped (model unchanged) with groups_without_pairs='skip'
    stopped_by: Optional[str] = None  # the signal ("SIGTERM", "SIGINT") that stopped the run at `step`


class ShapeGuard:
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


class MetricsWindow:
    """Device metrics of the steps since the last log line, fetched in one transfer when the window closes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[tuple[int, Any]] = []
        self.t0, self.examples, self.tokens = time.perf_counter(), 0, 0

    def add(self, step: int, metrics: Any, host_batch: Mapping[str, np.ndarray]) -> None:
        self.pending.append((step, metrics))
        tokens = host_batch["encoder_input_tokens"]
        self.examples += tokens.shape[0] * jax.process_count()
        self.tokens += int(np.count_nonzero(tokens)) * jax.process_count()

    def flush(self, writer: summaries.SummaryWriter) -> dict[str, float]:
        """Write one record per step (throughput on the last) and return the last; empties the window."""
        fetched = jax.device_get([m for _, m in self.pending])
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        last: dict[str, float] = {}
        for i, ((step, _), values) in enumerate(zip(self.pending, fetched)):
            last = {k: float(v) for k, v in values.items()}
            if i == len(self.pending) - 1:
                last.update(examples_per_second=self.examples / elapsed, tokens_per_second=self.tokens / elapsed,
                            steps_per_second=len(self.pending) / elapsed)
            writer.scalars(step, last)
        writer.flush()
        self.reset()
        return last


def validate(setup: RunSetup, eval_step: Callable, params: Any, validation: ValidationConfig,
             compiled: dict) -> dict[str, float]:
    """Query-weighted means of the eval metrics over (up to max_batches of) the validation data.

    Every host steps through its shard's batches in lockstep with the others, each batch padded to one
    shape the batch sharding divides (`lockstep_batches`: a short last batch, or shards of different sizes)."""
    totals: dict[str, float] = {}
    weight = 0.0
    source = validation.batches(shard_index=jax.process_index(), num_shards=jax.process_count(), skip_batches=0)
    if validation.max_batches is not None:
        source = itertools.islice(source, validation.max_batches)
    batches = lockstep_batches(source, parallelism=partitioning.batch_parallelism(setup.mesh, setup.rules),
                               process_count=jax.process_count())
    for batch in batches:
        key = tuple((k, np.shape(v)) for k, v in sorted(batch.items()))
        fresh = key not in compiled
        if fresh:
            compiled[key] = trainer.partition_eval_step(eval_step, setup.mesh, setup.rules,
                                                        setup.shardings.params, batch)
        metrics = jax.device_get(compiled[key](params, partitioning.shard_batch(batch, setup.mesh, setup.rules)))
        if fresh:
            host_heap.trim()  # a new shape compiled: its garbage back to the system, when the heap is kept
        n = float(metrics["num_queries"])
        if n == 0:  # no query with a pair (padding alone): its means are undefined and weigh nothing
            continue
        for k, v in metrics.items():
            if k != "num_queries":
                totals[k] = totals.get(k, 0.0) + float(v) * n
        weight += n
    if weight == 0:
        raise trainer.BatchError("validation: the source yielded no batch with a ranked query")
    return {**{k: v / weight for k, v in totals.items()}, "num_queries": weight}


class Validator:
    """Validation bound to a run: compiles the eval step once per batch shape and logs to its writer."""

    def __init__(self, setup: RunSetup, validation: Optional[ValidationConfig],
                 writer: Optional[summaries.SummaryWriter]):
        self.setup, self.validation, self.writer = setup, validation, writer
        self.eval_step = trainer.make_eval_step(setup.config, setup.spec) if validation else None
        self.compiled: dict = {}
        self.last: Optional[dict[str, float]] = None
        self.last_step: Optional[int] = None

    def __call__(self, step: int, params: Any) -> None:
        if self.validation is None:
            return
        self.last = validate(self.setup, self.eval_step, params, self.validation, self.compiled)
        self.last_step = step
        self.writer.scalars(step, self.last)

    def due(self, step: int) -> bool:
        return bool(self.validation and self.validation.period and step % self.validation.period == 0)


class PairCheck:
    """What to do with a batch in which no query has two real passages (nothing to compare).

    "error" (the default) stops with a message naming the batch and the option; "skip" logs and counts
    it, and the step leaves the model and optimizer state unchanged (trainer.make_train_step). Checked
    on this host's batch, before anything is placed on devices.
    """

    def __init__(self, policy: str, where: str = "train"):
        check_choice("train.groups_without_pairs", policy, trainer.GROUPS_WITHOUT_PAIRS)
        self.policy, self.where, self.skipped = policy, where, 0

    def __call__(self, batch: Mapping[str, Any], index: int) -> None:
        if trainer.count_ranked_queries(batch["passage_mask"]) > 0:
            return
        if self.policy == "error":
            raise trainer.BatchError(
                f"{self.where} batch {index}: no query has two real passages (passage_mask), so there is no pair "
                "to learn from; fix the data, or set train.groups_without_pairs='skip' "
                "(twolar-train --groups_without_pairs=skip) to skip such batches")
        self.skipped += 1
        log.warning("%s batch %d: no query has two real passages; its step leaves the model unchanged "
                    "(train.groups_without_pairs='skip'; %d such batches so far)", self.where, index, self.skipped)


def run_loop(setup: RunSetup, start: StartState, *, train_batches: BatchSource, total_steps: int,
             dropout_rng: jax.Array, manager, checkpoints: CheckpointConfig, logging_config: LoggingConfig,
             writer: summaries.SummaryWriter, validator: Validator,
             on_first_step: Callable[[int], None] = lambda step: None,
             groups_without_pairs: str = "error", stop: Optional[StopRequest] = None) -> LoopResult:
    """Steps from the start state to total_steps (or until the data runs out, or `stop` says so after a
    step: the caller then saves that step), checkpointing and validating."""
    from twolar_jax.progress import progress_bar

    pair_check = PairCheck(groups_without_pairs)

    state, step, consumed = start.state, int(jax.device_get(start.state.step)), start.batches_consumed
    first_step = step
    guard = ShapeGuard("train", num_microbatches=setup.spec.num_microbatches,
                       batch_parallelism=partitioning.batch_parallelism(setup.mesh, setup.rules))
    train_step = trainer.make_train_step(setup.config, setup.optimizer, setup.schedule, setup.spec)
    step_fn, window, last_train, stopped_early, stopped_by = None, MetricsWindow(), {}, False, None
    iterator = iter(train_batches(shard_index=jax.process_index(), num_shards=jax.process_count(),
                                  skip_batches=consumed)) if step < total_steps else iter(())
    bar = progress_bar(total=total_steps, initial=step, desc="train",
                       disable=not (logging_config.progress and jax.process_index() == 0))
    try:
        while step < total_steps:
            try:
                host_batch = guard(next(iterator), consumed)
            except StopIteration:
                stopped_early = True
                log.warning("training data ran out after %d batches, at step %d of %d", consumed, step, total_steps)
                break
            pair_check(host_batch, consumed)
            if step_fn is None:
                step_fn = trainer.partition_train_step(train_step, setup.mesh, setup.rules, setup.shardings,
                                                       host_batch)
            state, metrics = step_fn(state, partitioning.shard_batch(host_batch, setup.mesh, setup.rules),
                                     dropout_rng)
            consumed, step = consumed + 1, step + 1
            window.add(step, metrics, host_batch)
            if step == first_step + 1:
                host_heap.trim()  # the compiler's freed memory back to the system, when the heap is kept
                on_first_step(step)
            if step % max(1, logging_config.period) == 0 or step == total_steps:
                last_train = window.flush(writer)
                bar.set_postfix(loss=f"{last_train['loss']:.4f}", tau=f"{last_train['kendall_tau']:.3f}")
            bar.update(1)
            if checkpointing.save(manager, state, data_state={"batches_consumed": consumed},
                                  period=checkpoints.period):
                log.info("checkpoint for step %d started in %s", step, manager.directory)
            if stop is not None and stop.due(step):
                stopped_by = stop.name
                log.warning("stopping at step %d of %d (%s)", step, total_steps, stopped_by)
                break
            if validator.due(step):
                validator(step, state.params)
    except BaseException:
        bar.fail()
        raise
    finally:
        bar.close()
        if window.pending:  # also on an interrupt: keep the metrics of the steps that did run
            last_train = window.flush(writer)
    if pair_check.skipped:
        log.warning("%d training batches had no query with two real passages and left the model unchanged",
                    pair_check.skipped)
    return LoopResult(state, step, consumed, last_train, validator.last, stopped_early, pair_check.skipped, stopped_by)
