"""Listwise distillation losses on student scores against a teacher's order.

Every loss has one signature, so the trainer can pick one by name from gin:

    loss_fn(scores, teacher_ranks, mask, teacher_scores=None, **options) -> float32 scalar

``scores`` float [B, N] (one query's N passages per row), ``teacher_ranks``
int [B, N] (0 = the teacher's best; TWOLAR's data is already in teacher
order, so there it is just ``arange(N)``), ``mask`` bool/int [B, N]
(1 = real passage, 0 = padding). ``reduction="none"`` returns the [B]
per-query values.

Reductions (the reference's, and why the default differs in form only):
TWOLAR trains on one query per micro-batch and accumulates 32 of them, so
its effective objective is the per-query loss averaged over queries. That is
``reduction="mean"`` (default): each query's loss (e.g. the mean over its
pairs), then the mean over the queries that have at least one pair.
``reduction="pooled"`` is what TWOLAR's ``RankLoss`` functions compute when
called on a multi-query batch, and what rax's ``reduce_fn=jnp.mean`` does:
one mean over all valid pairs of the whole batch. With one query, or with
padding-as-bottom (every query has N*(N-1)/2 pairs), both agree.

Padding: ``padding="mask"`` (default) drops padded passages from every sum.
``padding="twolar"`` reproduces TWOLAR, whose loader pads short lists with
real ``<padding_passage>`` strings in the last positions: padded passages are
items ranked after every real one, in position order among themselves, and
take part in pairs and softmaxes. See docs/losses.md.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from twolar_jax.errors import OptionError
from twolar_jax.ranking_metrics import check_ranking_inputs, masked_query_mean

Array = jax.Array
Reduction = Literal["mean", "pooled", "none"]
Padding = Literal["mask", "twolar"]
LossFn = Callable[..., Array]

# Weighing schemes of TWOLAR's (allRank's) LambdaLoss; None is plain log2 RankNet.
LAMBDA_SCHEMES = (
    None, "ndcgLoss1", "ndcgLoss2", "ndcgLoss2++", "lambdaRank",
    "rankNet", "rankNetWeightedByGTDiff", "rankNetWeightedByGTDiffPowed",
)


# ----------------------------------------------------------------------------- helpers


def _effective(
    scores: Array, teacher_ranks: Array, mask: Array, padding: str, loss: str
) -> tuple[Array, Array]:
    """(ranks, valid) after applying the padding mode.

    In "twolar" mode padded passage p gets rank max_real_rank + 1 + (number of
    padded passages before p), which is TWOLAR's label when ranks are 0..n-1.
    """
    if padding == "mask":
        return teacher_ranks, mask
    if padding != "twolar":
        raise OptionError(f"{loss}: padding must be 'mask' or 'twolar', got {padding!r}")
    max_real = jnp.max(jnp.where(mask, teacher_ranks, -1), axis=-1, keepdims=True)
    pad_index = jnp.cumsum(~mask, axis=-1) - 1
    ranks = jnp.where(mask, teacher_ranks, max_real + 1 + pad_index)
    return ranks.astype(jnp.int32), jnp.ones_like(mask)


def _reciprocal_rank_labels(ranks: Array) -> Array:
    """TWOLAR's target y = 1 / (rank + 1) (train.py: ``1 / (i + 1)`` by position)."""
    return 1.0 / (ranks.astype(jnp.float32) + 1.0)


def _reduce_pairs(pair_losses: Array, pairs: Array, reduction: str, loss: str) -> Array:
    """Reduces [B, N, N] pair losses over the valid ``pairs``."""
    summed = jnp.sum(jnp.where(pairs, pair_losses, 0.0), axis=(1, 2))
    counts = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)
    if reduction == "pooled":
        total = jnp.sum(counts)
        return jnp.where(total > 0, jnp.sum(summed) / jnp.maximum(total, 1.0), 0.0).astype(jnp.float32)
    per_query = summed / jnp.maximum(counts, 1.0)
    return _reduce_queries(per_query, counts > 0, reduction, loss)


