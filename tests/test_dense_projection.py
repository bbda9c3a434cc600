"""network._dense (every projection as one flat 2-D matmul) computes the einsums it replaced, sharded too."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twolar_jax.model import network

TOL = dict(rtol=1e-6, atol=1e-6)


def _arrays(*shapes):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]


# (x shape, kernel shape, contracted dims, the einsum the model used before)
CASES = [
    ((2, 5, 8), (8, 3, 4), 1, "bld,dhk->blhk"),  # query/key/value: [embed] -> [heads, kv]
    ((2, 5, 3, 4), (3, 4, 8), 2, "bqhk,hkd->bqd"),  # out: [heads, kv] -> [embed]
    ((2, 5, 8), (8, 12), 1, "bld,df->blf"),  # mlp
]


@pytest.mark.parametrize("x_shape,k_shape,contract,spec", CASES)
def test_dense_equals_einsum_forward_and_gradient(x_shape, k_shape, contract, spec):
    x, kernel = _arrays(x_shape, k_shape)
    np.testing.assert_allclose(network._dense(x, kernel, contract), jnp.einsum(spec, x, kernel), **TOL)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b)))

    ours = jax.grad(loss(lambda a, b: network._dense(a, b, contract)), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(x, kernel)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, **TOL)


def test_dense_on_a_sharded_batch_and_sharded_heads_equals_unsharded():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    x, kernel = _arrays((8, 6, 16), (16, 4, 3))
    fn = jax.jit(lambda a, b: network._dense(a, b),
                 in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "model"))),
                 out_shardings=NamedSharding(mesh, P("data", None, "model")))
    got = fn(x, kernel)
    assert got.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(got, jnp.einsum("bld,dhk->blhk", x, kernel), **TOL)


def test_dense_keeps_empty_leading_dims():
    x, kernel = _arrays((0, 5, 8), (8, 3, 4))
    assert network._dense(x, kernel).shape == (0, 5, 3, 4)
