"""Sharded train steps on 8 simulated CPU devices equal the single-device step (fp32, 1e-5)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.train_helpers import synthetic_batch, tiny_config
from twolar_jax import optimizers, partitioning, train_state
from twolar_jax.model import network
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.partitioner import Partitioner
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.trainer import Trainer

RULES = partitioning.load_logical_axis_rules()
# (data, fsdp, model): the 8x1, 2x4 and 1x8 (data x model), plus pure fsdp.
MESHES = [(8, 1, 1), (2, 1, 4), (1, 1, 8), (1, 8, 1)]


def _run(mesh_shape, steps=2):
    model = PointwiseCrossEncoder(tiny_config(dropout_rate=0.0), loss_name="rank_net")
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    run = Trainer(model, Partitioner(mesh, RULES), optimizer=OptimizerConfig(learning_rate=5e-5),  # TWOLAR's AdamW
                  total_steps=steps, enable_dropout=False)
    state = train_state.init_sharded_state(model.init_params, run.tx, jax.random.PRNGKey(0), run.shardings)
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0))
    step = run.train_step(batch)
    losses = []
    for _ in range(steps):
        # The same batch twice: the second loss must be lower (the update did something).
        state, metrics = step(state, run.shard(batch), jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state, run.shardings


@pytest.fixture(scope="module")
def reference():
    return _run((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(reference, mesh_shape):
    ref_losses, ref_params, _, _ = reference
    losses, params, state, shardings = _run(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    assert losses[1] < losses[0]  # the step does something
    flat, _ = jax.tree_util.tree_flatten_with_path(ref_params)
    for (path, ref), got in zip(flat, jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The state really is laid out as the shardings say (donation and out_shardings kept it there).
    for arr, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)


def test_shard_batch_places_rows_by_data_and_fsdp():
    mesh = partitioning.make_mesh((2, 2, 2))
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0))
    placed = Partitioner(mesh, RULES).shard_batch(batch, LISTWISE_GROUP_BATCH)
    tokens = placed["encoder_input_tokens"]
    assert tokens.shape == batch["encoder_input_tokens"].shape
    assert tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    # Each of the 4 batch shards holds 2 consecutive rows, replicated over 'model'.
    for shard in tokens.addressable_shards:
        rows = shard.index[0]
        np.testing.assert_array_equal(shard.data, batch["encoder_input_tokens"][rows])
        assert rows.stop - rows.start == 2
    assert partitioning.batch_parallelism(mesh, RULES) == 4


def test_mesh_fill_and_auto_axes():
    assert partitioning.fill_mesh_shape((-1, 1, 2), 8) == (4, 1, 2)
    assert partitioning.fill_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one -1"):
        partitioning.fill_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        partitioning.fill_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices, but 8"):
        partitioning.fill_mesh_shape((2, 2, 1), 8)
    mesh = partitioning.make_mesh((-1, 1, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_uneven_dimension_is_replicated_not_rejected():
    mesh = partitioning.make_mesh((1, 1, 8))
    # 4 heads cannot split 8 ways; vocab 32128 can.
    assert partitioning.logical_to_spec(("embed", "heads", "kv"), RULES, shape=(64, 4, 16), mesh=mesh) == \
        jax.sharding.PartitionSpec("fsdp", None, None)
    assert partitioning.logical_to_spec(("vocab", "embed"), RULES, shape=(32128, 64), mesh=mesh) == \
        jax.sharding.PartitionSpec("model", "fsdp")
    # Activations: 'batch' takes fsdp first, so 'embed' falls through to its None rule.
    assert partitioning.logical_to_spec(("batch", "length", "embed"), RULES) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, None)


def test_rules_table_errors_name_the_entry(tmp_path):
    with pytest.raises(ValueError, match=r"rule #1 .*expected \(logical_name, mesh_axes\)"):
        partitioning.normalize_rules([("batch", "data"), ("embed",)])
    bad = tmp_path / "rules.gin"
    bad.write_text("OTHER = 1\n")
    with pytest.raises(ValueError, match="no LOGICAL_AXIS_RULES"):
        partitioning.load_logical_axis_rules(bad)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_shard_optimizer_state_follows_params(name):
    config = tiny_config()
    opt, _ = optimizers.make_optimizer(name=name, weight_decay=0.0 if name == "adafactor" else 0.01)
    mesh = partitioning.make_mesh((2, 2, 2))
    init = lambda r: network.init_params(config, r)  # noqa: E731
    shapes = train_state.abstract_state(init, opt, jax.random.PRNGKey(0))
    sh = train_state.state_shardings(shapes, network.logical_axes(config), mesh, RULES)
    emb_spec = sh.params["token_embedder"]["embedding"].spec
    assert emb_spec == jax.sharding.PartitionSpec("model", "fsdp")
    opt_flat = jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]
    shapes_flat = jax.tree_util.tree_leaves(shapes.opt_state)
    found = []
    for (path, s), shp in zip(opt_flat, shapes_flat):
        key = jax.tree_util.keystr(path)
        if "token_embedder" in key:
            found.append((key, shp.shape, s.spec))
    assert found, "no optimizer state for the embedding"
    for key, shape, spec in found:
        if shape == (32128, 64):
            assert spec == emb_spec, key
        elif shape == (32128,):  # Adafactor's factored row statistics keep the vocab split
            assert spec == jax.sharding.PartitionSpec("model"), key
        elif shape == (64,):
            assert spec == jax.sharding.PartitionSpec("fsdp"), key
    if name == "adamw":
        assert sum(shape == (32128, 64) for _, shape, _ in found) == 2  # mu and nu
