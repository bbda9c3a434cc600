"""Ranking losses: hand-computed values, masking vs TWOLAR padding, rax agreement, grads, jit, errors."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rax

from twolar_jax import losses
from twolar_jax.losses import get_loss, lambda_loss, list_net, margin_mse, rank_net, softmax_ce

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x), dtype=dtype)


def log_sigmoid(x: float) -> float:
    return -softplus(-x)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


# ----------------------------------------------------------------------------- rank_net


def test_rank_net_three_items_by_hand():
    s = [1.0, 0.5, 2.0]
    # Teacher order 0 > 1 > 2: pairs (0,1), (0,2), (1,2), each log(1 + exp(s_j - s_i)).
    expected = (math.log(1 + math.exp(0.5 - 1.0)) + math.log(1 + math.exp(2.0 - 1.0))
                + math.log(1 + math.exp(2.0 - 0.5))) / 3
    got = rank_net(arr([s]), arr([[0, 1, 2]], jnp.int32), arr([[1, 1, 1]], jnp.int32))
    assert got.dtype == jnp.float32 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_rank_net_four_items_unsorted_ranks_and_ties_by_hand():
    s = [0.3, -1.2, 2.5, 0.0]
    ranks = [2, 0, 1, 2]  # items 0 and 3 tied by the teacher: that pair is skipped.
    pairs = [(i, j) for i in range(4) for j in range(4) if ranks[i] < ranks[j]]
    assert len(pairs) == 5
    expected = sum(math.log(1 + math.exp(s[j] - s[i])) for i, j in pairs) / len(pairs)
    got = rank_net(arr([s]), arr([ranks], jnp.int32), arr([[True] * 4], bool))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_rank_net_padding_modes():
    s_real = [1.0, 0.5, 2.0]
    base = rank_net(arr([s_real]), arr([[0, 1, 2]], jnp.int32), arr([[1, 1, 1]], jnp.int32))
    # A padded passage in the middle, with a high score and a junk rank.
    s = [1.0, 3.0, 0.5, 2.0]
    ranks = arr([[0, 7, 1, 2]], jnp.int32)
    mask = arr([[1, 0, 1, 1]], jnp.int32)
    masked = rank_net(arr([s]), ranks, mask)
    assert float(masked) == pytest.approx(float(base), rel=1e-6)
    # TWOLAR: the padding passage is an item ranked last (effective order 0, 3, 1, 2 -> pad last).
    bottom = rank_net(arr([s]), ranks, mask, padding="twolar")
    order = [0, 2, 3, 1]  # indices best first
    pairs = [(order[a], order[b]) for a in range(4) for b in range(a + 1, 4)]
    expected = sum(math.log(1 + math.exp(s[j] - s[i])) for i, j in pairs) / 6
    assert float(bottom) == pytest.approx(expected, rel=1e-6)
    assert abs(float(bottom) - float(base)) > 0.1


def test_rank_net_two_padded_passages_keep_position_order_in_twolar_mode():
    s = [0.0, 1.0, -1.0, 2.0]
    ranks = arr([[1, 0, 0, 0]], jnp.int32)
    mask = arr([[1, 1, 0, 0]], bool)
    # Effective ranks: 1, 0, then the pads 2 (index 2) and 3 (index 3), as TWOLAR's position labels.
    eff = [1, 0, 2, 3]
    pairs = [(i, j) for i in range(4) for j in range(4) if eff[i] < eff[j]]
    expected = sum(softplus(s[j] - s[i]) for i, j in pairs) / len(pairs)
    got = rank_net(arr([s]), ranks, mask, padding="twolar")
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_rank_net_reductions():
    s = [[1.0, 0.5, 2.0, -1.0], [0.2, -0.4, 0.9, 5.0]]
    ranks = arr([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
    mask = arr([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)
    q0 = [softplus(s[0][j] - s[0][i]) for i in range(4) for j in range(i + 1, 4)]
    q1 = [softplus(s[1][1] - s[1][0])]
    per_query = rank_net(arr(s), ranks, mask, reduction="none")
    np.testing.assert_allclose(np.asarray(per_query), [sum(q0) / 6, q1[0]], rtol=1e-6)
    mean = rank_net(arr(s), ranks, mask)
    assert float(mean) == pytest.approx((sum(q0) / 6 + q1[0]) / 2, rel=1e-6)
    pooled = rank_net(arr(s), ranks, mask, reduction="pooled")
    assert float(pooled) == pytest.approx((sum(q0) + q1[0]) / 7, rel=1e-6)


def test_rank_net_query_without_pairs_is_skipped_not_nan():
    s = arr([[1.0, 2.0, 3.0], [0.5, 0.1, 0.0]])
    ranks = arr([[0, 1, 2], [0, 1, 2]], jnp.int32)
    mask = arr([[1, 0, 0], [1, 1, 0]], jnp.int32)
    per_query = rank_net(s, ranks, mask, reduction="none")
    assert float(per_query[0]) == 0.0
    assert float(rank_net(s, ranks, mask)) == pytest.approx(softplus(0.1 - 0.5), rel=1e-6)
    assert float(rank_net(s[:1], ranks[:1], mask[:1])) == 0.0


def test_rank_net_stable_for_large_gaps():
    s = arr([[-500.0, 500.0]])
    got = rank_net(s, arr([[0, 1]], jnp.int32), arr([[1, 1]], jnp.int32))
    assert float(got) == pytest.approx(1000.0, rel=1e-6)
    g = jax.grad(lambda x: rank_net(x, arr([[0, 1]], jnp.int32), arr([[1, 1]], jnp.int32)))(s)
    np.testing.assert_allclose(np.asarray(g), [[-1.0, 1.0]], rtol=1e-6)


# ----------------------------------------------------------------------------- rax agreement


def _random_batch(seed, b=3, n=6):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, n)).astype(np.float32) * 2
    ranks = np.stack([rng.permutation(n) for _ in range(b)]).astype(np.int32)
    mask = np.ones((b, n), bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return jnp.asarray(s), jnp.asarray(ranks), jnp.asarray(mask)


def test_rank_net_agrees_with_rax_pairwise_logistic_loss():
    s, ranks, mask = _random_batch(0)
    labels = 1.0 / (ranks + 1.0)  # TWOLAR's targets; rax pairs are labels_i > labels_j as well.
    # rax reduce_fn=jnp.mean is one mean over all valid pairs of the batch == reduction="pooled".
    ref = rax.pairwise_logistic_loss(s, labels, where=mask, reduce_fn=jnp.mean)
    assert float(rank_net(s, ranks, mask, reduction="pooled")) == pytest.approx(float(ref), rel=1e-5)
    # Per query: rax's unreduced pair losses ([B, N*N], 0 where invalid) summed / number of teacher-ordered pairs.
    pair = rax.pairwise_logistic_loss(s, labels, where=mask, reduce_fn=None)
    m = np.asarray(mask)
    n_pairs = np.array([mq.sum() * (mq.sum() - 1) / 2 for mq in m])
    np.testing.assert_allclose(np.asarray(rank_net(s, ranks, mask, reduction="none")),
                               np.asarray(pair).reshape(3, -1).sum(-1) / n_pairs, rtol=1e-5)


def test_list_net_agrees_with_rax_softmax_loss():
    s, ranks, mask = _random_batch(1)
    y = np.where(np.asarray(mask), 1.0 / (np.asarray(ranks) + 1.0), -np.inf)
    target = np.exp(y - y.max(-1, keepdims=True))
    target = target / target.sum(-1, keepdims=True)
    # rax.softmax_loss normalises labels by their sum (already 1) and reduces by the mean over lists.
    ref = rax.softmax_loss(s, jnp.asarray(target, jnp.float32), where=mask)
    assert float(list_net(s, ranks, mask, eps=0.0)) == pytest.approx(float(ref), rel=1e-5)
    # TWOLAR's eps=1e-10 inside the log changes the value by < 1e-8 relative here.
    assert float(list_net(s, ranks, mask)) == pytest.approx(float(ref), rel=1e-6)


def test_softmax_ce_agrees_with_rax_softmax_loss_on_one_hot_top():
    s, ranks, mask = _random_batch(2)
    masked_ranks = np.where(np.asarray(mask), np.asarray(ranks), 99)
    one_hot = (masked_ranks == masked_ranks.min(-1, keepdims=True)).astype(np.float32)
    ref = rax.softmax_loss(s, jnp.asarray(one_hot), where=mask)
    assert float(softmax_ce(s, ranks, mask)) == pytest.approx(float(ref), rel=1e-5)


def test_margin_mse_agrees_with_rax_pairwise_mse_loss():
    s, ranks, mask = _random_batch(3)
    t = jnp.asarray(np.random.default_rng(9).normal(size=s.shape), jnp.float32)
    # rax averages over all n*n ordered pairs of real items (the diagonal counts, with 0 loss);
    # we average over the n*(n-1)/2 unordered pairs: ours = rax * n / (n - 1) per query.
    ref = rax.pairwise_mse_loss(s, t, where=mask, reduce_fn=None)
    n = np.asarray(mask).sum(-1)
    rax_per_query = np.asarray(ref).reshape(3, -1).sum(-1) / (n * n)
    np.testing.assert_allclose(np.asarray(margin_mse(s, ranks, mask, t, reduction="none")),
                               rax_per_query * n / (n - 1), rtol=1e-5)


def test_lambda_loss_ndcg2_agrees_with_rax_dcg2_lambdaweight():
    s, ranks, mask = _random_batch(4)
    n = s.shape[-1]
    labels = jnp.where(mask, 1.0 / (ranks + 1.0), 0.0)
    ref = rax.pairwise_logistic_loss(
        s, labels, where=mask, reduce_fn=jnp.mean,
        lambdaweight_fn=functools.partial(rax.dcg2_lambdaweight, normalize=True))
    # rax scales its weights by the list size n and uses natural logs; TWOLAR's scheme uses log2.
    ours = lambda_loss(s, ranks, mask, weighing_scheme="ndcgLoss2", reduction="pooled")
    assert float(ours) == pytest.approx(float(ref) / (n * LN2), rel=1e-5)


def test_lambda_loss_without_scheme_is_log2_rank_net():
    s, ranks, mask = _random_batch(5)
    for red in ("mean", "pooled", "none"):
        a = lambda_loss(s, ranks, mask, weighing_scheme=None, reduction=red)
        b = rank_net(s, ranks, mask, reduction=red)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) / LN2, rtol=1e-5)
        c = lambda_loss(s, ranks, mask, weighing_scheme=None, log_base="natural", reduction=red)
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=1e-5)


# ----------------------------------------------------------------------------- other losses by hand


def test_list_net_three_items_by_hand():
    s = [0.7, -0.2, 1.5]
    y = [1.0, 0.5, 1.0 / 3.0]
    p, q = softmax(y), softmax(s)
    expected = -sum(pi * math.log(qi + 1e-10) for pi, qi in zip(p, q))
    got = list_net(arr([s]), arr([[0, 1, 2]], jnp.int32), arr([[1, 1, 1]], jnp.int32))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_list_net_padding_modes():
    s = [0.7, 9.0, -0.2, 1.5]
    ranks = arr([[0, 0, 1, 2]], jnp.int32)
    mask = arr([[1, 0, 1, 1]], jnp.int32)
    base = list_net(arr([[0.7, -0.2, 1.5]]), arr([[0, 1, 2]], jnp.int32), arr([[1, 1, 1]], jnp.int32))
    assert float(list_net(arr([s]), ranks, mask)) == pytest.approx(float(base), rel=1e-6)
    # Bottom mode: the pad takes label 1/(3+1) and its score joins the softmax.
    p = softmax([1.0, 0.25, 0.5, 1.0 / 3.0])
    q = softmax(s)
    expected = -sum(pi * math.log(qi + 1e-10) for pi, qi in zip(p, q))
    assert float(list_net(arr([s]), ranks, mask, padding="twolar")) == pytest.approx(expected, rel=1e-6)


def _lambda_ndcg2_by_hand(s, ranks, k=None):
    """TWOLAR's ndcgLoss2 from its definition, on one query of real items, with plain floats."""
    n = len(s)
    y = [1.0 / (r + 1) for r in ranks]
    order = sorted(range(n), key=lambda i: -s[i])
    pos = {i: p + 1 for p, i in enumerate(order)}  # 1-based positions in the predicted order
    k = n if k is None else k
    ideal = sorted(y, reverse=True)
    max_dcg = sum((2 ** ideal[p] - 1) / math.log2(p + 2) for p in range(k))
    gain = [(2 ** yi - 1) / max_dcg for yi in y]
    total, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            if y[i] > y[j] and pos[i] <= k and pos[j] <= k:
                d = abs(pos[i] - pos[j])
                w = abs(1 / math.log2(1 + d) - 1 / math.log2(2 + d)) * abs(gain[i] - gain[j])
                total += -w * log_sigmoid(s[i] - s[j]) / LN2
                count += 1
    return total / count