def _reduce_queries(per_query: Array, defined: Array, reduction: str, loss: str) -> Array:
    """Reduces [B] per-query losses; "pooled" equals "mean" for per-query losses."""
    if reduction == "none":
        return jnp.where(defined, per_query, 0.0).astype(jnp.float32)
    if reduction in ("mean", "pooled"):
        return masked_query_mean(per_query, defined)
    raise ValueError(f"{loss}: reduction must be 'mean', 'pooled' or 'none', got {reduction!r}")


def _masked_log_softmax(logits: Array, valid: Array) -> Array:
    """log_softmax over valid items; invalid entries get 0 (never -inf, so no NaN grads)."""
    safe = jnp.where(valid, logits, -jnp.inf)
    # A row with no valid item would be all -inf; give it zeros instead.
    safe = jnp.where(jnp.any(valid, axis=-1, keepdims=True), safe, 0.0)
    return jnp.where(valid, jax.nn.log_softmax(safe, axis=-1), 0.0)


# ----------------------------------------------------------------------------- losses


def rank_net(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    padding: Padding = "mask",
    reduction: Reduction = "mean",
) -> Array:
    """RankNet over every pair the teacher orders, as TWOLAR's ``RankLoss.rank_net``.

    For each pair (i, j) with y_i > y_j, y = 1/(rank+1) (i.e. rank_i < rank_j),
    the cross-entropy of [s_i, s_j] with class i: softplus(s_j - s_i) =
    log(1 + exp(s_j - s_i)). Pairs the teacher ties are skipped.
    ``teacher_scores`` is accepted for the common signature and unused.
    """
    del teacher_scores
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="rank_net")
    ranks, valid = _effective(scores, teacher_ranks, mask, padding, "rank_net")
    pairs = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    pair_losses = jax.nn.softplus(scores[:, None, :] - scores[:, :, None])
    return _reduce_pairs(pair_losses, pairs, reduction, "rank_net")


def list_net(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    padding: Padding = "mask",
    reduction: Reduction = "mean",
    eps: float = 1e-10,
) -> Array:
    """ListNet as TWOLAR's ``RankLoss.list_net``: -sum softmax(y) * log(softmax(s) + eps).

    Labels y = 1/(rank+1). Both softmaxes run over the valid passages only.
    ``eps=0`` uses an exact log-softmax (then it equals rax.softmax_loss with
    labels softmax(y)). ``teacher_scores`` is unused.
    """
    del teacher_scores
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="list_net")
    ranks, valid = _effective(scores, teacher_ranks, mask, padding, "list_net")
    target = jnp.exp(_masked_log_softmax(_reciprocal_rank_labels(ranks), valid))
    log_pred = _masked_log_softmax(scores, valid)
    if eps:
        log_pred = jnp.log(jnp.exp(log_pred) + eps)
    per_query = -jnp.sum(jnp.where(valid, target * log_pred, 0.0), axis=-1)
    return _reduce_queries(per_query, jnp.any(valid, axis=-1), reduction, "list_net")


def _lambda_weights(
    scheme: Optional[str], gains: Array, discounts: Array, labels_by_pred: Array, mu: float
) -> Array | float:
    """Pair weights [B, N, N] of TWOLAR's (allRank's) LambdaLoss schemes.

    ``gains`` G = (2**y - 1) / maxDCG in predicted order [B, N]; ``discounts``
    D = log2(1 + position) [N], positions 1-based.
    """
    n = gains.shape[-1]

    def ndcg_loss2() -> Array:
        pos = np.arange(1, n + 1)
        delta = np.abs(pos[:, None] - pos[None, :])
        # |1/D[delta-1] - 1/D[delta]| = |1/log2(1+delta) - 1/log2(2+delta)|, 0 on the diagonal.
        with np.errstate(divide="ignore"):
            d = np.abs(1.0 / np.log2(1.0 + delta) - 1.0 / np.log2(2.0 + delta))
        d[delta == 0] = 0.0
        return jnp.asarray(d, jnp.float32)[None] * jnp.abs(gains[:, :, None] - gains[:, None, :])

    def lambda_rank() -> Array:
        inv = 1.0 / discounts
        return jnp.abs(inv[:, None] - inv[None, :])[None] * jnp.abs(gains[:, :, None] - gains[:, None, :])

    if scheme is None or scheme == "rankNet":
        return 1.0
    if scheme == "ndcgLoss1":
        return (gains / discounts[None])[:, :, None]
    if scheme == "ndcgLoss2":
        return ndcg_loss2()
    if scheme == "lambdaRank":
        return lambda_rank()
    if scheme == "ndcgLoss2++":
        return mu * ndcg_loss2() + lambda_rank()
    if scheme == "rankNetWeightedByGTDiff":
        return jnp.abs(labels_by_pred[:, :, None] - labels_by_pred[:, None, :])
    if scheme == "rankNetWeightedByGTDiffPowed":
        return jnp.abs(labels_by_pred[:, :, None] ** 2 - labels_by_pred[:, None, :] ** 2)
    raise ValueError(f"lambda_loss: weighing_scheme must be one of {LAMBDA_SCHEMES}, got {scheme!r}")


