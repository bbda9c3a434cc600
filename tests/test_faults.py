"""Faults at scale (issue 28): two jobs on one output directory, a lock left by a killed job, a corrupted
latest checkpoint, a disk that fills during a checkpoint save. Each is one clear error (exit 2) or a logged
fallback, nothing already written is lost, and the re-run resumes where the last good state was."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from console_cases import REPO, python_m, run, visible_lines
from tests.os_helpers import mounted_tmpfs
from tests.train_helpers import SyntheticSource, run_options, tiny_config
from twolar_jax import checkpointing, dir_lock, entry, summaries
from twolar_jax.train import train

TOTAL, PERIOD = 6, 2
COMMON = dict(model=tiny_config(), mesh_shape=(-1, 1, 1), num_devices=1,
              **run_options(learning_rate=1e-3, save_period=PERIOD, log_period=1))
HOLDER = ("import sys, time\nfrom twolar_jax import dir_lock\n"
          "lock = dir_lock.acquire(sys.argv[1], option='test', lock_name=sys.argv[2])\n"
          "print('locked', flush=True)\ntime.sleep(600)\n")


@contextlib.contextmanager
def _held_by_another_process(directory: Path, lock_name: str = dir_lock.LOCK_NAME):
    """A second process that holds `directory`'s lock (as a running job does) until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), lock_name], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _reopen_closed_log_streams() -> None:
    import logging
    import sys

    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        for h in (handler, getattr(handler, "python_handler", None)):
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                h.stream = sys.__stderr__  # not setStream: it flushes the closed stream first


@pytest.fixture(autouse=True)
def _log_streams_outlive_capture():
    """A handler made while a test captured stderr (absl's, made at its first log record, or one an earlier
    test file's entry point installed) keeps that capture's stream, which pytest closes after the test; the
    next record would then print "--- Logging error ---". Point such handlers back at the process's stderr,
    as they are in a real process, before and after each test."""
    _reopen_closed_log_streams()
    yield
    _reopen_closed_log_streams()


def _one_line(prog: str, job, capsys) -> str:
    """Run `job` as a console entry does; assert exit 2 and exactly one stderr line, and return it."""
    code = entry.run_console(prog, lambda argv: job() and 0, [])
    lines = visible_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def _losses(model_dir) -> dict[int, float]:
    return {s: r["loss"] for s, r in summaries.metrics_by_step(model_dir).items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted run of TOTAL steps (checkpoints 2, 4, 6) and its losses: what every resumed run
    below must reproduce."""
    model_dir = tmp_path_factory.mktemp("straight")
    train(model_dir=str(model_dir), train_batches=SyntheticSource(), total_steps=TOTAL, **COMMON)
    return model_dir, _losses(model_dir)


def _stopped_at_4(straight, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run as it stood after step 4 (checkpoints 2 and 4)."""
    model_dir = tmp_path / "m"
    shutil.copytree(straight[0], model_dir)
    shutil.rmtree(model_dir / "checkpoints" / "6")
    return model_dir


# ------------------------------------------------------------------------------------------ the lock
def test_faults_second_job_on_one_dir_refuses_with_one_line(tmp_path, capsys):
    """While another process holds the directory, each job entry refuses before writing: one line naming
    the directory and the holder (pid, host, start time), exit 2; train, evaluate and build alike."""
    from data_pipeline.set_builder.build import build
    from eval.run import evaluate

    jobs = {
        "twolar-train": lambda d: train(model_dir=str(d), train_batches=SyntheticSource(), total_steps=2, **COMMON),
        "twolar-eval": lambda d: evaluate(output_dir=str(d), mode="bm25", max_queries=1),
        "twolar-build": lambda d: build(output_dir=str(d), corpus_path="unused", teacher=None, retrievers={}),
    }
    for prog, job in jobs.items():
        folder = tmp_path / prog
        with _held_by_another_process(folder) as holder:
            line = _one_line(prog, lambda: job(folder), capsys)
        assert line.startswith(f"{prog}: error: ") and str(folder) in line, line
        assert f"in use by another job (pid {holder.pid} on host " in line and "started 20" in line, line
        assert sorted(p.name for p in folder.iterdir()) == [dir_lock.LOCK_NAME], "the refused job wrote"


def test_faults_second_rerank_job_exits_2_naming_the_output(tmp_path):
    """The console command itself, as a user starts it: `python -m eval.rerank_run` on an OUT that a running
    job holds exits 2 with one line naming --output OUT and this process as the holder (after its inputs and
    checkpoint are read: a bad one is named first, before anything is created next to OUT)."""
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", preset("tiny"), init_params(preset("tiny"), 0))
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 1.0 bm25\n")
    (tmp_path / "corpus.tsv").write_text("d1\tsome text\n")
    (tmp_path / "topics.tsv").write_text("q1\ta query\n")
    out = tmp_path / "out" / "reranked.trec"
    lock = dir_lock.acquire(out.parent, option="test", lock_name=f".{out.name}{dir_lock.LOCK_NAME}")
    try:
        done = run(python_m("eval.rerank_run", "--checkpoint", str(ckpt), "--run", str(tmp_path / "run.trec"),
                            "--corpus", str(tmp_path / "corpus.tsv"), "--queries", str(tmp_path / "topics.tsv"),
                            "--output", str(out)), cwd=str(tmp_path))
    finally:
        lock.release()
    lines = visible_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"python -m eval.rerank_run: error: --output {out}: in use by another job "
                               f"(pid {os.getpid()} on host "), lines[0]
    assert not out.exists() and not Path(f"{out}.scores.jsonl").exists()


