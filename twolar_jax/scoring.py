"""Score heads on the first decoder step: TWOLAR's difference, monoT5's softmax, RankT5's extra id.

Token ids are looked up in the vocabulary (`▁true`, `▁false`, `<extra_id_10>`), never hard-coded.
All heads return fp32: bf16 scores tie often, and ties make trec_eval order by docid.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp

from twolar_jax.errors import check_choice

SCORE_HEADS = ("difference", "softmax", "extra_id")


class ScoreTokens(NamedTuple):
    true_id: int
    false_id: int
    extra_id: int


def resolve_score_tokens(tokenizer, *, true_piece: str = "▁true", false_piece: str = "▁false",
                         extra_piece: str = "<extra_id_10>") -> ScoreTokens:
    """The ids the heads read, looked up in `tokenizer`'s vocabulary (the one place that knows the pieces)."""
    return ScoreTokens(tokenizer.piece_to_id(true_piece), tokenizer.piece_to_id(false_piece),
                       tokenizer.piece_to_id(extra_piece))


@functools.lru_cache(maxsize=1)
def default_score_tokens() -> ScoreTokens:
    """Score tokens of the shipped T5 / Flan-T5 vocabulary."""
    from twolar_jax.tokenizer import T5Tokenizer

    return resolve_score_tokens(T5Tokenizer())


def head_vocab_ids(head: str, tokens: ScoreTokens) -> tuple[int, ...]:
    """The vocabulary entries a head reads, so the model can compute only those logits."""
    check_head(head)
    return (tokens.extra_id,) if head == "extra_id" else (tokens.true_id, tokens.false_id)


def check_head(head: str) -> None:
    check_choice("score_head", head, SCORE_HEADS)


def score_from_selected(selected: jnp.ndarray, head: str) -> jnp.ndarray:
    """Scores from logits already restricted to `head_vocab_ids(head)` (last axis)."""
    check_head(head)
    selected = selected.astype(jnp.float32)
    if head == "extra_id":
        return selected[..., 0]
    z_true, z_false = selected[..., 0], selected[..., 1]
    if head == "difference":
        return z_true - z_false
    # softmax over {true, false}: p(true) = sigmoid(z_true - z_false), computed stably.
    return jnp.exp(z_true - jnp.logaddexp(z_true, z_false))


def score_from_logits(logits: jnp.ndarray, head: str, tokens: ScoreTokens) -> jnp.ndarray:
    """Scores from full-vocabulary logits [..., V]."""
    ids = jnp.asarray(head_vocab_ids(head, tokens))
    return score_from_selected(jnp.take(logits, ids, axis=-1), head)
