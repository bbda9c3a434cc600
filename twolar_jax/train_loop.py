"""What the training loop reads and checks on the host: its option objects (`ValidationConfig`,
`LoggingConfig`), its data source protocol, the batch check made once per batch, and the metrics window.

The loop itself is `trainer.Trainer.fit`. Host work is kept off the device's critical path: metrics stay on
device until a logging window closes (one transfer per window), and each batch is checked on the host before
anything is traced (a data bug is a message, not an XLA error).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator, Mapping, Optional, Protocol

import jax
import numpy as np

from twolar_jax import summaries
from twolar_jax.errors import check_choice
from twolar_jax.ranking.features import BatchError
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.train_state import TrainState

log = logging.getLogger("twolar_jax.train")
GROUPS_WITHOUT_PAIRS = ("error", "skip")


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


class BatchCheck:
    """Every check a training batch gets, each made here once: the feature declaration and the split into
    micro-batches over the batch sharding (first batch), the same shapes after (a new shape would recompile),
    and whether it has anything to learn from ("error", or "skip": logged, counted, model unchanged)."""

    def __init__(self, model: RankingModel, *, num_microbatches: int, batch_parallelism: int,
                 groups_without_pairs: str = "error", where: str = "train"):
        check_choice("train.groups_without_pairs", groups_without_pairs, GROUPS_WITHOUT_PAIRS)
        self.model, self.where, self.first, self.skipped = model, where, None, 0
        self.num_microbatches, self.batch_parallelism = num_microbatches, batch_parallelism
        self.policy = groups_without_pairs

    def __call__(self, batch: Mapping[str, Any], index: int) -> dict[str, Any]:
        features = self.model.batch_features
        batch = features.select(batch)
        shapes = {k: np.shape(v) for k, v in batch.items()}
        if self.first is None:
            features.validate(batch, where=f"{self.where} batch {index}")
            self._check_split(features.sizes(batch)["batch"] * jax.process_count())
            self.first = shapes
        elif shapes != self.first:
            features.validate(batch, where=f"{self.where} batch {index}")
            raise BatchError(f"{self.where} batch {index}: shapes {shapes} differ from the first batch's "
                             f"{self.first}; batches must have static shapes (drop_remainder)")
        self._check_signal(batch, index)
        return batch

    def _check_split(self, b: int) -> None:
        m = self.num_microbatches
        if b % m or (b // m) % self.batch_parallelism:
            raise BatchError(f"{self.where}: global batch of {b} queries must split into num_microbatches={m} "
                             f"micro-batches that divide over the {self.batch_parallelism}-way batch sharding of "
                             "the mesh")

    def _check_signal(self, batch: Mapping[str, Any], index: int) -> None:
        if np.sum(self.model.example_weights(batch, np)) > 0:
            return
        if self.policy == "error":
            raise BatchError(f"{self.where} batch {index}: {self.model.no_signal}; fix the data, or set "
                             "train.groups_without_pairs='skip' (twolar-train --groups_without_pairs=skip) to "
                             "skip such batches")
        self.skipped += 1
        log.warning("%s batch %d: %s; its step leaves the model unchanged (train.groups_without_pairs='skip'; "
                    "%d such batches so far)", self.where, index, self.model.no_signal, self.skipped)


class MetricsWindow:
    """Device metrics of the steps since the last log line, fetched in one transfer when the window closes."""

    def __init__(self, model: RankingModel) -> None:
        self.token_features = [f.name for f in model.batch_features if "max_length" in f.dims]
        self.reset()

    def reset(self) -> None:
        self.pending: list[tuple[int, Any]] = []
        self.t0, self.examples, self.tokens = time.perf_counter(), 0, 0

    def add(self, step: int, metrics: Any, host_batch: Mapping[str, np.ndarray]) -> None:
        self.pending.append((step, metrics))
        self.examples += len(next(iter(host_batch.values()))) * jax.process_count()
        self.tokens += sum(int(np.count_nonzero(host_batch[k])) for k in self.token_features) * jax.process_count()

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