def test_faults_stale_lock_from_killed_process_does_not_block(tmp_path):
    """kill -9 leaves the lock file (naming a dead pid) but not the lock: the next job takes it over and
    records itself; its release removes the file. A garbled lock file does not block either."""
    with _held_by_another_process(tmp_path) as holder:
        dead = holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert dir_lock.read_holder(tmp_path / dir_lock.LOCK_NAME)["pid"] == dead  # the stale file is there
        with dir_lock.hold(tmp_path, option="test") as lock:
            assert lock.held and dir_lock.read_holder(lock.path)["pid"] == os.getpid()
    assert not (tmp_path / dir_lock.LOCK_NAME).exists()
    (tmp_path / dir_lock.LOCK_NAME).write_text("{not json")
    with dir_lock.hold(tmp_path, option="test") as lock:
        with pytest.raises(dir_lock.DirectoryInUseError, match=rf"pid {os.getpid()} on host"):
            dir_lock.acquire(tmp_path, option="test")  # a second holder, even in the same process, is refused
    with dir_lock.hold(tmp_path, option="test"):  # released: free again
        pass


# ------------------------------------------------------------------------------- a corrupted checkpoint
def _biggest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_faults_corrupted_latest_checkpoint_resumes_from_previous_step(straight, tmp_path, caplog):
    """Checkpoints 2 and 4; step 4's largest array file truncated. The re-run warns naming checkpoints/4,
    moves it aside (kept), resumes from step 2 with step 2's data position, and its losses from step 3 on
    equal the uninterrupted run's; step 4 is saved again."""
    tmp_path = _stopped_at_4(straight, tmp_path)
    assert checkpointing.all_steps(tmp_path) == [2, 4]
    damaged = _biggest_file(tmp_path / "checkpoints" / "4" / "params")
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 3)
    source = SyntheticSource()
    with caplog.at_level(logging.WARNING, logger="twolar_jax.checkpointing"):
        result = train(model_dir=str(tmp_path), train_batches=source, total_steps=TOTAL, **COMMON)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint {tmp_path / 'checkpoints' / '4'} is corrupted" in w for w in warnings), warnings
    assert source.calls == [{"shard_index": 0, "num_shards": 1, "skip_batches": 2}]
    assert result.step == TOTAL and result.batches_consumed == TOTAL
    assert (tmp_path / checkpointing.CORRUPT_SUBDIR / "4" / damaged.relative_to(tmp_path / "checkpoints" / "4")
            ).exists()
    assert checkpointing.all_steps(tmp_path) == [2, 4, 6]
    resumed, expected = _losses(tmp_path), straight[1]
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([resumed[s] for s in range(3, TOTAL + 1)], [expected[s] for s in range(3, TOTAL + 1)],
                               rtol=0, atol=1e-6)


