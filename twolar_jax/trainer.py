"""The trainer: one object that owns a run's partitioned steps, its loop, validation and checkpoints, for
any ranking model (twolar_jax.ranking.interface).

`Trainer(model, partitioner, ...)` lays out the abstract train state by the model's logical axes (nothing
allocated), then `fit` restores MODEL_DIR's latest checkpoint (or starts from an init checkpoint, or fresh),
steps to `total_steps` (or until the data runs out, or a stop signal: that step is saved), validates every
`period` steps and at the end, and writes the metrics. Restores go onto abstract targets built from the
*current* mesh and rules, so a checkpoint written on one layout resumes on another (t5x/MaxText habit).
The gin entry, signals and the HF export are `train.py`'s.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Optional

import jax
import numpy as np

from twolar_jax import checkpointing, dir_lock, host_heap, summaries, train_state
from twolar_jax.checkpointing import CheckpointConfig
from twolar_jax.errors import OptionError
from twolar_jax.lockstep_batches import lockstep_batches
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.partitioner import PartitionedFunction, Partitioner
from twolar_jax.ranking.features import BatchError
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.stop_signals import StopRequest
from twolar_jax.train_loop import (BatchCheck, BatchSource, LoggingConfig, LoopResult, MetricsWindow,
                                   ValidationConfig)
from twolar_jax.train_state import TrainState
from twolar_jax.train_step import make_eval_step, make_train_step, step_rngs

__all__ = ["BatchError", "StartState", "Trainer", "initial_params"]
log = logging.getLogger("twolar_jax.train")
Hook = Callable[[int, summaries.SummaryWriter], Any]


@dataclasses.dataclass
class StartState:
    """Where the loop starts: the state, how many batches were consumed, and the step it was restored from."""

    state: TrainState
    batches_consumed: int
    restored_step: Optional[int]  # None: a fresh start (random init or an init checkpoint)


def initial_params(model: RankingModel, seed: int) -> Any:
    """The parameters a run with this seed starts from (no init_checkpoint): "student before training"."""
    return model.init_params(step_rngs(seed)[0])


class Trainer:
    """A run's static parts (model, partitioner, optimizer, the state's layout) and its partitioned steps."""

    def __init__(self, model: RankingModel, partitioner: Partitioner, *, optimizer: OptimizerConfig,
                 total_steps: int, num_microbatches: int = 1, enable_dropout: bool = True, seed: int = 0):
        if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise OptionError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
        self.model, self.partitioner, self.seed = model, partitioner, seed
        self.num_microbatches = num_microbatches
        self.tx, self.schedule = optimizer.build(total_steps)
        self.init_rng, self.dropout_rng = step_rngs(seed)
        self.shapes = train_state.abstract_state(model.init_params, self.tx, self.init_rng)
        self.shardings = train_state.state_shardings(self.shapes, model.param_logical_axes(), partitioner.mesh,
                                                     partitioner.rules)
        self._train_fn = make_train_step(model, self.tx, self.schedule, num_microbatches=num_microbatches,
                                         enable_dropout=enable_dropout)
        self._eval_fn = make_eval_step(model)
        self._train_step: Optional[PartitionedFunction] = None
        self._eval_steps: dict[tuple, PartitionedFunction] = {}
        self.validation: Optional[ValidationConfig] = None
        self.last_eval: Optional[dict[str, float]] = None
        self.last_eval_step: Optional[int] = None
        log.info("mesh %s over %d devices (%d processes)", partitioner.describe(), partitioner.mesh.size,
                 jax.process_count())

    # --- the partitioned steps --------------------------------------------------------------------
    def train_step(self, batch_like: Any) -> PartitionedFunction:
        """The train step, partitioned for batches shaped like `batch_like`; the state is donated."""
        if self._train_step is None:
            p = self.partitioner
            batch_sh = p.batch_shardings(batch_like, self.model.batch_features)
            self._train_step = p.partition(self._train_fn, in_shardings=(self.shardings, batch_sh, p.replicated()),
                                           out_shardings=(self.shardings, p.replicated()), donate_argnums=(0,))
        return self._train_step

    def eval_step(self, batch_like: Any) -> PartitionedFunction:
        """The eval step for one batch shape (a validation set's last batch may have its own)."""
        key = tuple((k, np.shape(v)) for k, v in sorted(batch_like.items()))
        if key not in self._eval_steps:
            p = self.partitioner
            batch_sh = p.batch_shardings(batch_like, self.model.batch_features)
            self._eval_steps[key] = p.partition(self._eval_fn, in_shardings=(self.shardings.params, batch_sh),
                                                out_shardings=p.replicated())
        return self._eval_steps[key]

    def shard(self, host_batch: Any) -> dict[str, jax.Array]:
        return self.partitioner.shard_batch(host_batch, self.model.batch_features)

    @property
    def restore_target(self) -> TrainState:
        return train_state.with_shardings(self.shapes, self.shardings)

    # --- the start --------------------------------------------------------------------------------
    def start(self, manager: Any, *, resume: bool, init_checkpoint: Optional[str]) -> StartState:
        """MODEL_DIR's latest checkpoint when there is one (and `resume`), else init_checkpoint, else random."""
        restored = checkpointing.restore(manager, self.restore_target) if resume else None
        if restored is not None:
            state, meta = restored
            consumed = int(meta.get("batches_consumed", meta["step"]))
            log.info("resumed from step %d (checkpoint %s/%d, %d batches consumed)", meta["step"],
                     manager.directory, meta["step"], consumed)
            return StartState(state, consumed, int(meta["step"]))
        if init_checkpoint:
            params = self.model.load_init_checkpoint(init_checkpoint)
            log.info("initialised from the checkpoint %s", init_checkpoint)
            return StartState(train_state.place_params(params, self.tx, self.shardings), 0, None)
        state = train_state.init_sharded_state(self.model.init_params, self.tx, self.init_rng, self.shardings)
        return StartState(state, 0, None)

    # --- validation -------------------------------------------------------------------------------
    def evaluate(self, params: Any, validation: ValidationConfig) -> dict[str, float]:
        """Query-weighted means of the eval metrics over (up to max_batches of) the validation data.

        Every host steps through its shard's batches in lockstep with the others, each batch padded to one
        shape the batch sharding divides (`lockstep_batches`: a short last batch, or shards of different sizes)."""
        totals: dict[str, float] = {}
        weight = 0.0
        source = validation.batches(shard_index=jax.process_index(), num_shards=jax.process_count(), skip_batches=0)
        if validation.max_batches is not None:
            source = itertools.islice(source, validation.max_batches)
        for batch in lockstep_batches(source, parallelism=self.partitioner.batch_parallelism,
                                      process_count=jax.process_count(), features=self.model.batch_features):
            fresh = len(self._eval_steps)
            metrics = jax.device_get(self.eval_step(batch)(params, self.shard(batch)))
            if len(self._eval_steps) > fresh:
                host_heap.trim()  # a new shape compiled: its garbage back to the system, when the heap is kept
            n = float(metrics["num_queries"])
            if n == 0:  # nothing weighed (padding alone): its means are undefined and weigh nothing
                continue
            for k, v in metrics.items():
                if k != "num_queries":
                    totals[k] = totals.get(k, 0.0) + float(v) * n
            weight += n
        if weight == 0:
            raise BatchError("validation: the source yielded no batch with a ranked query")
        return {**{k: v / weight for k, v in totals.items()}, "num_queries": weight}

    def validate(self, step: int, params: Any, writer: Optional[summaries.SummaryWriter]) -> None:
        if self.validation is None:
            return
        self.last_eval, self.last_eval_step = self.evaluate(params, self.validation), step
        if writer is not None:
            writer.scalars(step, self.last_eval)

    def validation_due(self, step: int) -> bool:
        v = self.validation
        return bool(v and v.period and step % v.period == 0)

    # --- the run ----------------------------------------------------------------------------------
    def fit(self, *, model_dir: str, train_batches: BatchSource, total_steps: int,
            checkpoints: CheckpointConfig = CheckpointConfig(), logging_config: LoggingConfig = LoggingConfig(),
            validation: Optional[ValidationConfig] = None, init_checkpoint: Optional[str] = None,
            groups_without_pairs: str = "error", stop: Optional[StopRequest] = None,
            on_first_step: Hook = lambda step, writer: None, on_finish: Hook = lambda step, writer: None) -> LoopResult:
        """Restore or start, step, checkpoint, validate and finish (the last checkpoint and validation, then
        `on_finish`); the checkpoint manager and the metric writers are closed on any exit, a started save
        finished. MODEL_DIR is locked for the whole call (`model_dir_lock`: a second job refuses, a crashed
        one's lock goes with its process). The hooks get the step and the train writer (train.py writes the
        operative gin config)."""
        self.validation = validation
        check = BatchCheck(self.model, num_microbatches=self.num_microbatches,
                           batch_parallelism=self.partitioner.batch_parallelism,
                           groups_without_pairs=groups_without_pairs)
        lock = model_dir_lock(model_dir)  # before any write: a second job on this MODEL_DIR refuses here
        writers: list[summaries.SummaryWriter] = []
        manager = None
        try:
            config = self.model.checkpoint_config()
            if config is not None and jax.process_index() == 0:
                checkpointing.write_model_config(model_dir, config)
            manager = checkpointing.make_manager(model_dir, max_to_keep=checkpoints.keep,
                                                 async_save=checkpoints.async_save)
            start = self.start(manager, resume=checkpoints.resume, init_checkpoint=init_checkpoint)
            start_step = int(jax.device_get(start.state.step))  # the state is donated to the first step
            writers = _open_writers(model_dir, logging_config, validation is not None, start.restored_step)
            if validation is not None and validation.at_start and start_step < total_steps:
                self.validate(start_step, start.state.params, writers[1])
            loop = _Loop(self, check, manager, checkpoints, logging_config, writers, stop, on_first_step)
            result = loop.run(start, train_batches, total_steps)
            self._finish(result, start_step, manager, writers)
            on_finish(result.step, writers[0])
            return result
        finally:
            try:
                if manager is not None:
                    checkpointing.finish_saves(manager)  # also on a stop or an error: a started save is finished
            finally:
                for w in writers:
                    w.close()
                lock.release()  # last: nothing of this job writes to MODEL_DIR any more

    def _finish(self, result: LoopResult, start_step: int, manager: Any,
                writers: list[summaries.SummaryWriter]) -> None:
        """The last checkpoint (if the loop moved), the last validation (unless just done, or the run was
        stopped by a signal: a preempted host has seconds)."""
        if result.step > start_step and manager.latest_step() != result.step:
            checkpointing.save(manager, result.state, data_state={"batches_consumed": result.batches_consumed},
                               force=True)
            log.info("checkpoint for step %d started in %s", result.step, manager.directory)
        if self.validation is not None and self.last_eval_step != result.step and not result.stopped_by:
            self.validate(result.step, result.state.params, writers[1])
        result.last_eval = self.last_eval


def model_dir_lock(model_dir: str) -> dir_lock.DirLock:
    """This process's lock on MODEL_DIR (twolar_jax.dir_lock), so a second job on it refuses before writing;
    on a pod each process locks a file of its own (`dir_lock.lock_name`)."""
    return dir_lock.acquire(model_dir, option="MODEL_DIR", lock_name=dir_lock.lock_name(jax.process_index()))


def _open_writers(model_dir: str, logging_config: LoggingConfig, validation: bool,
                  restored_step: Optional[int]) -> list[summaries.SummaryWriter]:
    """The train (and validation) writers, their JSONL cut back to the restored step (0: a fresh start)."""
    splits = ("train", "validation") if validation else ("train",)
    return [summaries.SummaryWriter(model_dir, split, tensorboard=logging_config.tensorboard,
                                    truncate_after=restored_step or 0) for split in splits]


class _Loop:
    """One pass of the training loop over a Trainer: batches in, partitioned steps, metrics windows,
    checkpoints, periodic validation, and a stop after the step in progress."""

    def __init__(self, trainer: Trainer, check: BatchCheck, manager: Any, checkpoints: CheckpointConfig,
                 logging_config: LoggingConfig, writers: list[summaries.SummaryWriter],
                 stop: Optional[StopRequest], on_first_step: Callable) -> None:
        self.trainer, self.check, self.manager, self.checkpoints = trainer, check, manager, checkpoints
        self.logging, self.writers, self.stop, self.on_first_step = logging_config, writers, stop, on_first_step
        self.window = MetricsWindow(trainer.model)

    def run(self, start: StartState, train_batches: BatchSource, total_steps: int) -> LoopResult:
        from twolar_jax.progress import progress_bar

        state, consumed = start.state, start.batches_consumed
        step = first_step = int(jax.device_get(state.step))
        last_train, stopped_early, stopped_by = {}, False, None
        iterator = iter(train_batches(shard_index=jax.process_index(), num_shards=jax.process_count(),
                                      skip_batches=consumed)) if step < total_steps else iter(())
        bar = progress_bar(total=total_steps, initial=step, desc="train",
                           disable=not (self.logging.progress and jax.process_index() == 0))
        try:
            while step < total_steps:
                host_batch = next(iterator, None)
                if host_batch is None:
                    stopped_early = True
                    log.warning("training data ran out after %d batches, at step %d of %d", consumed, step, total_steps)
                    break
                host_batch = self.check(host_batch, consumed)
                state, metrics = self.trainer.train_step(host_batch)(state, self.trainer.shard(host_batch),
                                                                     self.trainer.dropout_rng)
                consumed, step = consumed + 1, step + 1
                last_train = self._after_step(step, first_step, total_steps, state, metrics, host_batch, consumed,
                                              bar) or last_train
                bar.update(1)
                if self.stop is not None and self.stop.due(step):
                    stopped_by = self.stop.name
                    log.warning("stopping at step %d of %d (%s)", step, total_steps, stopped_by)
                    break
                if self.trainer.validation_due(step):
                    self.trainer.validate(step, state.params, self.writers[1])
        except BaseException:
            bar.fail()
            raise
        finally:
            bar.close()
            if self.window.pending:  # also on an interrupt: keep the metrics of the steps that did run
                last_train = self.window.flush(self.writers[0])
        if self.check.skipped:
            log.warning("%d training batches had nothing to learn from and left the model unchanged",
                        self.check.skipped)
        return LoopResult(state, step, consumed, last_train, self.trainer.last_eval, stopped_early,
                          self.check.skipped, stopped_by)

    def _after_step(self, step: int, first_step: int, total_steps: int, state: TrainState, metrics: Any,
                    host_batch: Any, consumed: int, bar: Any) -> Optional[dict[str, float]]:
        """Metrics window, first-step hooks and the periodic checkpoint; the flushed metrics, if a window closed."""
        self.window.add(step, metrics, host_batch)
        if step == first_step + 1:
            host_heap.trim()  # the compiler's freed memory back to the system, when the heap is kept
            self.on_first_step(step, self.writers[0])
        flushed = None
        if step % max(1, self.logging.period) == 0 or step == total_steps:
            flushed = self.window.flush(self.writers[0])
            bar.set_postfix({k: f"{flushed[k]:.4f}" for k in ("loss", "kendall_tau") if k in flushed})
        if checkpointing.save(self.manager, state, data_state={"batches_consumed": consumed},
                              period=self.checkpoints.period):
            log.info("checkpoint for step %d started in %s", step, self.manager.directory)
        return flushed
