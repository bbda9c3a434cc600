"""The pure train/eval steps: loss parity with the registry, exact gradient accumulation, bf16, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_helpers import QUIET, SyntheticSource, synthetic_batch, tiny_config
from twolar_jax import losses, optimizers
from twolar_jax.model import network
from twolar_jax.model.network import T5
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, BatchError
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.train import train
from twolar_jax.train_state import TrainState
from twolar_jax.train_step import make_train_step

CONFIG = tiny_config(dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
    return network.init_params(CONFIG, 0)


def _ragged_batch():
    """Queries with 4, 3, 2 and 1 real passages: per-query normalisation matters here."""
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(1))
    for q, real in enumerate([4, 3, 2, 1, 4, 4, 3, 2]):
        batch["passage_mask"][q] = (np.arange(4) < real).astype(np.int32)
        batch["encoder_input_tokens"][q, real:] = 0
    return batch


_REFERENCE: dict = {}


def _reference(params, loss="rank_net"):
    """One SGD(lr=1) step without accumulation: params - grad, and the metrics (cached per loss)."""
    if loss not in _REFERENCE:
        _REFERENCE[loss] = _step(params, _ragged_batch(), m=1, opt=optax.sgd(1.0), loss=loss)
    return _REFERENCE[loss]


def _step(params, batch, *, m, opt, loss="rank_net", config=CONFIG):
    model = PointwiseCrossEncoder(config, loss_name=loss)
    step = jax.jit(make_train_step(model, opt, None, num_microbatches=m, enable_dropout=False))
    state = TrainState.create(params, opt)
    return step(state, batch, jax.random.PRNGKey(0))


def test_train_step_loss_equals_registry_loss(params):
    """The step's loss is the registry's rank_net ("mean" reduction) on the model's difference scores."""
    batch = _ragged_batch()
    _, metrics = _reference(params)
    score_tokens = PointwiseCrossEncoder(CONFIG).score_tokens
    model = T5(CONFIG)
    flat = batch["encoder_input_tokens"].reshape(-1, batch["encoder_input_tokens"].shape[-1])
    logits = model.apply({"params": params}, flat, method=T5.first_step_logits)  # full vocabulary
    scores = (logits[:, score_tokens.true_id] - logits[:, score_tokens.false_id]).reshape(8, 4)
    expected = losses.get_loss("rank_net")(scores, batch["teacher_ranks"], batch["passage_mask"])
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-6)
    assert float(metrics["num_queries"]) == 7  # the query with a single passage carries no pair


@pytest.mark.parametrize("m,loss", [(2, "rank_net"), (8, "rank_net"), (4, "list_net")])
def test_train_gradient_accumulation_equals_big_batch(params, m, loss):
    """M micro-batches then one update == one update on the whole batch (SGD: update = -lr * grad)."""
    batch = _ragged_batch()
    ref_state, ref = _reference(params, loss)
    state, got = _step(params, batch, m=m, opt=optax.sgd(1.0), loss=loss)
    np.testing.assert_allclose(float(got["loss"]), float(ref["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["grad_norm"]), float(ref["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(got["kendall_tau"]), float(ref["kendall_tau"]), atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_train_step_adamw_clip_and_lr_schedule(params):
    opt, schedule = optimizers.make_optimizer(learning_rate=1e-3, schedule="linear", warmup_steps=2, total_steps=10,
                                              clip_norm=1.0)
    step = jax.jit(make_train_step(PointwiseCrossEncoder(CONFIG), opt, schedule, enable_dropout=False))
    state = TrainState.create(params, opt)
    lrs = []
    for _ in range(3):
        state, metrics = step(state, _ragged_batch(), jax.random.PRNGKey(0))
        lrs.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(lrs, [0.0, 5e-4, 1e-3], rtol=1e-6)
    assert int(state.step) == 3


def test_optimizer_schedules():
    s = optimizers.make_schedule(learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(60)), float(s(110))],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    r = optimizers.make_schedule(learning_rate=1.0, schedule="rsqrt", warmup_steps=4)
    np.testing.assert_allclose(float(r(4 + 12)), np.sqrt(4 / 16), rtol=1e-6)
    with pytest.raises(ValueError, match="needs total_steps"):
        optimizers.make_schedule(learning_rate=1.0, schedule="linear", warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="optimizer='sgdd': expected one of"):
        optimizers.make_optimizer(name="sgdd")


def test_train_step_adamw_matches_torch_adamw_semantics(params):
    """One AdamW step moves each weight by lr * (sign-like Adam update + wd * w), as torch.optim.AdamW."""
    lr, wd = 1e-3, 0.01
    opt, _ = optimizers.make_optimizer(learning_rate=lr, weight_decay=wd, clip_norm=None)
    state, _ = _step(params, _ragged_batch(), m=1, opt=opt)
    grads_state, _ = _reference(params)
    g = jax.tree.map(lambda p0, p1: p0 - p1, params, grads_state.params)  # the gradient
    for p0, p1, gg in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params),
                          jax.tree_util.tree_leaves(g)):
        # First Adam step: m/(sqrt(v)+eps) = g / (|g| + eps) (bias-corrected).
        # Where |g| is near eps the ratio is ill-conditioned (two compiled programs differ by rounding).
        p0, p1, gg = map(np.asarray, (p0, p1, gg))
        expected = p0 - lr * (gg / (np.abs(gg) + 1e-8) + wd * p0)
        sure = np.abs(gg) > 1e-6
        np.testing.assert_allclose(p1[sure], expected[sure], rtol=0, atol=1e-6)
        assert np.all(np.abs(p1 - (1 - lr * wd) * p0) <= lr + 1e-6)  # |Adam step| <= lr (+ fp32 ulp)