def lambda_loss(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    weighing_scheme: Optional[str] = "ndcgLoss2",
    k: Optional[int] = None,
    sigma: float = 1.0,
    mu: float = 10.0,
    eps: float = 1e-10,
    log_base: Literal["binary", "natural"] = "binary",
    padding: Padding = "mask",
    reduction: Reduction = "mean",
) -> Array:
    """LambdaLoss (Wang et al. 2018) as TWOLAR's ``RankLoss.lambda_loss``.

    Passages are sorted by the student's scores; labels y = 1/(rank+1) give
    gains G = (2**y - 1) / maxDCG@k. Each pair (i, j) of sorted positions with
    y_i > y_j (all pairs for ndcgLoss1), both within the top k, contributes
    -w_ij * log2(sigmoid(sigma * (s_i - s_j))), with TWOLAR's clamps (sigmoid
    and sigmoid**w at >= eps, score gaps at +-1e8). ``weighing_scheme``: one of
    ``LAMBDA_SCHEMES`` (default "ndcgLoss2", the paper's NDCG-Loss2; TWOLAR's
    train.py passes None, i.e. log2 RankNet). In "mask" mode padded passages
    are sorted below every real one and carry no gain (TWOLAR marks padding
    with -inf labels but leaves it in the predicted sort; allRank, whose code
    TWOLAR's is, also moves it to the bottom).
    """
    del teacher_scores
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="lambda_loss")
    if weighing_scheme not in LAMBDA_SCHEMES:
        raise OptionError(f"lambda_loss: weighing_scheme must be one of {LAMBDA_SCHEMES}, got {weighing_scheme!r}")
    if log_base not in ("binary", "natural"):
        raise OptionError(f"lambda_loss: log_base must be 'binary' or 'natural', got {log_base!r}")
    if k is not None and k < 1:
        raise OptionError(f"lambda_loss: k must be >= 1 or None, got {k}")
    ranks, valid = _effective(scores, teacher_ranks, mask, padding, "lambda_loss")
    n = scores.shape[-1]
    labels = jnp.where(valid, _reciprocal_rank_labels(ranks), 0.0)

    order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), axis=-1, stable=True)
    s_sorted = jnp.take_along_axis(jnp.where(valid, scores, 0.0), order, axis=-1)
    y_by_pred = jnp.take_along_axis(labels, order, axis=-1)
    valid_by_pred = jnp.take_along_axis(valid, order, axis=-1)
    y_ideal = -jnp.sort(-labels, axis=-1)

    cut = n if k is None else min(k, n)
    in_top = np.arange(n) < cut
    discounts = jnp.asarray(np.log2(1.0 + np.arange(1, n + 1)), jnp.float32)
    max_dcg = jnp.maximum(jnp.sum(jnp.where(in_top, (jnp.exp2(y_ideal) - 1.0) / discounts, 0.0), axis=-1), eps)
    gains = (jnp.exp2(y_by_pred) - 1.0) / max_dcg[:, None]
    weights = _lambda_weights(weighing_scheme, gains, discounts, y_by_pred, mu)

    pairs = valid_by_pred[:, :, None] & valid_by_pred[:, None, :]
    if weighing_scheme != "ndcgLoss1":
        pairs &= y_by_pred[:, :, None] > y_by_pred[:, None, :]
    pairs &= jnp.asarray(in_top[:, None] & in_top[None, :])[None]

    diffs = jnp.clip(s_sorted[:, :, None] - s_sorted[:, None, :], -1e8, 1e8)
    log_eps = math.log(eps)
    # log(clamp(clamp(sigmoid, eps) ** w, eps)) == max(w * max(log_sigmoid, log eps), log eps) for w >= 0.
    log_p = jnp.maximum(weights * jnp.maximum(jax.nn.log_sigmoid(sigma * diffs), log_eps), log_eps)
    if log_base == "binary":
        log_p = log_p / math.log(2.0)
    return _reduce_pairs(-log_p, pairs, reduction, "lambda_loss")


