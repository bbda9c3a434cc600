"""Layers under nn.scan (T5Config.scan_layers): the same function, the same parameters after a reshape."""
from __future__ import annotations

import json

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from tests.test_sharding_golden import golden_path
from tests.train_helpers import synthetic_batch
from twolar_jax import checkpointing, optimizers, partitioning, train_state
from twolar_jax.errors import CheckpointError
from twolar_jax.generation import generate
from twolar_jax.hf_conversion import load_hf_checkpoint, params_to_hf, save_hf_checkpoint
from twolar_jax.model import network
from twolar_jax.model.config import T5Config, preset
from twolar_jax.model.network import T5
from twolar_jax.model.scan import is_scanned, match_layout, stack_layers, unstack_layers
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.scoring import ScoreTokens
from twolar_jax.train_step import make_train_step

# Small, random, fp32; 3 encoder and 2 decoder layers so the two stacks' lengths differ.
CONFIG = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=3,
                  num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  dropout_rate=0.0)
SCANNED = CONFIG.replace(scan_layers=True)
TOL = dict(rtol=1e-5, atol=1e-5)


def _padded_batch() -> np.ndarray:
    rng = np.random.default_rng(1)
    tokens = np.zeros((3, 9), np.int32)
    for row, real in enumerate([9, 5, 0]):  # the last row is fully padded
        tokens[row, :real] = rng.integers(2, CONFIG.vocab_size, real)
        tokens[row, max(real - 1, 0)] = 1 if real else 0
    return tokens


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def params():
    return network.init_params(CONFIG, jax.random.PRNGKey(2))


@pytest.fixture(scope="module")
def stacked(params):
    return stack_layers(params, CONFIG)


def test_scan_stack_unstack_round_trip_is_exact(params, stacked):
    assert is_scanned(stacked) and not is_scanned(params)
    assert set(stacked["encoder"]) == {"layers", "relpos_bias", "encoder_norm"}
    assert stacked["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (3, 32, 48)
    assert stacked["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    back = unstack_layers(stacked, CONFIG)
    assert _flat(back).keys() == _flat(params).keys()
    for key, value in _flat(params).items():
        got = np.asarray(_flat(back)[key])
        assert got.dtype == np.asarray(value).dtype and got.tobytes() == np.asarray(value).tobytes(), key
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["attention"]["key"]["kernel"][1],
                                  params["encoder"]["layers_1"]["attention"]["key"]["kernel"])
    assert match_layout(params, SCANNED).keys() == stacked.keys()
    assert _flat(match_layout(stacked, CONFIG)).keys() == _flat(params).keys()
    with pytest.raises(ValueError, match="already scanned"):
        stack_layers(stacked, CONFIG)
    with pytest.raises(ValueError, match=r"encoder/layers/attention/key/kernel: expected a leading 'layers' axis of size 4, got shape \(3, 32, 4, 8\)"):
        unstack_layers(stacked, CONFIG.replace(num_encoder_layers=4))


def test_scan_init_and_logical_axes_match_the_stacked_unscanned_ones(params, stacked):
    shapes = jax.eval_shape(lambda: network.init_params(SCANNED, 0))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), stacked)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == want
    axes = network.logical_axes(SCANNED)
    assert axes["encoder"]["layers"]["attention"]["query"]["kernel"] == PartitionSpec("layers", "embed", "heads", "kv")
    assert axes["encoder"]["relpos_bias"]["rel_embedding"] == PartitionSpec("heads", "relpos_buckets")
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert (jax.tree_util.tree_flatten(axes, is_leaf=is_spec)
            == jax.tree_util.tree_flatten(stack_layers(network.logical_axes(CONFIG), CONFIG), is_leaf=is_spec))
    assert (jax.tree_util.tree_flatten(unstack_layers(axes, SCANNED), is_leaf=is_spec)
            == jax.tree_util.tree_flatten(network.logical_axes(CONFIG), is_leaf=is_spec))