def test_faults_no_good_checkpoint_left_is_one_error(straight, tmp_path, capsys):
    """Every checkpoint damaged (a garbled meta JSON, a missing item): one CheckpointError line, exit 2,
    naming what was wrong with each; never a silent fresh start over the user's run."""
    tmp_path = _stopped_at_4(straight, tmp_path)
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text('{"step": 4, "batch')
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "opt_state")
    line = _one_line("twolar-train", lambda: train(model_dir=str(tmp_path), train_batches=SyntheticSource(),
                                                   total_steps=TOTAL, **COMMON), capsys)
    assert "no good checkpoint left to resume from" in line, line
    assert "step 4: a metadata file is not valid JSON" in line and "step 2: an item is missing" in line, line
    assert sorted(p.name for p in (tmp_path / checkpointing.CORRUPT_SUBDIR).iterdir()) == ["2", "4"]


def test_faults_corruption_is_only_what_damaged_files_raise():
    """Errors that mean something else (a tree of another config, a bug, a full disk) are not corruption,
    so they are raised as they are and a good checkpoint is never skipped over them."""
    assert checkpointing.corruption(json.JSONDecodeError("Expecting value", "", 0))
    assert checkpointing.corruption(FileNotFoundError(errno.ENOENT, "No such file", "x/meta/metadata"))
    assert checkpointing.corruption(ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error reading "k"'))
    assert checkpointing.corruption(KeyError('Item "params" was not found in the checkpoint.'))
    assert checkpointing.corruption(Exception("Encountered error while reading array index: (slice(0, 4, 1),)"))
    for other in (ValueError("Custom node type mismatch; tree structures do not match"), RuntimeError("bug"),
                  KeyError("step"), ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']"),
                  TypeError("Encountered error while reading array")):
        assert checkpointing.corruption(other) is None, other


# ------------------------------------------------------------------------------------------ a full disk
def test_faults_train_full_disk_during_checkpoint_save_then_resumes(straight, tmp_path, capsys):
    """A 30 MiB tmpfs holds one checkpoint of the tiny model (about 19 MiB) but not two: the save of step 4
    fails as one line (exit 2) naming the checkpoints folder, the full disk and the kept step 2; step 2 and
    the metrics stay. With room again the same call resumes from step 2 and its losses equal the
    uninterrupted run's."""
    with mounted_tmpfs(tmp_path / "small", "size=30m") as disk:
        model_dir = disk / "m"
        job = lambda: train(model_dir=str(model_dir), train_batches=SyntheticSource(), total_steps=TOTAL,  # noqa: E731
                            **COMMON)
        line = _one_line("twolar-train", job, capsys)
        assert line.startswith(f"twolar-train: error: {model_dir / 'checkpoints'}: No space left on device"), line
        assert "the last complete checkpoint, step 2, is kept" in line, line
        assert checkpointing.all_steps(model_dir) == [2]
        assert not (model_dir / dir_lock.LOCK_NAME).exists()
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        source = SyntheticSource()
        result = train(model_dir=str(model_dir), train_batches=source, total_steps=TOTAL, **COMMON)
        assert source.calls == [{"shard_index": 0, "num_shards": 1, "skip_batches": 2}]
        assert result.step == TOTAL and checkpointing.all_steps(model_dir) == [2, 4, 6]
        resumed = _losses(model_dir)
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    expected = straight[1]
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [expected[s] for s in sorted(expected)],
                               rtol=0, atol=1e-6)


