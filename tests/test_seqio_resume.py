"""Training-side resume (issue 13 item 3): the real seqio batch source, killed after k batches and
resumed with skip_batches=k, yields the uninterrupted run's batches bit for bit, under load.

tests/test_resume.py checks the trainer with synthetic batches and tests/test_data_tasks.py the seqio
path in one process; here the source runs as the trainer runs it (seqio_batches over DistillFiles, a
task and the mixture), in fresh processes, with both cores kept busy, and the first process dies by
kill -9 with its iterators and prefetch threads still open.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from busy_cpus import busy_cpus

pytest.importorskip("seqio")

from data_pipeline.distill_format import Candidate, DistillRecord, write_distill_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "seqio_resume_worker.py"
SOURCES = ("twolar_distill", "twolar_distill_mix")
N_RECORDS, PER_BATCH = 24, 4  # 6 batches an epoch
TOTAL, KILL_AFTER = 8, 3  # the resumed run crosses the epoch boundary (a new permutation)


def _records() -> list[DistillRecord]:
    """Query types in turn (the mixture draws crop and doct5query), 2..6 candidates, scores on even i."""
    out = []
    for i in range(N_RECORDS):
        n = 2 + i % 5
        cands = tuple(Candidate(f"d{i}-{j}", f"passage {j} of query {i}: " + "words " * (2 * j + i % 3), "bm25")
                      for j in range(n))
        scores = tuple(10.0 * i - 0.37 * j for j in range(n)) if i % 2 == 0 else None
        qtype = ("crop", "doct5query", "msmarco")[i % 3]
        out.append(DistillRecord(f"q{i}", f"question number {i}?", qtype, cands, scores))
    return out


def _worker(train: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(WORKER), str(train), str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _load(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for f in folder.glob("[0-9]*.npz"):
        with np.load(f) as z:
            out[int(f.stem)] = {k: z[k] for k in z.files}
    return out


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray], where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), f"{where} {k}"
        assert a[k].tobytes() == b[k].tobytes(), f"{where} {k}"


def test_resume_seqio_batches_after_kill_equal_uninterrupted_run(tmp_path):
    train = tmp_path / "train.jsonl"
    write_distill_jsonl(train, _records())
    with busy_cpus():
        first = _worker(train, tmp_path / "run", "--ref", str(TOTAL), "--take", str(KILL_AFTER), "--kill")
        assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
        resumed = _worker(train, tmp_path / "run", "--skip", str(KILL_AFTER), "--take", str(TOTAL - KILL_AFTER))
        assert resumed.returncode == 0, resumed.stderr[-3000:]

    for source in SOURCES:
        ref = _load(tmp_path / "run" / "ref" / source)
        got = _load(tmp_path / "run" / source)
        assert sorted(ref) == sorted(got) == list(range(TOTAL)), source
        for i in range(TOTAL):
            _assert_bit_identical(ref[i], got[i], f"{source} batch {i}")
        # Not vacuous: the resumed process did not start over, and the batches are real and varied.
        assert ref[KILL_AFTER]["encoder_input_tokens"].tobytes() != ref[0]["encoder_input_tokens"].tobytes()
        tokens = np.stack([ref[i]["encoder_input_tokens"] for i in range(TOTAL)])
        assert tokens.shape == (TOTAL, PER_BATCH, 4, 32) and (tokens != 0).any(axis=-1).sum() > TOTAL * PER_BATCH
        assert any(ref[i]["teacher_scores"].any() for i in range(TOTAL))
