"""Multi-host training without a pod: `python -m twolar_jax.train --multiprocess` as two processes of four
CPU devices each (jax.distributed on localhost, gloo collectives), against one process of eight.

What a pod slice exercises and one process never does: each host reads its own data shard and the global
batch is assembled across processes (`partitioning.shard_batch`); under fsdp every parameter and optimizer
state is split over devices of both processes, so the checkpoint is written by two processes together and
a resume restores each one's shards and its data position; only process 0 writes metrics and TensorBoard;
the HF export after training restores on every process and is written by process 0.
Validation steps through each host's shard of a set whose shards differ in size. The reference
(tests/multihost_reference_worker.py) trains in one process on the two shards' batches joined
in host order, so both must take the same steps, up to the order of fp32 reductions.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.os_helpers import cpu_devices_env, free_port

REPO = Path(__file__).resolve().parent.parent
HOSTS, DEVICES_PER_HOST = 2, 4
GIN = ["--gin_file=experiments/tiny_smoke.gin", "--gin_file=mesh/fsdp.gin", "--gin.CheckpointConfig.period=2",
       "--gin.LoggingConfig.period=1", "--gin.LoggingConfig.progress=False"]
TIMEOUT_S = 420


def _start_hosts(*args: str) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "twolar_jax.train", *args, "--multiprocess",
                               f"--coordinator_address=localhost:{port}", f"--process_count={HOSTS}",
                               f"--process_index={i}"], cwd=REPO, env=cpu_devices_env(DEVICES_PER_HOST),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(HOSTS)]


def _wait_hosts(procs: list[subprocess.Popen], returncode: int = 0) -> list[str]:
    """The hosts' stderr once all have exited with `returncode`. A host that fails or hangs fails the test
    with every host's last lines (the others would wait on it at the next collective)."""
    outputs, failed = [], False
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            _, err = proc.communicate()
            failed = True
        failed |= proc.returncode != returncode
        outputs.append(err)
    if failed:
        pytest.fail("\n".join(f"--- host {i} (rc {p.returncode}):\n{err[-2500:]}"
                              for i, (p, err) in enumerate(zip(procs, outputs))))
    return outputs


def _run_hosts(*args: str) -> list[str]:
    """Every host's process of one multi-host run, to a clean exit; returns their stderr."""
    return _wait_hosts(_start_hosts(*args))