def test_lambda_loss_ndcg2_three_and_four_items_by_hand():
    s3, r3 = [0.2, 1.0, -0.3], [0, 1, 2]
    got = lambda_loss(arr([s3]), arr([r3], jnp.int32), arr([[1, 1, 1]], jnp.int32))
    assert float(got) == pytest.approx(_lambda_ndcg2_by_hand(s3, r3), rel=1e-5)
    s4, r4 = [0.4, -0.9, 2.2, 1.1], [3, 0, 2, 1]
    got = lambda_loss(arr([s4]), arr([r4], jnp.int32), arr([[1] * 4], jnp.int32))
    assert float(got) == pytest.approx(_lambda_ndcg2_by_hand(s4, r4), rel=1e-5)
    got_k = lambda_loss(arr([s4]), arr([r4], jnp.int32), arr([[1] * 4], jnp.int32), k=2)
    assert float(got_k) == pytest.approx(_lambda_ndcg2_by_hand(s4, r4, k=2), rel=1e-5)


def test_lambda_loss_masking_ignores_padding():
    s4, r4 = [0.4, -0.9, 2.2, 1.1], [3, 0, 2, 1]
    base = lambda_loss(arr([s4]), arr([r4], jnp.int32), arr([[1] * 4], jnp.int32))
    padded = lambda_loss(arr([s4 + [50.0]]), arr([r4 + [0]], jnp.int32), arr([[1] * 4 + [0]], jnp.int32))
    assert float(padded) == pytest.approx(float(base), rel=1e-6)


