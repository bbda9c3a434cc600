"""The listwise Fusion-in-Decoder students: LiT5 (the decoder writes the permutation) and FIRST (the first
identifier's logits rank the window in one step), one T5 with no extra parameters.

Each passage of a window is encoded alone; the decoder cross-attends to all of them joined ([n*L, d]).
Scores (`method="first"`): the decoder is fed [start, `▁[`] and the logits at position 1 over the identifier
pieces "1".."n" are the slots' scores (empty slots masked). Losses over teacher-ordered windows:
"lm" teacher-forced cross-entropy on `[a] > [b] ...` (LiT5), "first" a weighted RankNet on the first
identifier's logits (FIRST: pair weight 1/(r_i + r_j), 1-based teacher ranks), "first+lm" their sum with the
ranking term times `ranking_weight` (10, as FirstMistral).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from twolar_jax import ranking_metrics
from twolar_jax.errors import OptionError, check_choice
from twolar_jax.generation import fused_encode
from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5
from twolar_jax.ranking.features import FID_SCORE_BATCH, FID_WINDOW_BATCH
from twolar_jax.ranking.interface import Batch, PairEncoder
from twolar_jax.ranking.listwise_inputs import DEFAULT_WINDOW, MAX_IDENTIFIERS
from twolar_jax.ranking.t5_student import T5Student

LISTWISE_LOSSES = ("lm", "first", "first+lm")
BRACKET_ID = 784  # "▁[" in the T5 / Flan-T5 vocabulary (checked against the tokenizer in the tests)
MASKED_SCORE = -1e9


def weighted_rank_net(scores: jax.Array, teacher_ranks: jax.Array, mask: jax.Array) -> jax.Array:
    """FIRST's per-window loss [B]: sum over ordered pairs (r_i < r_j, both real) of
    log(1 + exp(s_j - s_i)) / (r_i + r_j) with 1-based ranks, divided by the sum of those weights."""
    r = teacher_ranks.astype(jnp.float32) + 1.0
    real = mask != 0
    pairs = (r[:, :, None] < r[:, None, :]) & real[:, :, None] & real[:, None, :]
    weights = jnp.where(pairs, 1.0 / (r[:, :, None] + r[:, None, :]), 0.0)
    losses = jax.nn.softplus(scores[:, None, :] - scores[:, :, None])  # pair (i, j): i should beat j
    return jnp.sum(weights * losses, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1e-9)


def sequence_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy [B] of teacher-forced logits [B, T, V] on targets [B, T] (0 = padding)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    real = (targets != 0).astype(jnp.float32)
    return jnp.sum(token * real, axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1.0)


@dataclasses.dataclass(frozen=True)
class FiDRanker(T5Student):
    """A T5 read as Fusion-in-Decoder over windows of `window` passages."""

    config: T5Config
    identifier_ids: tuple[int, ...] = ()  # vocabulary ids of "1".."window" (default: the shipped vocabulary)
    loss_name: str = "first+lm"
    ranking_weight: float = 10.0
    window: int = DEFAULT_WINDOW

    batch_features = FID_WINDOW_BATCH
    score_features = FID_SCORE_BATCH
    no_signal = "no window has two real passages, so there is no order to learn"

    def __post_init__(self) -> None:
        check_choice("loss", self.loss_name, LISTWISE_LOSSES)
        if not 1 <= self.window <= MAX_IDENTIFIERS:
            raise OptionError(f"window={self.window}: must be in 1..{MAX_IDENTIFIERS}")
        if not self.identifier_ids:
            from twolar_jax.ranking.listwise_inputs import identifier_ids
            from twolar_jax.tokenizer import T5Tokenizer
            object.__setattr__(self, "identifier_ids", tuple(int(i) for i in identifier_ids(T5Tokenizer(), self.window)))
        if len(self.identifier_ids) < self.window:
            raise OptionError(f"identifier_ids: {len(self.identifier_ids)} ids for a window of {self.window}")

    # --- maths ------------------------------------------------------------------------------------
    def decoder_logits(self, params: Any, tokens: jax.Array, decoder_tokens: jax.Array, *,
                       rng: jax.Array | None = None, vocab_ids: Any = None) -> jax.Array:
        """fp32 logits [B, T, V or len(vocab_ids)] of the decoder over the fused windows [B, n, L]."""
        model = T5(self.config)
        dropout = rng is not None
        rngs = {"dropout": rng} if dropout else None
        encoded, joined = fused_encode(model, params, tokens, enable_dropout=dropout, rngs=rngs)
        ids = None if vocab_ids is None else jnp.asarray(vocab_ids, jnp.int32)
        return model.apply({"params": params}, encoded, joined, decoder_tokens, enable_dropout=dropout,
                           output_vocab_ids=ids, method=T5.decode, rngs=rngs)

    def _first_scores(self, params: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
        tokens = batch["encoder_input_tokens"]
        b, n = tokens.shape[:2]
        prompt = jnp.tile(jnp.array([[self.config.decoder_start_token_id, BRACKET_ID]], jnp.int32), (b, 1))
        logits = self.decoder_logits(params, tokens, prompt, rng=rng, vocab_ids=self.identifier_ids[:n])[:, 1, :]
        return jnp.where(batch["passage_mask"] != 0, logits, MASKED_SCORE)

    def scores(self, params: Any, batch: Batch) -> jax.Array:
        return self._first_scores(params, batch, None)

    def loss(self, params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        scores = self._first_scores(params, batch, rngs[0])
        per_window = jnp.zeros(scores.shape[:1], jnp.float32)
        if self.loss_name in ("first", "first+lm"):
            weight = self.ranking_weight if self.loss_name == "first+lm" else 1.0
            per_window += weight * weighted_rank_net(scores, batch["teacher_ranks"], batch["passage_mask"])
        if self.loss_name in ("lm", "first+lm"):
            targets = batch["decoder_target_tokens"]
            start = jnp.full(targets.shape[:1] + (1,), self.config.decoder_start_token_id, jnp.int32)
            inputs = jnp.concatenate([start, targets[:, :-1]], axis=1)
            logits = self.decoder_logits(params, batch["encoder_input_tokens"], inputs, rng=rngs[1])
            per_window += sequence_cross_entropy(logits, targets)
        return jnp.sum(per_window * self.example_weights(batch)), scores

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """Each window's slots best first by the first identifier's logits (empty slots last)."""
        return jnp.argsort(-self.scores(params, batch), axis=-1, stable=True)

    def fixed_sizes(self) -> dict[str, int]:
        return {"group_size": self.window}

    def example_weights(self, batch: Batch, xp: Any = jnp) -> Any:
        return (xp.sum(batch["passage_mask"] != 0, axis=-1) >= 2).astype(xp.float32)

    def metrics(self, scores: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        return ranking_metrics.ranking_metrics(scores, batch["teacher_ranks"], batch["passage_mask"])

    # --- text and description ---------------------------------------------------------------------
    def pair_encoder(self, tokenizer: Any, *, max_length: int, truncation: str) -> PairEncoder:
        raise OptionError("FiDRanker ranks windows of passages, not pairs: use ListwiseReranker")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def describe(self) -> dict[str, Any]:
        return {"model": "fid_listwise", "config": dataclasses.asdict(self.config), "window": self.window,
                "identifier_ids": list(self.identifier_ids), "loss": self.loss_name,
                "ranking_weight": self.ranking_weight}

    def for_scoring(self, *, dtype: str, scan_layers: bool | None) -> "FiDRanker":
        layers = {} if scan_layers is None else {"scan_layers": scan_layers}
        return dataclasses.replace(self, config=self.config.replace(dtype=dtype, **layers))
