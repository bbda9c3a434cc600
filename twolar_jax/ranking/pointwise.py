"""The pointwise cross-encoder (TWOLAR, monoT5, RankT5): each (query, passage) pair through the T5 encoder
and one decoder step, a score head on the first-step logits, a listwise or pairwise loss over a query's
group of passages.

Heads (twolar_jax.scoring): TWOLAR's difference z_true - z_false, monoT5's softmax p(true), RankT5's
<extra_id_10> logit. Losses (twolar_jax.losses): rank_net, list_net, lambda_loss, margin_mse, softmax_ce
(InfoNCE). All pairs of a batch go through the model as one [B*N, L] batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from twolar_jax import losses, ranking_metrics, scoring
from twolar_jax.errors import OptionError
from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, POINTWISE_SCORE_BATCH
from twolar_jax.ranking.interface import Batch, PairEncoder
from twolar_jax.ranking.pointwise_inputs import PairEncoder as TemplatePairEncoder
from twolar_jax.ranking.t5_student import T5Student


@dataclasses.dataclass(frozen=True)
class PointwiseCrossEncoder(T5Student):
    """A T5 config plus what is computed on top of it: the score head, the loss and its options."""

    config: T5Config
    score_head: str = "difference"
    loss_name: str = "rank_net"
    loss_options: tuple[tuple[str, Any], ...] = ()
    score_tokens: scoring.ScoreTokens | None = None  # None: looked up in the default vocabulary
    ndcg_k: int | None = 10

    batch_features = LISTWISE_GROUP_BATCH
    score_features = POINTWISE_SCORE_BATCH
    no_signal = "no query has two real passages (passage_mask), so there is no pair to learn from"

    def __post_init__(self) -> None:
        scoring.check_head(self.score_head)
        losses.get_loss(self.loss_name)
        if isinstance(self.loss_options, Mapping):
            object.__setattr__(self, "loss_options", tuple(sorted(self.loss_options.items())))
        if any(k == "reduction" for k, _ in self.loss_options):
            raise OptionError("loss_options: 'reduction' is set by the trainer (per-query mean over the global batch)")
        if self.score_tokens is None:
            object.__setattr__(self, "score_tokens", scoring.default_score_tokens())

    # --- maths ------------------------------------------------------------------------------------
    @property
    def vocab_ids(self) -> tuple[int, ...]:
        return scoring.head_vocab_ids(self.score_head, self.score_tokens)

    def per_query_loss(self) -> Callable[..., jax.Array]:
        return functools.partial(losses.get_loss(self.loss_name), reduction="none", **dict(self.loss_options))

    def token_scores(self, params: Any, tokens: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """fp32 scores [...] of tokens [..., L]: every row through the model as one [rows, L] batch."""
        flat = nn.with_logical_constraint(tokens.reshape(-1, tokens.shape[-1]), ("batch", "length"))
        enable_dropout = dropout_rng is not None
        logits = T5(self.config).apply({"params": params}, flat, enable_dropout=enable_dropout,
                                       vocab_ids=self.vocab_ids, method=T5.first_step_logits,
                                       rngs={"dropout": dropout_rng} if enable_dropout else None)
        return scoring.score_from_selected(logits, self.score_head).reshape(tokens.shape[:-1])

    def scores(self, params: Any, batch: Batch) -> jax.Array:
        return self.token_scores(params, batch["encoder_input_tokens"])

    def loss(self, params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        scores = self.token_scores(params, batch["encoder_input_tokens"], dropout_rng=rng)
        per_query = self.per_query_loss()(scores, batch["teacher_ranks"], batch["passage_mask"],
                                          batch.get("teacher_scores"))
        return jnp.sum(per_query * self.example_weights(batch)), scores

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """Each group's passages best first (indices into the group; padding rows last, ties in input order)."""
        scores = jnp.where(batch["passage_mask"] != 0, self.scores(params, batch), -jnp.inf)
        return jnp.argsort(-scores, axis=-1, stable=True)

    def example_weights(self, batch: Batch, xp: Any = jnp) -> Any:
        """1.0 for a query with at least two real passages (a ranking to learn from), else 0.0."""
        return (xp.sum(batch["passage_mask"] != 0, axis=-1) >= 2).astype(xp.float32)

    def metrics(self, scores: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        return ranking_metrics.ranking_metrics(scores, batch["teacher_ranks"], batch["passage_mask"],
                                               ndcg_k=self.ndcg_k)

    # --- text and description ---------------------------------------------------------------------
    def pair_encoder(self, tokenizer: Any, *, max_length: int, truncation: str) -> PairEncoder:
        return TemplatePairEncoder(tokenizer, max_length=max_length, truncation=truncation)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def describe(self) -> dict[str, Any]:
        return {"model": "pointwise_cross_encoder", "config": dataclasses.asdict(self.config),
                "score_head": self.score_head, "vocab_ids": list(self.vocab_ids), "loss": self.loss_name,
                "loss_options": [list(kv) for kv in self.loss_options]}

    def for_scoring(self, *, dtype: str, scan_layers: bool | None) -> "PointwiseCrossEncoder":
        layers = {} if scan_layers is None else {"scan_layers": scan_layers}
        return dataclasses.replace(self, config=self.config.replace(dtype=dtype, **layers))