@pytest.mark.parametrize("scheme", [s for s in losses.LAMBDA_SCHEMES])
def test_lambda_loss_every_scheme_finite_with_grads(scheme):
    s, ranks, mask = _random_batch(6)
    f = functools.partial(lambda_loss, weighing_scheme=scheme)
    value, grad = jax.value_and_grad(f)(s, ranks, mask)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)


def test_margin_mse_by_hand_all_and_top():
    s = [1.0, 0.0, 0.5, 7.0]
    t = [3.0, 1.0, 2.0, -4.0]
    ranks = arr([[0, 2, 1, 3]], jnp.int32)
    mask = arr([[1, 1, 1, 0]], jnp.int32)
    pairs = [(0, 1), (0, 2), (1, 2)]
    sq = {p: ((s[p[0]] - s[p[1]]) - (t[p[0]] - t[p[1]])) ** 2 for p in pairs}
    got = margin_mse(arr([s]), ranks, mask, arr([t]))
    assert float(got) == pytest.approx(sum(sq.values()) / 3, rel=1e-6)
    got_top = margin_mse(arr([s]), ranks, mask, arr([t]), pairs="top")
    assert float(got_top) == pytest.approx((sq[(0, 1)] + sq[(0, 2)]) / 2, rel=1e-6)


def test_softmax_ce_by_hand_and_padding_modes():
    s = [0.3, 2.0, -1.0, 0.8]
    ranks = arr([[1, 0, 2, 0]], jnp.int32)
    mask = arr([[1, 1, 1, 0]], jnp.int32)
    # Top real passage is index 1; the pad (index 3) is out of the softmax when masked ...
    expected = -math.log(softmax(s[:3])[1])
    assert float(softmax_ce(arr([s]), ranks, mask)) == pytest.approx(expected, rel=1e-6)
    # ... and in it with TWOLAR's padding-as-bottom.
    expected_bottom = -math.log(softmax(s)[1])
    assert float(softmax_ce(arr([s]), ranks, mask, padding="twolar")) == pytest.approx(expected_bottom, rel=1e-6)