def margin_mse(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    pairs: Literal["all", "top"] = "all",
    reduction: Reduction = "mean",
) -> Array:
    """Margin-MSE (Hofstätter et al. 2020) generalised to lists.

    Mean over pairs of real passages of ((s_i - s_j) - (t_i - t_j))**2, with
    t the teacher's scores. ``pairs="all"``: every unordered pair i < j;
    ``pairs="top"``: the teacher's best passage against each other one (the
    original positive/negative triples). Needs ``teacher_scores``; masking only
    (padding has no teacher score).
    """
    if teacher_scores is None:
        raise ValueError("margin_mse: teacher_scores is required (float [batch, num_passages]), got None")
    scores, teacher_ranks, mask, teacher_scores = check_ranking_inputs(
        scores, teacher_ranks, mask, teacher_scores, where="margin_mse")
    n = scores.shape[-1]
    both = mask[:, :, None] & mask[:, None, :]
    if pairs == "all":
        chosen = both & jnp.asarray(np.triu(np.ones((n, n), bool), k=1))[None]
    elif pairs == "top":
        top = jnp.argmin(jnp.where(mask, teacher_ranks, jnp.iinfo(jnp.int32).max), axis=-1)
        is_top = jax.nn.one_hot(top, n, dtype=jnp.bool_)
        chosen = both & is_top[:, :, None] & ~is_top[:, None, :]
    else:
        raise OptionError(f"margin_mse: pairs must be 'all' or 'top', got {pairs!r}")
    student = scores[:, :, None] - scores[:, None, :]
    teacher = teacher_scores[:, :, None] - teacher_scores[:, None, :]
    return _reduce_pairs(jnp.square(student - teacher), chosen, reduction, "margin_mse")


def softmax_ce(
    scores: Array,
    teacher_ranks: Array,
    mask: Array,
    teacher_scores: Optional[Array] = None,
    *,
    padding: Padding = "mask",
    reduction: Reduction = "mean",
) -> Array:
    """InfoNCE: cross-entropy of the teacher's best passage against all real ones.

    -log softmax(s)[top], top = the real passage with the smallest teacher
    rank (first by position on ties). TWOLAR's ``softmax_ce_loss`` takes
    position 0 with the padding strings in the softmax ("twolar" mode).
    """
    del teacher_scores
    scores, teacher_ranks, mask, _ = check_ranking_inputs(scores, teacher_ranks, mask, where="softmax_ce")
    ranks, valid = _effective(scores, teacher_ranks, mask, padding, "softmax_ce")
    top = jnp.argmin(jnp.where(valid, ranks, jnp.iinfo(jnp.int32).max), axis=-1)
    log_probs = _masked_log_softmax(scores, valid)
    per_query = -jnp.take_along_axis(log_probs, top[:, None], axis=-1)[:, 0]
    return _reduce_queries(per_query, jnp.any(valid, axis=-1), reduction, "softmax_ce")


LOSSES: dict[str, LossFn] = {
    "rank_net": rank_net,
    "list_net": list_net,
    "lambda_loss": lambda_loss,
    "margin_mse": margin_mse,
    "softmax_ce": softmax_ce,
}


def get_loss(name: str) -> LossFn:
    """The loss called ``name`` (see ``LOSSES``); all share one signature."""
    try:
        return LOSSES[name]
    except KeyError:
        raise OptionError(f"loss={name!r}: expected one of {sorted(LOSSES)}") from None