def _forward(config, p, tokens):
    model = T5(config)
    encoded = model.apply({"params": p}, tokens, method=T5.encode)
    logits = model.apply({"params": p}, tokens, method=T5.first_step_logits)
    dec = jnp.array([[0, 7, 3, 11]] * tokens.shape[0], jnp.int32)
    return encoded, logits, model.apply({"params": p}, tokens, dec)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scan_same_encoder_states_and_first_step_logits(params, stacked, remat):
    tokens = _padded_batch()
    want = jax.jit(lambda p: _forward(CONFIG, p, tokens))(params)
    got = jax.jit(lambda p: _forward(SCANNED.replace(remat=remat), p, tokens))(stacked)
    for name, g, w in zip(("encoded", "first_step_logits", "teacher_forced"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **TOL)


def _loss(config, tokens):
    dec = jnp.array([[0, 7, 3, 11]] * tokens.shape[0], jnp.int32)

    def loss(p):  # a mean, so gradients are O(1) and the 1e-5 tolerance is a relative one
        logits = T5(config).apply({"params": p}, tokens, dec)
        return jnp.mean(jax.nn.log_softmax(logits)[..., :11] * jnp.arange(11.0))

    return loss


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scan_gradients_agree_after_unstacking(params, stacked, remat):
    tokens = _padded_batch()
    want = jax.jit(jax.grad(_loss(CONFIG, tokens)))(params)
    got = unstack_layers(jax.jit(jax.grad(_loss(SCANNED.replace(remat=remat), tokens)))(stacked), CONFIG)
    assert _flat(got).keys() == _flat(want).keys()
    for key, value in _flat(want).items():
        np.testing.assert_allclose(np.asarray(_flat(got)[key]), np.asarray(value), err_msg=key, **TOL)


def test_scan_dropout_draws_a_different_mask_per_layer(stacked):
    """split_rngs: each scanned layer gets its own dropout rng, as unrolled layers do."""
    tokens = _padded_batch()
    model = T5(SCANNED.replace(dropout_rate=0.5))
    out = model.apply({"params": stacked}, tokens, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(0)},
                      method=T5.encode, capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout))
    assert np.all(np.isfinite(np.asarray(out[0])))
    dropped = out[1]["intermediates"]["encoder"]["layers"]["mlp"]["Dropout_0"]["__call__"][0]  # [layers, B, L, F]
    zero = np.asarray(dropped) == 0
    assert zero.shape[0] == 3 and 0.3 < zero.mean() < 0.7
    assert not np.array_equal(zero[0], zero[1]), "the layers shared one dropout mask"


def test_scan_hf_export_is_bit_identical(params, stacked, tmp_path):
    want = params_to_hf(params, CONFIG)
    got = params_to_hf(stacked, SCANNED)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
    a = save_hf_checkpoint(tmp_path / "unrolled", CONFIG, params)
    b = save_hf_checkpoint(tmp_path / "scanned", SCANNED, stacked)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    config, loaded = load_hf_checkpoint(b)
    assert config == CONFIG and not config.scan_layers and not is_scanned(loaded)
    config, loaded = load_hf_checkpoint(b, scan_layers=True)
    assert config == SCANNED
    for key, value in _flat(stacked).items():
        np.testing.assert_array_equal(_flat(loaded)[key], np.asarray(value), err_msg=key)


def test_scan_config_round_trips_and_hf_config_is_unscanned():
    assert T5Config.from_dict(json.loads(json.dumps(SCANNED.to_dict()))) == SCANNED
    assert T5Config.from_hf_dict(SCANNED.to_hf_dict()).scan_layers is False
    assert "scan_layers" not in SCANNED.to_hf_dict()
    with pytest.raises(ValueError, match="scan_layers='yes'"):
        CONFIG.replace(scan_layers="yes")


def test_scan_greedy_generation_same_tokens(params, stacked):
    tokens = _padded_batch()
    want = generate(CONFIG, params, tokens, max_decode_length=6)
    got = generate(SCANNED, stacked, tokens, max_decode_length=6)
    np.testing.assert_array_equal(got, want)
    assert want[:2].any(), "greedy decoding produced only padding"


def test_scan_lowering_has_a_while_loop(params, stacked):
    """Scanned layers lower to one while loop (the layer body once); unrolled ones to straight-line code.
    The einsum attention path is used because the CPU's rows path is itself a loop."""
    tokens = _padded_batch()

    def lowered(config, p):
        return jax.jit(lambda p: _forward(config, p, tokens)[1]).lower(p).as_text()

    assert "while" not in lowered(CONFIG.replace(attention="einsum"), params)
    assert "while" in lowered(SCANNED.replace(attention="einsum"), stacked)


@pytest.mark.parametrize("model,mesh_shape", [("tiny", (2, 1, 4)), ("flan-t5-base", (1, 2, 4))],
                         ids=["tiny-2x1x4", "flan-t5-base-1x2x4"])
