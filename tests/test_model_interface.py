"""The ranking-model interface: the pointwise cross-encoder through it equals the golden values saved before
the interface existed, and a second model family, defined only here, trains, resumes, scores through the
Reranker and AOT-compiles for a TPU slice with no change to library code.

Golden values: tests/testdata/model_interface_golden.json, written at commit f071c55 (before the refactor)
by the old `trainer.make_train_step` / `make_eval_step` / `compute_scores` and `Reranker.score_pairs` on the
tiny preset (params: network.init_params(config, 0); batch: synthetic_batch(1) with ragged masks).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.train_helpers import QUIET, SyntheticSource, run_options, synthetic_batch, tiny_config
from twolar_jax import checkpointing, losses
from twolar_jax.model import network
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, POINTWISE_SCORE_BATCH
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.ranking.pointwise_inputs import PairEncoder
from twolar_jax.reranker import Reranker
from twolar_jax.train import train
from twolar_jax.train_state import TrainState
from twolar_jax.train_step import make_eval_step, make_train_step

GOLDEN = json.loads((Path(__file__).parent / "testdata" / "model_interface_golden.json").read_text())
HEADS = ("difference", "softmax", "extra_id")
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def golden_params():
    return network.init_params(tiny_config(), 0)


def ragged_batch():
    batch = LISTWISE_GROUP_BATCH.select(synthetic_batch(1))
    for q, real in enumerate([4, 3, 2, 1, 4, 4, 3, 2]):
        batch["passage_mask"][q] = (np.arange(4) < real).astype(np.int32)
        batch["encoder_input_tokens"][q, real:] = 0
    return batch


def leaf_abs_sums(params):
    return [float(jnp.sum(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(params)]


# ----------------------------------------------------------------------------- the pointwise model
@pytest.mark.parametrize("head", HEADS)
def test_model_interface_pointwise_scores_equal_golden(golden_params, head):
    model = PointwiseCrossEncoder(tiny_config(), score_head=head)
    batch = ragged_batch()
    scores = jax.jit(model.scores)(golden_params, batch)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(GOLDEN["scores"][head]), **TOL)
    order = np.asarray(jax.jit(model.predict)(golden_params, batch))
    masked = np.where(batch["passage_mask"] != 0, np.asarray(scores), -np.inf)
    assert (np.take_along_axis(masked, order, -1)[:, :-1] >= np.take_along_axis(masked, order, -1)[:, 1:]).all()


# Every loss with accumulation and dropout (the rng path), every other head plainly: 7 compiles.
TRAIN_CASES = [f"{loss}/difference/m2/dropout1" for loss in losses.LOSSES] + [
    "rank_net/softmax/m1/dropout0", "list_net/extra_id/m1/dropout0"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_model_interface_pointwise_train_step_equals_golden(golden_params, case):
    loss, head, m, dropout = case.split("/")
    model = PointwiseCrossEncoder(tiny_config(), score_head=head, loss_name=loss)
    opt = optax.adamw(1e-3, weight_decay=0.01)
    step = jax.jit(make_train_step(model, opt, None, num_microbatches=int(m[1:]), enable_dropout=dropout == "dropout1"))
    state, metrics = step(TrainState.create(golden_params, opt), ragged_batch(), jax.random.PRNGKey(7))
    want = GOLDEN["train"][case]
    assert set(metrics) == set(want["metrics"])
    for name, value in want["metrics"].items():
        np.testing.assert_allclose(float(metrics[name]), value, err_msg=name, **TOL)
    np.testing.assert_allclose(leaf_abs_sums(state.params), want["param_abs_sums"], **TOL)


@pytest.mark.parametrize("loss", list(losses.LOSSES))
def test_model_interface_pointwise_eval_step_equals_golden(golden_params, loss):
    for head in HEADS:
        model = PointwiseCrossEncoder(tiny_config(), score_head=head, loss_name=loss)
        metrics = jax.jit(make_eval_step(model))(golden_params, ragged_batch())
        for name, value in GOLDEN["eval"][f"{loss}/{head}"].items():
            np.testing.assert_allclose(float(metrics[name]), value, err_msg=f"{head} {name}", **TOL)


@pytest.mark.parametrize("head", HEADS)
def test_model_interface_reranker_scores_equal_golden(golden_params, head):
    rr = Reranker(tiny_config(), golden_params, score_head=head, compile_cache=False, batch_size=4, max_length=64)
    pairs = [tuple(p) for p in GOLDEN["reranker_pairs"]]
    np.testing.assert_allclose(rr.score_pairs(pairs), np.asarray(GOLDEN["reranker"][head]), **TOL)


# ---------------------------------------------------------------------- a second family, test-only
@dataclasses.dataclass(frozen=True)
class BagOfWordsRanker(RankingModel):
    """Mean token embedding dotted with a learned query vector, trained with ListNet: nothing like T5,
    so it exercises only what the interface promises."""

    vocab: int = 32128
    dim: int = 16

    batch_features = LISTWISE_GROUP_BATCH
    score_features = POINTWISE_SCORE_BATCH
    no_signal = "no query has two real passages"

    def init_params(self, rng):
        k1, k2 = jax.random.split(rng)
        return {"embedding": jax.random.normal(k1, (self.vocab, self.dim)) * 0.1,
                "direction": jax.random.normal(k2, (self.dim,))}

    def param_logical_axes(self):
        return {"embedding": P("vocab", "embed"), "direction": P("embed")}

    def scores(self, params, batch):
        tokens = batch["encoder_input_tokens"]
        mask = (tokens != 0)[..., None].astype(jnp.float32)
        pooled = jnp.sum(params["embedding"][tokens] * mask, axis=-2) / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)
        return (pooled @ params["direction"]).astype(jnp.float32)

    def loss(self, params, batch, rng):
        del rng  # no dropout
        scores = self.scores(params, batch)
        per_query = losses.list_net(scores, batch["teacher_ranks"], batch["passage_mask"], reduction="none")
        return jnp.sum(per_query * self.example_weights(batch)), scores

    def example_weights(self, batch, xp=jnp):
        return (xp.sum(batch["passage_mask"] != 0, axis=-1) >= 2).astype(xp.float32)

    def pair_encoder(self, tokenizer, *, max_length, truncation):
        return PairEncoder(tokenizer, max_length=max_length, truncation=truncation)

    @property
    def vocab_size(self):
        return self.vocab

    def describe(self):
        return {"model": "bag_of_words", "vocab": self.vocab, "dim": self.dim}


def _train_toy(model_dir, total_steps):
    return train(model_dir=str(model_dir), model=BagOfWordsRanker(), train_batches=SyntheticSource(),
                 total_steps=total_steps, num_devices=1, num_microbatches=2,
                 **{**run_options(learning_rate=1e-2, save_period=3, log_period=1), "logging_config": QUIET})


def _restore_params(model_dir):
    from twolar_jax.partitioner import Partitioner
    from twolar_jax.optimizers import OptimizerConfig
    from twolar_jax.trainer import Trainer

    trainer = Trainer(BagOfWordsRanker(), Partitioner.create((1, 1, 1), devices=jax.devices()[:1]),
                      optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"), total_steps=5)
    manager = checkpointing.make_manager(model_dir, read_only=True)
    try:
        state, meta = checkpointing.restore(manager, trainer.restore_target)
    finally:
        manager.close()
    return state.params, meta


def test_model_interface_toy_model_trains_resumes_and_scores(tmp_path):
    straight = _train_toy(tmp_path / "straight", 5)
    first = _train_toy(tmp_path / "resumed", 3)
    assert first.step == 3 and np.isfinite(first.train_metrics["loss"])
    resumed = _train_toy(tmp_path / "resumed", 5)
    assert resumed.step == 5 and resumed.batches_consumed == straight.batches_consumed == 5
    assert not (tmp_path / "resumed" / checkpointing.MODEL_CONFIG).exists()  # no T5 config to write
    params, meta = _restore_params(tmp_path / "resumed")
    want, _ = _restore_params(tmp_path / "straight")
    assert meta["step"] == 5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 params, want)
    initial = BagOfWordsRanker().init_params(jax.random.fold_in(jax.random.PRNGKey(0), 0))
    assert not np.allclose(np.asarray(params["direction"]), np.asarray(initial["direction"]))

    rr = Reranker(BagOfWordsRanker(), params, compile_cache=False, batch_size=4, max_length=64)
    queries = ["what is the capital of france"] * 3
    docs = ["Paris is the capital of France.", "The Eiffel tower.", "Bananas are yellow."]
    got = rr.score_pairs(queries, docs)
    tokens = np.zeros((3, 64), np.int32)
    for i, ids in enumerate(rr.encode_pairs(queries, docs)):
        tokens[i, :len(ids)] = ids
    expected = BagOfWordsRanker().scores(params, {"encoder_input_tokens": jnp.asarray(tokens)})
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=1e-6)
    ranked = rr.rank(queries[0], docs)
    assert [d.score for d in ranked] == sorted(got.tolist(), reverse=True)


def test_model_interface_toy_model_compiles_for_a_tpu_slice():
    from twolar_jax.aot import programs, topology
    from twolar_jax.aot.gin_jobs import ScoreJob, TrainJob
    from twolar_jax.optimizers import OptimizerConfig
    from twolar_jax.partitioning import load_logical_axis_rules

    if not topology.libtpu_available():
        pytest.skip("libtpu is not installed (pip install 'twolar-jax[aot]')")
    target = topology.parse_topology("v5e:2x2")
    devices = topology.topology_devices(target)
    rules = load_logical_axis_rules()
    job = TrainJob(model=BagOfWordsRanker(), optimizer=OptimizerConfig(), num_microbatches=2, enable_dropout=False,
                   mesh_shape=(1, 2, 2), rules=rules, total_steps=10, seed=0, batch_size=8, group_size=4,
                   max_length=32)
    train_report = programs.compile_program(programs.train_program(job, devices), target)
    score = ScoreJob(model=BagOfWordsRanker(), mesh_shape=(1, 2, 2), rules=rules, batch_size=8, max_length=32)
    score_report = programs.compile_program(programs.score_program(score, devices), target)
    for report in (train_report, score_report):
        assert report.fits and report.memory is not None and report.chips == 4
        assert report.model.startswith("BagOfWordsRanker params=5.14")
    assert train_report.mesh == "data=1,fsdp=2,model=2"
