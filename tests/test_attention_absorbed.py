"""Cross-attention of a short decoder through the key/value kernels equals projecting keys and values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twolar_jax.model import network

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(q_len: int, kv_len: int = 11, d_model: int = 24, heads: int = 3, d_kv: int = 8):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (2, q_len, heads, d_kv))
    x = jax.random.normal(keys[1], (2, kv_len, d_model))
    wk = jax.random.normal(keys[2], (d_model, heads, d_kv)) * d_model ** -0.5
    wv = jax.random.normal(keys[3], (d_model, heads, d_kv)) * d_model ** -0.5
    tokens = np.ones((2, kv_len), np.int32)
    tokens[1, 7:] = 0  # padded keys in the second row
    return q, x, wk, wv, network._padding_bias(jnp.asarray(tokens)), keys[4]


def _projected(q, x, wk, wv, padding, rng, rate):
    key = jnp.einsum("bld,dhk->blhk", x, wk)
    value = jnp.einsum("bld,dhk->blhk", x, wv)
    return network._attend(q, key, value, None, padding, rng, rate)


@pytest.mark.parametrize("q_len", [1, 3])
def test_absorbed_cross_attention_matches_projected(q_len):
    q, x, wk, wv, padding, _ = _inputs(q_len)
    got = network._attend_absorbed(q, x, wk, wv, None, padding, None, 0.0)
    np.testing.assert_allclose(got, _projected(q, x, wk, wv, padding, None, 0.0), **TOL)


def test_absorbed_cross_attention_same_gradients_and_dropout_masks():
    q, x, wk, wv, padding, rng = _inputs(1)

    def loss(fn, args):
        return jnp.sum(jnp.sin(fn(*args, padding, rng, 0.3)))

    absorbed = jax.grad(lambda *a: loss(lambda q, x, wk, wv, p, r, t: network._attend_absorbed(
        q, x, wk, wv, None, p, r, t), a), argnums=(0, 1, 2, 3))(q, x, wk, wv)
    projected = jax.grad(lambda *a: loss(_projected, a), argnums=(0, 1, 2, 3))(q, x, wk, wv)
    for got, ref in zip(absorbed, projected):
        np.testing.assert_allclose(got, ref, **TOL)


def test_absorb_rule_picks_cross_attention_of_one_step_only():
    assert network.absorb_kv_projection(1, 128, 512, 64)  # scoring's first decoder step
    assert network.absorb_kv_projection(4, 512, 768, 64)  # a few teacher-forced steps
    assert not network.absorb_kv_projection(128, 128, 512, 64)  # encoder self-attention
    assert not network.absorb_kv_projection(1, 1, 512, 64)  # first-step self-attention: nothing to save