def test_train_step_bfloat16_compute_keeps_fp32_params(params):
    batch = _ragged_batch()
    _, ref = _reference(params)  # the loss is computed before the update: same for any optimizer
    state, got = _step(params, batch, m=2, opt=optax.sgd(1e-3), config=CONFIG.replace(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert got["loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(got["loss"]), float(ref["loss"]), rtol=0.05)


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b.pop("teacher_ranks"), r"missing feature\(s\) \['teacher_ranks'\]"),
        (lambda b: b.update(teacher_ranks=b["teacher_ranks"][:, :3]),
         r"feature 'teacher_ranks' has shape \(8, 3\) but encoder_input_tokens has shape \(8, 4, 32\)"),
        (lambda b: b.update(encoder_input_tokens=b["encoder_input_tokens"][0]),
         r"feature 'encoder_input_tokens' must have rank 3, got shape \(4, 32\)"),
        (lambda b: b.update(encoder_input_tokens=b["encoder_input_tokens"].astype(np.float32)),
         r"feature 'encoder_input_tokens' has dtype float32, expected int"),
        (lambda b: b.update(passage_mask=b["passage_mask"].astype(np.float32)),
         r"feature 'passage_mask' has dtype float32, expected int or bool"),
    ],
)
def test_train_bad_batch_gets_clear_error(mutate, message):
    batch = synthetic_batch(0)
    mutate(batch)
    with pytest.raises(BatchError, match=message):
        LISTWISE_GROUP_BATCH.validate(batch, where="train batch 0")


def test_train_batch_shape_expectations():
    with pytest.raises(BatchError, match=r"encoder_input_tokens has group_size=4 \(shape \(8, 4, 32\)\), "
                                         r"expected group_size=30"):
        LISTWISE_GROUP_BATCH.validate(synthetic_batch(0), expect={"group_size": 30})
    with pytest.raises(BatchError, match=r"encoder_input_tokens has max_length=32 \(shape \(8, 4, 32\)\), "
                                         r"expected max_length=16"):
        LISTWISE_GROUP_BATCH.validate(synthetic_batch(0), expect={"max_length": 16})
    # max_length is an equality now (batches have static shapes): a shorter batch is refused too.
    with pytest.raises(BatchError, match=r"encoder_input_tokens has max_length=16 .* expected max_length=32"):
        LISTWISE_GROUP_BATCH.validate(synthetic_batch(0, max_length=16), expect={"max_length": 32})
    LISTWISE_GROUP_BATCH.validate(synthetic_batch(0), expect={"group_size": 4, "max_length": 32})


def test_train_rejects_batch_that_does_not_split(tmp_path):
    with pytest.raises(BatchError, match=r"global batch of 8 queries must split into num_microbatches=3"):
        train(model_dir=str(tmp_path), train_batches=SyntheticSource(), total_steps=1, num_devices=1,
              num_microbatches=3, logging_config=QUIET, model=CONFIG)


def test_train_rejects_shape_change_midway(tmp_path):
    class Changing(SyntheticSource):
        def __call__(self, **kw):
            for i, b in enumerate(super().__call__(**kw)):
                yield b if i == 0 else synthetic_batch(i, max_length=16)

    with pytest.raises(BatchError, match=r"train batch 1: shapes .* differ from the first batch"):
        train(model_dir=str(tmp_path), train_batches=Changing(), total_steps=3, num_devices=1,
              logging_config=QUIET, model=CONFIG)


def test_train_loss_option_reduction_is_reserved():
    with pytest.raises(ValueError, match="'reduction' is set by the trainer"):
        PointwiseCrossEncoder(CONFIG, loss_options=tuple(sorted({"reduction": "pooled"}.items())))
    with pytest.raises(ValueError, match="loss='rank_nett'"):
        PointwiseCrossEncoder(CONFIG, loss_name="rank_nett")
