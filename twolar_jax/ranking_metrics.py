"""In-graph ranking metrics against the teacher's order (pure JAX, jit-safe).

The trainer logs these next to the loss: they say how far the student's
scores agree with the teacher's permutation, which the loss value alone does
not (a RankNet loss of 0.5 means little; a Kendall tau of 0.6 does).

All functions take ``scores`` float [B, N], ``teacher_ranks`` int [B, N]
(0 = the teacher's best passage) and ``mask`` bool/int [B, N] (1 = real
passage), and ignore padded passages. Per-query values come back with
``reduction="none"``; ``"mean"`` averages over the queries where the metric
is defined (at least two real passages), and is 0.0 when none is.
"""
from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MetricReduction = Literal["mean", "none"]


def check_ranking_inputs(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    where: str = "ranking input",
) -> tuple[Array, Array, Array, Optional[Array]]:
    """Checks shapes and dtypes (static, so it also runs under jit) and casts.

    Returns (scores float32, teacher_ranks int32, mask bool, teacher_scores
    float32 or None). Raises ValueError naming the argument and the shapes.
    """
    scores = jnp.asarray(scores)
    teacher_ranks = jnp.asarray(teacher_ranks)
    mask = jnp.asarray(mask)
    if scores.ndim != 2:
        raise ValueError(
            f"{where}: scores must have shape [batch, num_passages], got shape {tuple(scores.shape)}")
    named = [("teacher_ranks", teacher_ranks), ("mask", mask)]
    if teacher_scores is not None:
        teacher_scores = jnp.asarray(teacher_scores)
        named.append(("teacher_scores", teacher_scores))
    for name, value in named:
        if value.shape != scores.shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(value.shape)} but scores has shape "
                f"{tuple(scores.shape)}; they must match ([batch, num_passages])")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"{where}: scores must be floating point, got dtype {scores.dtype}")
    if not jnp.issubdtype(teacher_ranks.dtype, jnp.integer):
        raise ValueError(
            f"{where}: teacher_ranks must be an integer array (0 = best), got dtype {teacher_ranks.dtype}")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"{where}: mask must be bool or integer (1 = real passage), got dtype {mask.dtype}")
    if teacher_scores is not None and not jnp.issubdtype(teacher_scores.dtype, jnp.floating):
        raise ValueError(f"{where}: teacher_scores must be floating point, got dtype {teacher_scores.dtype}")
    return (
        scores.astype(jnp.float32),
        teacher_ranks.astype(jnp.int32),
        mask != 0,
        None if teacher_scores is None else teacher_scores.astype(jnp.float32),
    )


def masked_query_mean(values: Array, defined: Array) -> Array:
    """Mean of per-query ``values`` over queries where ``defined``; 0.0 when none is."""
    count = jnp.sum(defined)
    total = jnp.sum(jnp.where(defined, values, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0).astype(jnp.float32)


def _reduce(values: Array, defined: Array, reduction: str) -> Array:
    if reduction == "none":
        return jnp.where(defined, values, 0.0).astype(jnp.float32)
    if reduction == "mean":
        return masked_query_mean(values, defined)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _valid_pairs(mask: Array) -> Array:
    """[B, N, N]: both items real and i < j (each unordered pair once)."""
    n = mask.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    return mask[:, :, None] & mask[:, None, :] & upper[None]


def kendall_tau(
    scores: Array, teacher_ranks: Array, mask: Array, *, reduction: MetricReduction = "mean"
) -> Array:
    """Kendall's tau-b between the scores and the teacher order, per query.

    Same definition as ``scipy.stats.kendalltau`` (variant "b"): ties in
    either ranking shrink the denominator. A query with fewer than two real
    passages, or with all scores tied, is undefined (0.0 in "none", skipped in
    "mean"), where scipy returns NaN.
    """
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="kendall_tau")
    pairs = _valid_pairs(mask)
    sx = jnp.sign(scores[:, :, None] - scores[:, None, :])
    # Teacher "relevance" is -rank: a smaller rank is better.
    sy = jnp.sign(teacher_ranks[:, None, :] - teacher_ranks[:, :, None]).astype(jnp.float32)
    concordance = jnp.sum(jnp.where(pairs, sx * sy, 0.0), axis=(1, 2))
    n_pairs = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)
    untied_x = jnp.sum(pairs & (sx != 0), axis=(1, 2)).astype(jnp.float32)
    untied_y = jnp.sum(pairs & (sy != 0), axis=(1, 2)).astype(jnp.float32)
    denom = jnp.sqrt(untied_x * untied_y)
    defined = (n_pairs > 0) & (denom > 0)
    tau = concordance / jnp.where(defined, denom, 1.0)
    return _reduce(tau, defined, reduction)