def test_scan_sharding_is_the_golden_dump_plus_a_replicated_layers_axis(model, mesh_shape):
    """Every scanned parameter's PartitionSpec is (None, *spec of each unrolled layer in the golden file)."""
    golden = json.loads(golden_path(model, mesh_shape).read_text())["params"]
    config = preset(model, scan_layers=True)
    rules = partitioning.load_logical_axis_rules()
    mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:8])
    opt, _ = optimizers.make_optimizer()
    shapes = train_state.abstract_state(lambda r: network.init_params(config, r), opt, jax.random.PRNGKey(0))
    shardings = train_state.state_shardings(shapes, network.logical_axes(config), mesh, rules)
    dump = partitioning.sharding_dump(shardings.params)
    expected = {}
    for key, spec in golden.items():
        stack, layer, *rest = key.split("/")
        if layer.startswith("layers_"):
            expected.setdefault("/".join([stack, "layers", *rest]), []).append([None] + spec)
        else:
            expected[key] = [spec]
    assert sorted(dump) == sorted(expected)
    for key, spec in dump.items():
        assert all(spec == want for want in expected[key]), (key, spec, expected[key])
    # The optimizer state follows the params (AdamW's mu/nu carry the same stacked specs).
    mu = partitioning.sharding_dump(shardings.opt_state[1][0].mu)
    assert mu == dump


def test_scan_adamw_step_equals_unrolled_step(params, stacked):
    """One AdamW train step (with the "matrices" weight-decay mask) updates both forms identically."""
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0, batch_size=2, group_size=3, max_length=12))
    batch["encoder_input_tokens"] = batch["encoder_input_tokens"] % CONFIG.vocab_size
    opt, schedule = optimizers.make_optimizer(learning_rate=1e-2, weight_decay=0.1, weight_decay_mask="matrices")
    score_tokens = ScoreTokens(true_id=5, false_id=6, extra_id=7)
    results = []
    for config, p in ((CONFIG, params), (SCANNED, stacked)):
        model = PointwiseCrossEncoder(config, loss_name="rank_net", score_tokens=score_tokens)
        step = jax.jit(make_train_step(model, opt, schedule, enable_dropout=False))
        state, metrics = step(train_state.TrainState.create(p, opt), batch, jax.random.PRNGKey(0))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (want, want_loss), (got, got_loss) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    got = unstack_layers(got, CONFIG)
    for key, value in _flat(want).items():
        np.testing.assert_allclose(_flat(got)[key], value, err_msg=key, **TOL)
    assert not np.allclose(_flat(want)["encoder/layers_0/attention/query/kernel"],
                           _flat(params)["encoder/layers_0/attention/query/kernel"]), "the step changed nothing"
    # The mask decays the same leaves in both forms: a stacked [layers, d] norm scale is not a matrix.
    mask = optimizers._decay_mask("matrices")
    unrolled = _flat(mask(params))
    for key, decayed in _flat(mask(stacked)).items():
        assert decayed == unrolled[key.replace("/layers/", "/layers_0/")], key
    assert mask(stacked)["encoder"]["layers"]["pre_mlp_layer_norm"]["scale"] is False


# Wide enough (d_model and d_ff >= 128) for Adafactor to factor the MLP and embedding moments.
WIDE = CONFIG.replace(d_model=128, d_ff=160, num_heads=2, d_kv=16)


def _train_both_forms(opt, schedule, steps: int):
    """`steps` jitted train steps from the same init in the unrolled and the scanned form: (params, losses) each."""
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(0, batch_size=2, group_size=3, max_length=12))
    batch["encoder_input_tokens"] = batch["encoder_input_tokens"] % WIDE.vocab_size
    score_tokens = ScoreTokens(true_id=5, false_id=6, extra_id=7)
    unrolled = network.init_params(WIDE, jax.random.PRNGKey(3))
    results = []
    for config, p in ((WIDE, unrolled), (WIDE.replace(scan_layers=True), stack_layers(unrolled, WIDE))):
        model = PointwiseCrossEncoder(config, loss_name="rank_net", score_tokens=score_tokens)
        step = jax.jit(make_train_step(model, opt, schedule, enable_dropout=False))
        state, losses = train_state.TrainState.create(p, opt), []
        for _ in range(steps):
            state, metrics = step(state, batch, jax.random.PRNGKey(0))
            losses.append(float(metrics["loss"]))
        results.append((jax.device_get(state.params), losses))
    return unrolled, results


@pytest.mark.parametrize("factored,mask", [(True, "matrices"), (False, "all")])
def test_scan_adafactor_steps_equal_unrolled_steps(factored, mask):
    """Adafactor scales, clips and factors per layer in the scanned form too (optimizers.layerwise)."""
    opt, schedule = optimizers.make_optimizer(name="adafactor", learning_rate=1e-2, weight_decay=0.05,
                                              weight_decay_mask=mask, adafactor_factored=factored)
    start, ((want, want_losses), (got, got_losses)) = _train_both_forms(opt, schedule, steps=3)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    got = _flat(unstack_layers(got, WIDE))
    for key, value in _flat(want).items():
        np.testing.assert_allclose(got[key], value, err_msg=key, **TOL)
    assert not np.allclose(_flat(want)["encoder/layers_1/mlp/wi_0/kernel"],
                           _flat(start)["encoder/layers_1/mlp/wi_0/kernel"]), "the steps changed nothing"


