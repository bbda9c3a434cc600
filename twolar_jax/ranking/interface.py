"""The ranking-model interface: what a student family declares so that the trainer, the scorer, the AOT
compiler and the data pipeline can serve it without knowing it (t5x's BaseModel idea, our own code).

A model declares its batch once (`batch_features`: names, dims, dtypes, logical axes) and the record it is
built from (`record_features`); it owns its text -> features path (`pair_encoder` for the scorer; the
training batches come from its inputs module and the TF twin in data_pipeline). The maths are pure:
`loss(params, batch, rng)` sums the per-example losses weighted by `example_weights` (the trainer divides by
the global weight, so gradient accumulation is exact), `scores(params, batch)` gives fp32 scores for any
leading shape of tokens, and `predict` where the family has one. See docs/architecture.md.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp

from twolar_jax import ranking_metrics
from twolar_jax.errors import OptionError
from twolar_jax.ranking.features import DISTILL_RECORD, FeatureSet

Batch = Mapping[str, Any]
PairEncoder = Callable[[Iterable[tuple[str, str]]], Iterator[list[int]]]


class RankingModel(abc.ABC):
    """One student family. Implementations are frozen dataclasses (hashable: a jit may close over them)."""

    batch_features: FeatureSet  # a training / validation batch
    record_features: FeatureSet = DISTILL_RECORD  # the stored example its batches are built from
    score_features: FeatureSet  # what `scores` reads when a scorer calls it (and the AOT score job traces)
    no_signal: str = "no example has anything to learn from"  # why a batch with zero weight teaches nothing

    # --- parameters ---------------------------------------------------------------------------
    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters (a pytree of arrays)."""

    @abc.abstractmethod
    def param_logical_axes(self) -> Any:
        """The parameters' logical axes (a pytree of PartitionSpec of t5x names), for the partitioner."""

    def prepare_params(self, params: Any) -> Any:
        """Parameters from a checkpoint in the layout this model computes with (default: as they are)."""
        return params

    def load_init_checkpoint(self, path: str) -> Any:
        """Parameters to start training from (train.init_checkpoint), checked against this model."""
        raise OptionError(f"train.init_checkpoint={path!r}: {type(self).__name__} has no checkpoint importer")

    def checkpoint_config(self) -> dict[str, Any] | None:
        """What MODEL_DIR/model_config.json holds, so the run can be loaded for scoring (None: nothing)."""
        return None

    @property
    def param_dtype(self) -> Any:
        """The dtype the scorer casts parameters to."""
        return jnp.float32

    # --- maths (pure, traced) -------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(sum over examples of loss x example_weights, scores) of a batch; `rng` None: no dropout."""

    @abc.abstractmethod
    def scores(self, params: Any, batch: Batch) -> jax.Array:
        """fp32 scores of a `score_features` batch (and of a `batch_features` one: [B, N, L] tokens -> [B, N])."""

    def fixed_sizes(self) -> dict[str, int]:
        """Dimension sizes the model fixes itself (a listwise window), for abstract score batches."""
        return {}

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """The model's own output (a permutation, generated ids), where the family has one."""
        raise NotImplementedError(f"{type(self).__name__} has no predict")

    @abc.abstractmethod
    def example_weights(self, batch: Batch, xp: Any = jnp) -> Any:
        """[B] 1.0 for an example with something to learn from, else 0.0 (xp: jnp in a step, numpy on host)."""

    def metrics(self, scores: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Ranking metrics of the scores against the teacher's order (the step's and validation's)."""
        return ranking_metrics.ranking_metrics(scores, batch["teacher_ranks"], batch["passage_mask"])

    # --- text and description ---------------------------------------------------------------------
    @abc.abstractmethod
    def pair_encoder(self, tokenizer: Any, *, max_length: int, truncation: str) -> PairEncoder:
        """Turns (query, document) pairs into the token ids `scores` reads (the scorer's text path)."""

    @property
    def vocab_size(self) -> int | None:
        """Ids at or above this are refused before scoring (None: no check)."""
        return None

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON of everything that decides the model's programs (the executable cache's key, reports)."""

    def for_scoring(self, *, dtype: str, scan_layers: bool | None) -> "RankingModel":
        """This model as the scorer computes with it (default: unchanged)."""
        return self