class _ReverseTeacher:
    """A teacher with no model and no network: each query's candidates in reverse order, one at a time."""

    model_name, prompt_version = "reverse", "test"

    def describe(self) -> dict:
        return {"kind": "test", "model": self.model_name, "prompt_version": self.prompt_version}

    def call_stats(self) -> dict:
        return {"attempts": 0, "successes": 0, "retries": 0, "cache_hits": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "cost": 0.0}

    def rank_all(self, requests, on_result, *, work_dir, total=None):
        from data_pipeline.set_builder.teacher import QueryStats, RunStats, TeacherResult

        stats = RunStats()
        for request in requests:
            on_result(TeacherResult(request.qid, list(range(len(request.passages)))[::-1], None, QueryStats()))
            stats.labelled += 1
        return stats


def test_faults_build_full_disk_keeps_complete_lines_and_resumes(tmp_path, capsys):
    """The build's output on a 64 KiB tmpfs that fills while train.jsonl grows: one line naming the file
    and ENOSPC, exit 2; every file holds whole lines; with room again the same build labels the rest, each
    query exactly once."""
    from data_pipeline.set_builder.build import build
    from data_pipeline.set_builder.queries import OriginalQueries
    from retrieval.run_file import RunFileRetriever

    qids, n_docs = [f"q{i:03d}" for i in range(60)], 8
    words = " ".join(f"w{k}" for k in range(40))
    corpus, queries, run_file = tmp_path / "corpus.jsonl", tmp_path / "queries.tsv", tmp_path / "run.trec"
    corpus.write_text("".join(json.dumps({"_id": f"{q}-d{j}", "text": f"passage {j} of {q}: {words}"}) + "\n"
                              for q in qids for j in range(n_docs)))
    queries.write_text("".join(f"{q}\tquery {q}\n" for q in qids))
    run_file.write_text("".join(f"{q} Q0 {q}-d{j} {j + 1} {100 - j} bm25\n" for q in qids for j in range(n_docs)))
    with mounted_tmpfs(tmp_path / "small", "size=64k") as disk:
        out = disk / "out"
        job = lambda: build(output_dir=str(out), corpus_path=str(corpus), teacher=_ReverseTeacher(),  # noqa: E731
                            retrievers={"bm25": RunFileRetriever(path=str(run_file))},
                            query_sources={"original": OriginalQueries(path=str(queries))},
                            query_mix={"original": 1.0}, num_queries=len(qids), depth=n_docs, progress=False,
                            manifest_every_s=0.0, work_dir=str(tmp_path / "work"))
        line = _one_line("twolar-build", job, capsys)
        assert line.startswith(f"twolar-build: error: {out}") and "No space left on device" in line, line
        for name in ("queries.jsonl", "candidates.jsonl", "train.jsonl", "teacher_log.jsonl"):
            path = out / name
            assert not path.exists() or path.read_text().endswith("\n") or not path.read_text(), name
        before = len((out / "train.jsonl").read_text().splitlines()) if (out / "train.jsonl").exists() else 0
        assert before < len(qids)
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        manifest = job()
        labelled = [json.loads(x)["qid"] for x in (out / "train.jsonl").read_text().splitlines()]
    assert sorted(labelled) == qids, "a query lost or labelled twice"
    assert manifest["build"]["output_dir"] == str(out)


def test_faults_full_disk_inside_a_gin_configured_job_is_one_line(capsys):
    """gin re-raises a configurable's error through a proxy without errno or filename: the console must still
    see a full disk (a user error, exit 2, one line naming the file), not a bug with a traceback."""
    import errno

    import gin

    from twolar_jax import entry

    @gin.configurable("faults_probe_job")
    def job(where: str = "") -> None:
        raise OSError(errno.ENOSPC, "No space left on device", where)

    gin.parse_config("faults_probe_job.where = '/data/out/run.trec'")
    try:
        assert entry.run_console("twolar-probe", lambda argv: job(), []) == 2
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert err == "twolar-probe: error: /data/out/run.trec: No space left on device [in faults_probe_job]\n"
