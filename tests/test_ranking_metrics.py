"""In-graph ranking metrics: parity with scipy/sklearn, hand-computed values, masking, jit, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score

from twolar_jax.ranking_metrics import kendall_tau, ndcg, pairwise_agreement, ranking_metrics


def _batch(seed, b=4, n=7, tie_scores=False):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, n)).astype(np.float32)
    if tie_scores:
        s = np.round(s)  # many ties
    ranks = np.stack([rng.permutation(n) for _ in range(b)]).astype(np.int32)
    mask = np.ones((b, n), bool)
    mask[1, 5:] = False
    mask[3, 3:] = False
    return s, ranks, mask


@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_matches_scipy_tau_b(ties):
    s, ranks, mask = _batch(0, tie_scores=ties)
    got = np.asarray(kendall_tau(jnp.asarray(s), jnp.asarray(ranks), jnp.asarray(mask), reduction="none"))
    expected = [kendalltau(s[q][mask[q]], -ranks[q][mask[q]]).statistic for q in range(len(s))]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    mean = float(kendall_tau(jnp.asarray(s), jnp.asarray(ranks), jnp.asarray(mask)))
    assert mean == pytest.approx(float(np.mean(expected)), rel=1e-5, abs=1e-6)


def test_kendall_tau_by_hand_and_undefined_queries():
    # Scores order 0 > 2 > 1; teacher 0 > 1 > 2: pairs (0,1) C, (0,2) C, (1,2) D -> (2 - 1) / 3.
    s = jnp.asarray([[3.0, 1.0, 2.0, 100.0], [1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 5.0, 0.0]])
    ranks = jnp.asarray([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], jnp.int32)
    per_query = np.asarray(kendall_tau(s, ranks, mask, reduction="none"))
    # Query 1 has one real passage, query 2 has all (real) scores tied: both undefined -> 0, skipped.
    np.testing.assert_allclose(per_query, [1.0 / 3.0, 0.0, 0.0], atol=1e-6)
    assert float(kendall_tau(s, ranks, mask)) == pytest.approx(1.0 / 3.0, rel=1e-6)
    assert float(kendall_tau(s[1:], ranks[1:], mask[1:])) == 0.0


def test_pairwise_agreement_by_hand_with_ties_and_relation_to_tau():
    s = jnp.asarray([[3.0, 1.0, 1.0, 2.0]])
    ranks = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
    mask = jnp.ones((1, 4), bool)
    # Pairs (i<j in teacher order): (0,1) 1, (0,2) 1, (0,3) 1, (1,2) tie 0.5, (1,3) 0, (2,3) 0.
    assert float(pairwise_agreement(s, ranks, mask)) == pytest.approx(3.5 / 6, rel=1e-6)
    s2, r2, m2 = (jnp.asarray(x) for x in _batch(1))
    np.testing.assert_allclose(
        np.asarray(kendall_tau(s2, r2, m2, reduction="none")),
        2 * np.asarray(pairwise_agreement(s2, r2, m2, reduction="none")) - 1, rtol=1e-5, atol=1e-6)


def test_padding_is_ignored():
    s = jnp.asarray([[0.5, -3.0, 9.0, 0.1]])
    ranks = jnp.asarray([[0, 5, 0, 1]], jnp.int32)  # junk ranks on the padded items
    mask = jnp.asarray([[1, 0, 0, 1]], jnp.int32)
    ref = (jnp.asarray([[0.5, 0.1]]), jnp.asarray([[0, 1]], jnp.int32), jnp.ones((1, 2), bool))
    for fn in (kendall_tau, pairwise_agreement, ndcg):
        assert float(fn(s, ranks, mask)) == pytest.approx(float(fn(*ref)), rel=1e-6)
    assert float(kendall_tau(s, ranks, mask)) == pytest.approx(1.0)


def test_ndcg_by_hand():
    # Teacher 0 > 1 > 2 (rel 1, 1/2, 1/3); predicted order 1, 0, 2.
    s = jnp.asarray([[0.5, 0.9, 0.1]])
    ranks = jnp.asarray([[0, 1, 2]], jnp.int32)
    mask = jnp.ones((1, 3), bool)
    dcg = 0.5 / math.log2(2) + 1.0 / math.log2(3) + (1 / 3) / math.log2(4)
    idcg = 1.0 / math.log2(2) + 0.5 / math.log2(3) + (1 / 3) / math.log2(4)
    assert float(ndcg(s, ranks, mask, k=None)) == pytest.approx(dcg / idcg, rel=1e-6)
    assert float(ndcg(s, ranks, mask, k=1)) == pytest.approx(0.5, rel=1e-6)
    exp2 = lambda r: 2 ** r - 1  # noqa: E731
    dcg2 = exp2(0.5) + exp2(1.0) / math.log2(3) + exp2(1 / 3) / 2
    idcg2 = exp2(1.0) + exp2(0.5) / math.log2(3) + exp2(1 / 3) / 2
    assert float(ndcg(s, ranks, mask, gain="exp2")) == pytest.approx(dcg2 / idcg2, rel=1e-6)


@pytest.mark.parametrize("k", [None, 1, 3, 5])
def test_ndcg_matches_sklearn_as_in_twolar_validation(k):
    # TWOLAR validates with sklearn.metrics.ndcg_score(y_true=1/(i+1), scores); no score ties here.
    s, ranks, mask = _batch(2)
    got = np.asarray(ndcg(jnp.asarray(s), jnp.asarray(ranks), jnp.asarray(mask), k=k, reduction="none"))
    expected = [ndcg_score([1.0 / (ranks[q][mask[q]] + 1.0)], [s[q][mask[q]]], k=k) for q in range(len(s))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ranking_metrics_dict_and_jit():
    s, ranks, mask = (jnp.asarray(x) for x in _batch(3))
    eager = ranking_metrics(s, ranks, mask)
    assert sorted(eager) == ["kendall_tau", "ndcg@10", "pairwise_agreement"]
    jitted = jax.jit(ranking_metrics)(s, ranks, mask.astype(jnp.int32))
    for key, value in eager.items():
        assert value.dtype == jnp.float32 and value.shape == ()
        assert float(jitted[key]) == pytest.approx(float(value), rel=1e-6)
    # A perfect student gets tau = agreement = ndcg = 1.
    perfect = ranking_metrics(-ranks.astype(jnp.float32), ranks, mask, ndcg_k=None)
    for value in perfect.values():
        assert float(value) == pytest.approx(1.0, rel=1e-6)


def test_bad_inputs_raise_clear_errors():
    s, r, m = jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match=r"kendall_tau: teacher_ranks has shape \(2, 4\) but scores has shape \(2, 3\)"):
        kendall_tau(s, jnp.zeros((2, 4), jnp.int32), m)
    with pytest.raises(ValueError, match=r"ndcg: scores must have shape \[batch, num_passages\], got shape \(2, 3, 1\)"):
        ndcg(jnp.zeros((2, 3, 1)), r, m)
    with pytest.raises(ValueError, match=r"pairwise_agreement: mask has shape \(2,\)"):
        pairwise_agreement(s, r, jnp.ones(2, bool))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ndcg(s, r, m, k=0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        kendall_tau(s, r, m, reduction="pooled")
