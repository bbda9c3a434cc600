"""`python -m twolar_jax.train` end to end: gin, seqio data, checkpoints, summaries, HF export, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", "twolar_jax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_cli_end_to_end(tmp_path):
    from data_pipeline.distill_format import write_distill_jsonl
    from tests.test_train_learns_scifact import build_standin_set

    jsonl = tmp_path / "distill.jsonl"
    write_distill_jsonl(jsonl, build_standin_set(num_queries=40))
    model_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    common = ["--gin_file=experiments/tiny_smoke.gin", f"--gin.MODEL_DIR='{model_dir}'",
              f"--gin.DISTILL_JSONL='{jsonl}'", "--gin.CheckpointConfig.period=2"]
    proc = _run_cli(*common, "--gin.TRAIN_STEPS=3", f"--export_hf={hf_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert "train.total_steps = %TRAIN_STEPS" in (model_dir / "config.gin").read_text()
    assert json.loads((model_dir / "model_config.json").read_text())["d_model"] == 64
    assert list((model_dir / "tb" / "train").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "learning_rate", "grad_norm", "kendall_tau", "pairwise_agreement", "examples_per_second"):
        assert key in records[-1], key

    from twolar_jax import checkpointing
    from twolar_jax.hf_conversion import load_hf_checkpoint

    assert checkpointing.all_steps(model_dir) == [2, 3]
    config, params = checkpointing.load_inference_params(model_dir)
    hf_config, hf_params = load_hf_checkpoint(hf_dir)
    assert hf_config.d_model == config.d_model == 64
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(hf_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Resume to step 5 from the same MODEL_DIR: picks up at step 3 with the data position restored.
    proc = _run_cli(*common, "--gin.TRAIN_STEPS=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert checkpointing.all_steps(model_dir)[-1] == 5

    # Export an older step without training (keep_checkpoints=3 keeps 3, 4, 5).
    proc = _run_cli(*common, "--export_only", "--export_step=3", f"--export_hf={tmp_path / 'hf2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, p2 = load_hf_checkpoint(tmp_path / "hf2")
    _, c2 = checkpointing.load_inference_params(model_dir, step=3)
    np.testing.assert_array_equal(p2["token_embedder"]["embedding"], np.asarray(c2["token_embedder"]["embedding"]))


@pytest.mark.slow
def test_train_cli_validation_first_and_resume_of_a_finished_run(tmp_path):
    """The tasks are registered by whichever source runs first: validation at start, before any training
    batch, and the final validation of a run that resumes already finished (each a fresh process)."""
    from data_pipeline.distill_format import write_distill_jsonl
    from tests.test_train_learns_scifact import build_standin_set

    records = build_standin_set(num_queries=48)
    train_jsonl, val_jsonl = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_distill_jsonl(train_jsonl, records[8:])
    write_distill_jsonl(val_jsonl, records[:8])
    model_dir = tmp_path / "run"
    args = ["--gin_file=experiments/tiny_smoke.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.DISTILL_JSONL='{train_jsonl}'", f"--gin.VALIDATION_JSONL='{val_jsonl}'",
            "--gin.train.validation=@ValidationConfig()", "--gin.ValidationConfig.at_start=True",
            "--gin.TRAIN_STEPS=2", "--gin.CheckpointConfig.period=2"]
    first = _run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics" / "validation.jsonl").read_text().splitlines()]
    assert steps == [0, 2]  # validated before the first training batch, and at the end
    again = _run_cli(*args)  # resumes at step 2 == TRAIN_STEPS: no training batch at all
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr
    assert "'num_queries': 8.0" in again.stdout  # the final validation ran in the new process
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics" / "validation.jsonl").read_text().splitlines()]
    assert steps == [0, 2]  # and wrote no duplicate record


def test_train_cli_requires_a_gin_file():
    proc = _run_cli("--multiprocess_typo")
    assert proc.returncode != 0
    assert "no --gin_file given" in proc.stderr
