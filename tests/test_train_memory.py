"""What the train step keeps in memory: the CPU compile options and the rematerialised gated GELU.

On CPU every byte of a step's temporaries is freshly mapped and faulted in each step, so these two are
speed, not just footprint (benchmarks/train_step.py prints the faults and system time per step).
"""
from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from tests.train_helpers import synthetic_batch, tiny_config
from twolar_jax import compiler_options, optimizers, partitioning, train_state
from twolar_jax.model import network
from twolar_jax.partitioner import Partitioner
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.train_step import make_train_step

CONFIG = tiny_config(dropout_rate=0.0)


def test_compiler_options_per_platform():
    assert compiler_options.for_platform("cpu") == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert compiler_options.for_platform("CPU") == compiler_options.for_platform("cpu")
    assert compiler_options.for_platform("tpu") == {} and compiler_options.for_platform("gpu") == {}
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert compiler_options.for_mesh(mesh) == compiler_options.for_platform(jax.devices()[0].platform)


def test_compiler_options_are_accepted_by_xla_and_shrink_the_cpu_step():
    """The trainer's step compiles with the options (a misspelt option or value is an XLA error) and
    needs fewer temporary bytes than the same step under XLA:CPU's default scheduler."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    config = tiny_config(dropout_rate=0.0, num_encoder_layers=4)
    opt, schedule = optimizers.make_optimizer(learning_rate=1e-3)
    fn = make_train_step(PointwiseCrossEncoder(config, loss_name="rank_net"), opt, schedule, enable_dropout=False)
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = partitioning.load_logical_axis_rules()
    init = lambda r: network.init_params(config, r)  # noqa: E731
    shapes = train_state.abstract_state(init, opt, jax.random.PRNGKey(0))
    shardings = train_state.state_shardings(shapes, network.logical_axes(config), mesh, rules)
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0, batch_size=4, group_size=8, max_length=128))
    p = Partitioner(mesh, rules)
    step = p.partition(fn, in_shardings=(shardings, p.batch_shardings(batch, LISTWISE_GROUP_BATCH), p.replicated()),
                       out_shardings=(shardings, p.replicated()), donate_argnums=(0,))
    ours = step.lower(shapes, batch, jax.random.PRNGKey(0)).compile().memory_analysis().temp_size_in_bytes
    with partitioning.activation_context(mesh, rules):
        default = jax.jit(fn).lower(shapes, batch, jax.random.PRNGKey(0)).compile()
    assert ours < 0.9 * default.memory_analysis().temp_size_in_bytes


def _residuals(fn, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return [line for line in out.getvalue().splitlines() if "from the argument" not in line]


def _mlp_loss(config):
    block = network.MlpBlock(config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, config.d_model))
    params = block.init(jax.random.PRNGKey(0), x, enable_dropout=False)
    return (lambda p, x: jnp.sum(block.apply(p, x, enable_dropout=False) ** 2)), params, x


def test_gated_gelu_saves_only_its_projections(monkeypatch):
    """Unrematerialised layers keep the two projections for the GELU's backward, not its tanh
    intermediates; with the plain function (what remat=True layers use) the tanh would be kept."""
    loss, params, x = _mlp_loss(CONFIG)
    kept = _residuals(loss, params, x)
    hidden = f"[2,8,{CONFIG.d_ff}]"
    assert not [line for line in kept if "tanh" in line or "gated_gelu" in line], kept
    assert len([line for line in kept if hidden in line]) == 2, kept  # gate and linear projections
    monkeypatch.setattr(network, "gated_gelu_rematerialised", network.gated_gelu)
    plain = _residuals(*_mlp_loss(CONFIG))
    assert [line for line in plain if "tanh" in line], plain


def test_gated_gelu_remat_same_gradients(monkeypatch):
    """The rematerialised GELU gives the plain function's loss and gradients (same arithmetic, recomputed)."""
    loss, params, x = _mlp_loss(CONFIG)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    monkeypatch.setattr(network, "gated_gelu_rematerialised", network.gated_gelu)
    loss_plain, _, _ = _mlp_loss(CONFIG)
    value_plain, grads_plain = jax.value_and_grad(loss_plain, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(value, value_plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