def _records(model_dir: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics" / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_multihost_fsdp_train_validate_and_resume_equal_one_process(tmp_path):
    from data_pipeline.distill_format import write_distill_jsonl
    from tests.test_train_learns_scifact import build_standin_set

    # 9 validation queries: host 0's shard is 5 (a batch of 4, then 1), host 1's is 4 (one batch, then none).
    records = build_standin_set(num_queries=49)
    train_jsonl, val_jsonl = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_distill_jsonl(train_jsonl, records[9:])
    write_distill_jsonl(val_jsonl, records[:9])
    data = (f"--gin.DISTILL_JSONL='{train_jsonl}'", f"--gin.VALIDATION_JSONL='{val_jsonl}'",
            "--gin.train.validation=@ValidationConfig()", "--gin.ValidationConfig.period=2")
    pod, ref = tmp_path / "pod", tmp_path / "ref"

    _run_hosts(*GIN, *data, f"--gin.MODEL_DIR='{pod}'", "--gin.TRAIN_STEPS=4")
    resumed = _run_hosts(*GIN, *data, f"--gin.MODEL_DIR='{pod}'", "--gin.TRAIN_STEPS=6",
                         f"--export_hf={tmp_path / 'hf'}")
    for i, err in enumerate(resumed):
        assert "resumed from step 4" in err and "4 batches consumed" in err, f"host {i}:\n{err[-2500:]}"

    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multihost_reference_worker.py"), str(HOSTS), *GIN,
                           *data, f"--gin.MODEL_DIR='{ref}'", "--gin.TRAIN_STEPS=6"], cwd=REPO,
                          env=cpu_devices_env(HOSTS * DEVICES_PER_HOST), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Process 0 alone reports: one metrics line per step (the resumed run appends), one TensorBoard writer
    # per run; every line describes the global batch of both hosts (8 queries).
    pod_records, ref_records = _records(pod), _records(ref)
    assert [r["step"] for r in pod_records] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in ref_records]
    assert {r["num_queries"] for r in pod_records} == {8.0}
    assert len(list((pod / "tb" / "train").glob("events.out.tfevents.*"))) == 2
    for a, b in zip(pod_records, ref_records):
        for key in ("loss", "grad_norm", "kendall_tau", "param_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")

    # Validation reads each host's shard in lockstep (twolar_jax/lockstep_batches.py); before that, host 0's
    # batch of 1 failed to be placed and host 1 waited at the next collective until the shutdown barrier
    # timed out. The reference validates the 9 queries in one process, as batches of 8 and 1.
    pod_val, ref_val = _records(pod, "validation"), _records(ref, "validation")
    assert [r["step"] for r in pod_val] == [2, 4, 6] == [r["step"] for r in ref_val]
    for a, b in zip(pod_val, ref_val):
        assert a["num_queries"] == b["num_queries"] == 9.0
        for key in ("loss", "kendall_tau", "pairwise_agreement", "ndcg@10"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=f"validation {a['step']} {key}")

    # The checkpoint both processes wrote restores in one process, equal to the reference's parameters. Adam
    # divides by the gradient's running RMS, so where a gradient is near zero (embedding rows of rare tokens)
    # the reduction order's last-bit differences reach the update: up to 2.2e-5 here, with lr 1e-3, where a
    # wrong or missing shard moves parameters by about lr at every step.
    import jax

    from twolar_jax import checkpointing

    assert checkpointing.all_steps(pod) == [2, 4, 6]
    _, pod_params = checkpointing.load_inference_params(pod)
    _, ref_params = checkpointing.load_inference_params(ref)
    flat_pod = jax.tree_util.tree_flatten_with_path(pod_params)[0]
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
    assert len(flat_pod) == len(flat_ref)
    for path, leaf in flat_pod:
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(flat_ref[path]), rtol=0, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))

    # --export_hf on every host: the restore is collective, process 0 writes the directory (before, process 0
    # waited in the restore for the others, which had left, until the shutdown barrier timed out).
    from twolar_jax.hf_conversion import load_hf_checkpoint

    _, hf_params = load_hf_checkpoint(tmp_path / "hf")
    flat_hf = dict(jax.tree_util.tree_flatten_with_path(hf_params)[0])
    assert len(flat_hf) == len(flat_pod)
    for path, leaf in flat_pod:
        np.testing.assert_array_equal(np.asarray(flat_hf[path]), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_multihost_preemption_notice_on_one_host_saves_one_step_on_every_host(tmp_path):
    """SIGTERM on one host (a TPU VM's preemption notice): JAX's preemption service tells every host, they
    agree on a step (`reached_preemption_sync_point`), save it together and exit 143. Before, that service
    swallowed the signal and training went on (27 more steps in 30 s here) until a SIGKILL lost them all."""
    from data_pipeline.distill_format import write_distill_jsonl
    from tests.test_train_learns_scifact import build_standin_set
    from twolar_jax import checkpointing

    jsonl = tmp_path / "distill.jsonl"
    write_distill_jsonl(jsonl, build_standin_set(num_queries=40))
    pod = tmp_path / "pod"
    metrics = pod / "metrics" / "train.jsonl"
    procs = _start_hosts(*GIN, f"--gin.DISTILL_JSONL='{jsonl}'", f"--gin.MODEL_DIR='{pod}'",
                         "--gin.TRAIN_STEPS=100000", "--gin.CheckpointConfig.period=1000")
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("\n".join(p.communicate()[1][-2500:] for p in procs))
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _wait_hosts(procs, returncode=128 + signal.SIGTERM)

    steps = [r["step"] for r in _records(pod)]
    assert steps == list(range(1, len(steps) + 1))
    assert checkpointing.all_steps(pod) == [steps[-1]]
    for i, err in enumerate(outputs):
        assert f"stopped at step {steps[-1]} by SIGTERM" in err, f"host {i}:\n{err[-2500:]}"
