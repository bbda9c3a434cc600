"""A checkpoint saved on a 4x2 mesh restores on 1 device and on a 2x4 mesh with identical values."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.train_helpers import synthetic_batch, tiny_config
from twolar_jax import checkpointing, optimizers, partitioning, train_state
from twolar_jax.model import network
from twolar_jax.partitioner import Partitioner
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.train_step import make_train_step

RULES = partitioning.load_logical_axis_rules()
CONFIG = tiny_config(dropout_rate=0.0)


def _layout(mesh_shape):
    opt, schedule = optimizers.make_optimizer(learning_rate=1e-3)
    mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    init = lambda r: network.init_params(CONFIG, r)  # noqa: E731
    shapes = train_state.abstract_state(init, opt, jax.random.PRNGKey(0))
    shardings = train_state.state_shardings(shapes, network.logical_axes(CONFIG), mesh, RULES)
    return opt, schedule, mesh, init, shapes, shardings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two real AdamW steps on (data=4, model=2), then a save (so mu/nu are non-trivial)."""
    model_dir = tmp_path_factory.mktemp("mesh_ckpt")
    opt, schedule, mesh, init, shapes, shardings = _layout((4, 1, 2))
    state = train_state.init_sharded_state(init, opt, jax.random.PRNGKey(0), shardings)
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0))
    p = Partitioner(mesh, RULES)
    step = p.partition(make_train_step(PointwiseCrossEncoder(CONFIG), opt, schedule),
                       in_shardings=(shardings, p.batch_shardings(batch, LISTWISE_GROUP_BATCH), p.replicated()),
                       out_shardings=(shardings, p.replicated()), donate_argnums=(0,))
    for i in range(2):
        state, _ = step(state, p.shard_batch(LISTWISE_GROUP_BATCH.select(synthetic_batch(i)), LISTWISE_GROUP_BATCH),
                        jax.random.PRNGKey(1))
    assert state.params["token_embedder"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
    manager = checkpointing.make_manager(model_dir)
    checkpointing.save(manager, state, data_state={"batches_consumed": 2}, force=True)
    manager.wait_until_finished()
    manager.close()
    checkpointing.write_model_config(model_dir, CONFIG)
    return model_dir, jax.device_get(state)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 4)], ids=["1device", "2x4"])
def test_resume_on_another_mesh_restores_identical_state(saved, mesh_shape):
    model_dir, expected = saved
    _, _, mesh, _, shapes, shardings = _layout(mesh_shape)
    manager = checkpointing.make_manager(model_dir)
    state, meta = checkpointing.restore(manager, train_state.with_shardings(shapes, shardings))
    manager.close()
    assert meta == {"step": 2, "batches_consumed": 2} and int(state.step) == 2
    got_leaves = jax.tree_util.tree_leaves(state)
    want_flat, _ = jax.tree_util.tree_flatten_with_path(expected)
    assert len(got_leaves) == len(want_flat)
    for (path, want), got, sh in zip(want_flat, got_leaves, jax.tree_util.tree_leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
        assert got.sharding.is_equivalent_to(sh, got.ndim), jax.tree_util.keystr(path)


def test_resume_load_inference_params_single_device(saved):
    model_dir, expected = saved
    config, params = checkpointing.load_inference_params(model_dir)
    assert config == CONFIG
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected.params)):
        assert len(a.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7; have \\[2\\]"):
        checkpointing.load_inference_params(model_dir, step=7)


def test_resume_missing_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json: not found"):
        checkpointing.load_inference_params(tmp_path)