# ----------------------------------------------------------------------------- grads, jit, registry, errors

ALL = ["rank_net", "list_net", "lambda_loss", "margin_mse", "softmax_ce"]


@pytest.mark.parametrize("name", ALL)
def test_gradient_pushes_misordered_pair_the_right_way(name):
    # The teacher prefers item 0 but the student scores item 1 higher.
    s = arr([[0.0, 1.0, -0.5, 4.0]])
    ranks = arr([[0, 1, 2, 3]], jnp.int32)
    mask = arr([[1, 1, 1, 0]], jnp.int32)
    t = arr([[2.0, 0.0, -1.0, 0.0]])
    loss_fn = get_loss(name)
    grad = np.asarray(jax.grad(loss_fn)(s, ranks, mask, t))
    assert np.all(np.isfinite(grad))
    assert grad[0, 0] < 0 < grad[0, 1]  # gradient descent raises s_0, lowers s_1
    assert grad[0, 3] == 0.0  # the padded passage gets no gradient
    # One small step of gradient descent lowers the loss.
    before = float(loss_fn(s, ranks, mask, t))
    after = float(loss_fn(s - 0.05 * grad, ranks, mask, t))
    assert after < before


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["mean", "pooled", "none"])
def test_jit_matches_eager(name, reduction):
    s, ranks, mask = _random_batch(7)
    t = s * 0.5 + 1.0
    f = functools.partial(get_loss(name), reduction=reduction)
    eager = f(s, ranks, mask.astype(jnp.int32), t)
    jitted = jax.jit(f)(s, ranks, mask.astype(jnp.int32), t)
    assert eager.dtype == jnp.float32
    assert eager.shape == (() if reduction != "none" else (3,))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)


