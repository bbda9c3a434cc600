"""network._dense computes a projection the same way flat (one 2-D matmul, CPU) and as the einsum (TPU, GPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twolar_jax.model import network
from twolar_jax.model.config import T5Config

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


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("x_shape,k_shape,contract,spec", CASES)
def test_dense_equals_einsum_forward_and_gradient(x_shape, k_shape, contract, spec, flat):
    x, kernel = _arrays(x_shape, k_shape)
    np.testing.assert_allclose(network._dense(x, kernel, contract, flat=flat), jnp.einsum(spec, x, kernel), **TOL)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b)))

    ours = jax.grad(loss(lambda a, b: network._dense(a, b, contract, flat=flat)), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(x, kernel)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("flat", [True, False])
def test_dense_on_a_sharded_batch_and_sharded_heads_equals_unsharded(flat):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    x, kernel = _arrays((8, 6, 16), (16, 4, 3))
    fn = jax.jit(lambda a, b: network._dense(a, b, flat=flat),
                 in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "model"))),
                 out_shardings=NamedSharding(mesh, P("data", None, "model")))
    got = fn(x, kernel)
    assert got.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(got, jnp.einsum("bld,dhk->blhk", x, kernel), **TOL)


@pytest.mark.parametrize("flat", [True, False])
def test_dense_keeps_empty_leading_dims(flat):
    x, kernel = _arrays((0, 5, 8), (8, 3, 4))
    assert network._dense(x, kernel, flat=flat).shape == (0, 5, 3, 4)


def test_projection_auto_is_flat_on_cpu_only_and_explicit_values_win():
    auto = T5Config()
    assert network.resolve_projection(auto, "cpu") == "flat"
    assert network.resolve_projection(auto, "tpu") == "einsum"
    assert network.resolve_projection(auto, "gpu") == "einsum"
    assert network.resolve_projection(auto) == network.resolve_projection(auto, jax.default_backend())
    for kind in ("flat", "einsum"):
        assert {network.resolve_projection(T5Config(projection=kind), b) for b in ("cpu", "gpu", "tpu")} == {kind}
    with pytest.raises(ValueError, match="projection='rows'"):
        T5Config(projection="rows")


def test_model_gives_the_same_scores_with_either_projection():
    config = T5Config(vocab_size=61, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_encoder_layers=2,
                      num_decoder_layers=2, relative_attention_num_buckets=8, dropout_rate=0.0)
    params = network.init_params(config, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, 61, (3, 9)), jnp.int32)
    logits = {kind: network.T5(config.replace(projection=kind)).apply(
        {"params": params}, tokens, enable_dropout=False, method=network.T5.first_step_logits)
        for kind in ("flat", "einsum")}
    np.testing.assert_allclose(logits["flat"], logits["einsum"], rtol=1e-5, atol=1e-5)