def test_scan_adafactor_state_is_per_layer_and_sharded_like_its_parameter():
    """A stacked leaf's factored moments are per layer ([layers, rows] and [layers, cols]) and keep the
    parameter's logical axes; an unrolled model's state is plain optax.adafactor's (old checkpoints load)."""
    opt, _ = optimizers.make_optimizer(name="adafactor", weight_decay=0.0)
    config = WIDE.replace(scan_layers=True)
    shapes = train_state.abstract_state(lambda r: network.init_params(config, r), opt, jax.random.PRNGKey(0))
    axes = train_state.state_logical_axes(shapes, network.logical_axes(config))
    flat_shapes = {partitioning.tree_path_str(path): leaf
                   for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.opt_state)[0]}
    flat_axes = {partitioning.tree_path_str(path): spec for path, spec in jax.tree_util.tree_flatten_with_path(
        axes.opt_state, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}
    by_field = {k.split("/")[-6]: k for k in flat_shapes if k.endswith("/encoder/layers/mlp/wi_0/kernel")}
    layers, d, f = 3, WIDE.d_model, WIDE.d_ff
    assert flat_shapes[by_field["v_row"]].shape == (layers, d)
    assert flat_shapes[by_field["v_col"]].shape == (layers, f)
    assert tuple(flat_axes[by_field["v_row"]]) == ("layers", "embed")
    assert tuple(flat_axes[by_field["v_col"]]) == ("layers", "mlp")
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(optimizers.make_schedule(learning_rate=1e-3),
                                                                          decay_rate=0.8,
                                                                          multiply_by_parameter_scale=True,
                                                                          clipping_threshold=1.0))
    unrolled = network.init_params(WIDE, jax.random.PRNGKey(0))
    assert (jax.tree_util.tree_structure(opt.init(unrolled))
            == jax.tree_util.tree_structure(plain.init(unrolled)))


def test_scan_adafactor_state_round_trips_through_a_checkpoint(tmp_path):
    """The per-layer state (multi_transform over the stacks) saves and restores leaf for leaf."""
    opt, _ = optimizers.make_optimizer(name="adafactor", weight_decay=0.0)
    config = WIDE.replace(scan_layers=True)
    state = train_state.TrainState.create(network.init_params(config, jax.random.PRNGKey(0)), opt)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    manager = checkpointing.make_manager(tmp_path / "run", async_save=False)
    checkpointing.save(manager, state, force=True)
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, meta = checkpointing.restore(manager, abstract)
    manager.close()
    assert meta["step"] == 1
    want = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    got = jax.tree_util.tree_leaves(restored.opt_state)
    assert len(got) == len(want)
    for (path, value), restored_value in zip(want, got):
        np.testing.assert_array_equal(np.asarray(restored_value), np.asarray(value),
                                      err_msg=partitioning.tree_path_str(path))


def test_scan_resume_with_another_optimizer_state_is_a_checkpoint_error(tmp_path):
    """A MODEL_DIR saved with AdamW does not restore into an Adafactor run: one clear error naming the step."""
    params = network.init_params(SCANNED, jax.random.PRNGKey(0))
    adamw, _ = optimizers.make_optimizer()
    adafactor, _ = optimizers.make_optimizer(name="adafactor", weight_decay=0.0)
    manager = checkpointing.make_manager(tmp_path / "run", async_save=False)
    checkpointing.save(manager, train_state.TrainState.create(params, adamw), force=True)
    manager.wait_until_finished()
    target = train_state.TrainState.create(params, adafactor)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    with pytest.raises(CheckpointError, match=r"checkpoints/0: its parameter or optimizer-state tree differs"):
        checkpointing.restore(manager, abstract)
    manager.close()


def test_scan_model_dir_restores_scanned_and_exports_like_unrolled(params, stacked, tmp_path):
    """load_inference_params reads scan_layers from model_config.json; export_hf writes unrolled HF bytes."""
    opt, _ = optimizers.make_optimizer()
    state = train_state.TrainState.create(jax.tree.map(jnp.asarray, stacked), opt)
    manager = checkpointing.make_manager(tmp_path / "run", async_save=False)
    checkpointing.save(manager, state, force=True)
    manager.wait_until_finished()
    manager.close()
    checkpointing.write_model_config(tmp_path / "run", SCANNED)
    config, restored = checkpointing.load_inference_params(tmp_path / "run")
    assert config == SCANNED
    for key, value in _flat(stacked).items():
        np.testing.assert_array_equal(np.asarray(_flat(restored)[key]), np.asarray(value), err_msg=key)
    exported = checkpointing.export_hf(tmp_path / "run", tmp_path / "hf")
    reference = save_hf_checkpoint(tmp_path / "hf_unrolled", CONFIG, params)
    assert (exported / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