def test_registry():
    assert sorted(losses.LOSSES) == sorted(ALL)
    assert get_loss("rank_net") is rank_net
    with pytest.raises(ValueError, match="loss='ranknet'.*rank_net"):
        get_loss("ranknet")


@pytest.mark.parametrize("name", ALL)
def test_bad_shapes_raise_clear_errors(name):
    f = get_loss(name)
    s = jnp.zeros((2, 3))
    r = jnp.zeros((2, 3), jnp.int32)
    m = jnp.ones((2, 3), bool)
    t = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"scores must have shape \[batch, num_passages\], got shape \(3,\)"):
        f(jnp.zeros(3), r, m, t)
    with pytest.raises(ValueError, match=r"teacher_ranks has shape \(2, 4\) but scores has shape \(2, 3\)"):
        f(s, jnp.zeros((2, 4), jnp.int32), m, t)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but scores has shape \(2, 3\)"):
        f(s, r, jnp.ones((3, 2), bool), t)
    with pytest.raises(ValueError, match="teacher_ranks must be an integer array"):
        f(s, jnp.zeros((2, 3)), m, t)
    with pytest.raises(ValueError, match="mask must be bool or integer"):
        f(s, r, jnp.ones((2, 3)), t)
    with pytest.raises(ValueError, match=f"^{name}: "):
        f(jnp.zeros(3), r, m, t)


def test_option_errors():
    s, r, m = jnp.zeros((1, 3)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool)
    with pytest.raises(ValueError, match=r"teacher_scores has shape \(1, 2\)"):
        margin_mse(s, r, m, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="margin_mse: teacher_scores is required"):
        margin_mse(s, r, m)
    with pytest.raises(ValueError, match="padding must be 'mask' or 'twolar'"):
        rank_net(s, r, m, padding="zero")
    with pytest.raises(ValueError, match="reduction must be"):
        rank_net(s, r, m, reduction="sum")
    with pytest.raises(ValueError, match="weighing_scheme must be one of"):
        lambda_loss(s, r, m, weighing_scheme="ndcg3")
