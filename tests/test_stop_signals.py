"""SIGTERM and Ctrl-C stop training after the step in progress, with that step's checkpoint saved.

The multi-host case (JAX's preemption notice on one host, every host saving the same step) is in
tests/test_multihost_train.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from twolar_jax.stop_signals import StopRequest

REPO = Path(__file__).resolve().parent.parent


def test_stop_request_first_signal_asks_second_ctrl_c_interrupts_and_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert not stop.due(1) and stop.name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.due(2) and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after a stop was asked for: at once
        assert stop.name == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.due(1) and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_stop_request_installs_nothing_off_the_main_thread_or_on_several_processes():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        with StopRequest():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [before]
    with StopRequest(process_count=2):  # JAX's preemption service owns SIGTERM there
        assert signal.getsignal(signal.SIGTERM) is before


class SignalAt:
    """A BatchSource over `source` that sends this process `sig` while handing out batch `index`
    (as a scheduler would, mid-run)."""

    def __init__(self, source, index: int, sig: int = signal.SIGTERM):
        self.source, self.index, self.sig = source, index, sig

    def __call__(self, *, shard_index, num_shards, skip_batches):
        for i, batch in enumerate(self.source(shard_index=shard_index, num_shards=num_shards,
                                              skip_batches=skip_batches), skip_batches):
            if i == self.index:
                os.kill(os.getpid(), self.sig)
            yield batch


def test_sigterm_saves_the_step_reached_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from tests.test_train_learns_scifact import RecordSource, build_standin_set
    from tests.train_helpers import run_options
    from twolar_jax import checkpointing, summaries
    from twolar_jax.model.config import preset
    from twolar_jax.train import train
    from twolar_jax.train_loop import ValidationConfig

    records = build_standin_set(num_queries=40)
    shape = dict(group_size=4, max_length=48)

    def run(model_dir, steps, batches, **kw):
        return train(model_dir=str(model_dir), model=preset("tiny", dropout_rate=0.0), num_devices=1, seed=0,
                     train_batches=batches, total_steps=steps,
                     validation=ValidationConfig(RecordSource(records[:8], batch_size=8, shuffle=False,
                                                              repeat=False, **shape), period=100),
                     **run_options(learning_rate=1e-3, save_period=100, log_period=1), **kw)

    source = RecordSource(records[8:], batch_size=8, shuffle=True, repeat=True, **shape)
    before = signal.getsignal(signal.SIGTERM)
    # The signal arrives while the 4th batch is read: step 4 finishes, is saved, and the run stops there.
    stopped = run(tmp_path / "run", 50, SignalAt(source, 3), export_hf_dir=str(tmp_path / "hf"))
    assert (stopped.step, stopped.stopped_by, stopped.batches_consumed) == (4, "SIGTERM", 4)
    assert signal.getsignal(signal.SIGTERM) is before
    assert checkpointing.all_steps(tmp_path / "run") == [4]
    assert not (tmp_path / "hf").exists()  # an interrupted run is not exported
    assert summaries.read_metrics(tmp_path / "run", "validation") == []  # nor validated at the stop

    resumed = run(tmp_path / "run", 6, source)
    assert (resumed.step, resumed.stopped_by) == (6, None)
    whole = run(tmp_path / "whole", 6, source)
    got, want = summaries.metrics_by_step(tmp_path / "run"), summaries.metrics_by_step(tmp_path / "whole")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_train_cli_stopped_by_a_signal_saves_its_last_step_and_exits_128_plus_the_signal(tmp_path, sig, code):
    from data_pipeline.distill_format import write_distill_jsonl
    from tests.test_train_learns_scifact import build_standin_set

    jsonl = tmp_path / "distill.jsonl"
    write_distill_jsonl(jsonl, build_standin_set(num_queries=40))
    model_dir = tmp_path / "run"
    metrics = model_dir / "metrics" / "train.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "twolar_jax.train", "--gin_file=experiments/tiny_smoke.gin",
                             f"--gin.MODEL_DIR='{model_dir}'", f"--gin.DISTILL_JSONL='{jsonl}'",
                             "--gin.TRAIN_STEPS=100000", "--gin.CheckpointConfig.period=1000",
                             "--gin.LoggingConfig.period=1", "--gin.LoggingConfig.progress=False"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]

    from twolar_jax import checkpointing

    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert checkpointing.all_steps(model_dir) == [steps[-1]]  # no step that ran is lost
    name = signal.Signals(sig).name
    assert f"stopped at step {steps[-1]} by {name}: its checkpoint is saved in {model_dir}; run the same " \
           "command again to resume" in err