def pairwise_agreement(
    scores: Array, teacher_ranks: Array, mask: Array, *, reduction: MetricReduction = "mean"
) -> Array:
    """Fraction of teacher-ordered pairs that the scores order the same way.

    Over pairs of real passages with teacher_rank_i < teacher_rank_j: 1 when
    s_i > s_j, 0.5 when s_i == s_j, 0 otherwise (so a constant scorer gets
    0.5). Pairs the teacher ties are skipped. Without ties, tau = 2 * agreement - 1.
    """
    scores, teacher_ranks, mask, _ = check_ranking_inputs(
        scores, teacher_ranks, mask, where="pairwise_agreement")
    ordered = mask[:, :, None] & mask[:, None, :] & (teacher_ranks[:, :, None] < teacher_ranks[:, None, :])
    diff = scores[:, :, None] - scores[:, None, :]
    credit = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    n_pairs = jnp.sum(ordered, axis=(1, 2)).astype(jnp.float32)
    agree = jnp.sum(jnp.where(ordered, credit, 0.0), axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    return _reduce(agree, n_pairs > 0, reduction)


def ndcg(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    *,
    k: Optional[int] = None,
    gain: Literal["reciprocal_rank", "exp2"] = "reciprocal_rank",
    reduction: MetricReduction = "mean",
) -> Array:
    """NDCG@k of the score order, with gains taken from the teacher's ranks.

    A proxy for retrieval quality during training: the relevance of a passage
    is ``1 / (teacher_rank + 1)``, as TWOLAR's validation loop feeds
    ``sklearn.metrics.ndcg_score`` (linear gain, discount 1/log2(position + 1),
    1-based positions). ``gain="exp2"`` uses 2**rel - 1 instead. Padded
    passages are left out of both the ranking and the ideal ranking. Score ties
    are broken by passage position (sklearn averages over ties instead). A
    query is defined when it has at least one real passage.
    """
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="ndcg")
    n = scores.shape[-1]
    rel = jnp.where(mask, 1.0 / (teacher_ranks.astype(jnp.float32) + 1.0), 0.0)
    if gain == "reciprocal_rank":
        gains = rel
    elif gain == "exp2":
        gains = jnp.exp2(rel) - 1.0
    else:
        raise ValueError(f"gain must be 'reciprocal_rank' or 'exp2', got {gain!r}")
    # Padded passages go to the bottom of the predicted order; stable sort breaks ties by position.
    key = jnp.where(mask, scores, -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)
    ranked_gains = jnp.take_along_axis(gains, order, axis=-1)
    ideal_gains = -jnp.sort(-gains, axis=-1)
    discounts = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float32))
    if k is not None:
        if k < 1:
            raise ValueError(f"ndcg: k must be >= 1 or None, got {k}")
        discounts = np.where(np.arange(n) < k, discounts, 0.0).astype(np.float32)
    dcg = jnp.sum(ranked_gains * discounts, axis=-1)
    idcg = jnp.sum(ideal_gains * discounts, axis=-1)
    defined = jnp.any(mask, axis=-1) & (idcg > 0)
    value = dcg / jnp.where(defined, idcg, 1.0)
    return _reduce(value, defined, reduction)


def ranking_metrics(
    scores: Array, teacher_ranks: Array, mask: Array, *, ndcg_k: Optional[int] = 10
) -> dict[str, Array]:
    """The scalars the trainer logs: tau, pairwise agreement and NDCG@k with the teacher."""
    key = "ndcg" if ndcg_k is None else f"ndcg@{ndcg_k}"
    return {
        "kendall_tau": kendall_tau(scores, teacher_ranks, mask),
        "pairwise_agreement": pairwise_agreement(scores, teacher_ranks, mask),
        key: ndcg(scores, teacher_ranks, mask, k=ndcg_k),
    }
