"""Exact resume: a run stopped after step k and resumed equals an uninterrupted run, step by step."""
from __future__ import annotations

import numpy as np
import pytest

from tests.train_helpers import SyntheticSource, run_options, tiny_config
from twolar_jax import checkpointing, summaries
from twolar_jax.train import train

TOTAL, CRASH_AFTER = 6, 3

COMMON = dict(
    model=tiny_config(),  # dropout 0.1 on: resume must also reproduce the dropout masks
    total_steps=TOTAL,
    mesh_shape=(-1, 1, 1),
    num_devices=2,
    num_microbatches=2,
    **run_options(learning_rate=1e-3, schedule="linear", warmup_steps=2, save_period=CRASH_AFTER, log_period=2),
)


def _losses(model_dir) -> dict[int, float]:
    return {s: r["loss"] for s, r in summaries.metrics_by_step(model_dir).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    train(model_dir=str(straight), train_batches=SyntheticSource(), **COMMON)
    resumed = tmp_path_factory.mktemp("resumed")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(model_dir=str(resumed), train_batches=SyntheticSource(fail_after=CRASH_AFTER), **COMMON)
    assert checkpointing.all_steps(resumed) == [CRASH_AFTER]
    source = SyntheticSource()
    result = train(model_dir=str(resumed), train_batches=source, **COMMON)
    return straight, resumed, source, result


def test_resume_loss_sequence_equals_uninterrupted_run(runs):
    straight, resumed, source, result = runs
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(1, TOTAL + 1)) == sorted(b)
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-6)
    assert result.step == TOTAL and result.batches_consumed == TOTAL


def test_resume_restores_data_position(runs):
    _, _, source, _ = runs
    assert source.calls == [{"shard_index": 0, "num_shards": 1, "skip_batches": CRASH_AFTER}]


def test_resume_final_params_equal(runs):
    straight, resumed, _, _ = runs
    _, pa = checkpointing.load_inference_params(straight)
    _, pb = checkpointing.load_inference_params(resumed)
    import jax

    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_resume_is_noop_when_done(runs):
    straight, _, _, _ = runs
    source = SyntheticSource()
    result = train(model_dir=str(straight), train_batches=source, **COMMON)
    assert result.step == TOTAL and source.calls == []
