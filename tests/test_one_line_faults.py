"""Faults a user's disk or keyboard causes, and a quiet console: a full disk (a small tmpfs, and a fault
injected into the durable writer), a read-only file system, a folder the user may not write, Ctrl-C; each is
one stderr line (130 for Ctrl-C), and what was finished survives for the re-run. Third-party start-up chatter
(TensorFlow, XLA/libtpu, CUDA stubs, absl) stays off stderr unless --log_level=DEBUG."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from console_cases import REPO, Case, assert_one_line, python_m, run, user_env, visible_lines
from tests.os_helpers import mounted_tmpfs

DL = REPO / "data" / "trec_dl"
CHATTER = re.compile(r"^[IWE]\d{4} |absl|cuInit|cuda|libtpu|TPU_|SLF4J|oneDNN|InitGoogle|Source Location Trace")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny checkpoint and three DL19 queries' BM25 top-100 as run + corpus + topics."""
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    tmp = tmp_path_factory.mktemp("faults")
    config = preset("tiny")
    ckpt = save_hf_checkpoint(tmp / "ckpt", config, init_params(config, 4))
    entries = json.loads((DL / "dl19_bm25_top100.json").read_text())
    keep = {str(e["hits"][0]["qid"]) for e in entries}
    run_lines = (DL / "run.bm25.dl19.top100.trec").read_text().splitlines()
    (tmp / "bm25.trec").write_text("".join(line + "\n" for line in run_lines if line.split()[0] in keep))
    docs = {h["docid"]: h["content"] for e in entries for h in e["hits"]}
    (tmp / "collection.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (tmp / "topics.tsv").write_text("".join(f"{e['hits'][0]['qid']}\t{e['query']}\n" for e in entries))
    return tmp, str(ckpt), len(entries)


def _rerank(job, output, *extra, queries: int | None = None) -> list[str]:
    tmp, ckpt, _ = job
    run_file = tmp / "bm25.trec"
    if queries is not None:  # the first `queries` queries of the run
        lines = run_file.read_text().splitlines()
        keep = list(dict.fromkeys(line.split()[0] for line in lines))[:queries]
        run_file = tmp / f"bm25_{queries}.trec"
        run_file.write_text("".join(line + "\n" for line in lines if line.split()[0] in keep))
    return python_m("eval.rerank_run", "--checkpoint", ckpt, "--run", str(run_file), "--corpus",
                    str(tmp / "collection.tsv"), "--queries", str(tmp / "topics.tsv"), "--output", str(output),
                    "--batch_size", "16", "--max_length", "64", *extra)


def _complete_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a partial line was left behind"
    return [json.loads(line) for line in text.splitlines()]


def test_one_line_full_disk_mid_job_keeps_what_was_scored_and_resumes(job, tmp_path):
    """A 12 KiB tmpfs fills while the score log grows: one line naming --output and ENOSPC; the queries scored
    before are complete lines; with room again the same command finishes, scoring only the rest."""
    with mounted_tmpfs(tmp_path / "small", "size=12k") as disk:
        out = disk / "run.trec"
        failed = run(_rerank(job, out, "--pairs_per_call", "100"), cwd=str(tmp_path))
        assert_one_line(Case("full_disk", (), ("--output", "run.trec.scores.jsonl", "No space left on device")),
                        failed)
        kept = _complete_jsonl(Path(f"{out}.scores.jsonl"))
        assert 0 < len(kept) < job[2]
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        again = run(_rerank(job, out, "--pairs_per_call", "100", "--log_level", "INFO"), cwd=str(tmp_path))
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resuming (same checkpoint, settings and candidates)" in again.stderr
        assert len(_complete_jsonl(Path(f"{out}.scores.jsonl"))) == job[2]
        assert len({line.split()[0] for line in out.read_text().splitlines()}) == job[2]


def test_one_line_read_only_file_system_named_before_any_work(job, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        rerank = run(_rerank(job, disk / "run.trec"), cwd=str(tmp_path))
        assert_one_line(Case("ro_rerank", (), ("--output", "Read-only file system")), rerank)
        train = run(python_m("twolar_jax.train", "--gin_file=experiments/tiny_smoke.gin", f"--model_dir={disk}/m",
                             "--gin.DISTILL_JSONL='x.jsonl'"), cwd=str(tmp_path))
        assert_one_line(Case("ro_train", (), ("--model_dir", "Read-only file system")), train)


def test_one_line_permission_denied_names_the_option(tmp_path):
    """EACCES: a folder the user may not write. As root, the command runs without the capability that lets
    root write anywhere (setpriv drops CAP_DAC_OVERRIDE), so the folder's mode applies as to any user."""
    import shutil

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    qrels, run_file = str(DL / "qrels.dl19-passage.txt"), str(DL / "run.bm25.dl19.top100.trec")
    cmd = python_m("eval.trec", "--qrels", qrels, "--run", run_file, "--per_query", str(folder / "pq.json"))
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a folder's mode does not stop root")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]
    assert_one_line(Case("eacces", (), ("--per_query", "Permission denied")), run(cmd, cwd=str(tmp_path)))
    assert not (folder / "pq.json").exists()


def test_one_line_full_disk_injected_into_the_writer(tmp_path, capsys, monkeypatch):
    """Where no tmpfs can be mounted: fsync failing with ENOSPC inside the atomic writer is one line that
    names the option, and the target is left as it was (no partial file)."""
    import errno

    from eval import trec
    from twolar_jax import durable_io

    target = tmp_path / "pq.json"
    target.write_text("previous\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable_io.os, "fsync", full)
    code = trec.main(["--qrels", str(DL / "qrels.dl19-passage.txt"), "--run", str(DL / "run.bm25.dl19.top100.trec"),
                      "--per_query", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert visible_lines(err) == [f"python -m eval.trec: error: --per_query {target}: No space left on device"]
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pq.json"]  # the temp sibling is gone


def test_one_line_ctrl_c_says_what_is_saved_and_the_rerun_resumes(job, tmp_path):
    """SIGINT once the first query's scores are logged: exit 130, no traceback, the last line says where the
    scores are and that the same command resumes; the re-run completes from there."""
    out = tmp_path / "run.trec"
    cmd = _rerank(job, out, "--pairs_per_call", "100")
    proc = subprocess.Popen(cmd, env=user_env(), cwd=str(tmp_path), stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    log = Path(f"{out}.scores.jsonl")
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (log.exists() and log.stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode("utf-8", "replace")
    lines = visible_lines(err)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert lines[-1] == (f"python -m eval.rerank_run: interrupted: the scores of every finished query are in "
                         f"{out}.scores.jsonl; run the same command again to resume")
    done_before = len(_complete_jsonl(log))
    assert 0 < done_before < job[2]
    again = run(cmd, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(_complete_jsonl(log)) == job[2]


def test_one_line_quiet_console_unless_debug(tmp_path):
    """Two training steps load TensorFlow (the input pipeline), JAX's backends (libtpu is installed) and write
    checkpoints: stderr shows no native or absl chatter; --log_level=DEBUG lets it through (so the test sees
    the chatter exists on this machine)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i}", "query": f"query {i}", "query_type": "t", "candidates": [
        {"docid": f"d{i}{j}", "text": f"passage {j} of {i}", "source": "s"} for j in range(4)]}) + "\n"
                            for i in range(8)))
    args = ["--gin_file=experiments/tiny_smoke.gin", f"--gin.DISTILL_JSONL='{data}'", "--gin.TRAIN_STEPS=2",
            "--gin.CheckpointConfig.period=1"]
    quiet = run(python_m("twolar_jax.train", *args, f"--model_dir={tmp_path / 'a'}", "--log_level=WARNING"),
                cwd=str(tmp_path))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    shown = [line for line in visible_lines(quiet.stderr) if not line.startswith("train:")]
    assert shown == [], quiet.stderr[-3000:]
    debug = run(python_m("twolar_jax.train", *args, f"--model_dir={tmp_path / 'b'}", "--log_level=DEBUG"),
                cwd=str(tmp_path))
    assert debug.returncode == 0, debug.stderr[-3000:]
    assert any(CHATTER.search(line) for line in debug.stderr.splitlines()), debug.stderr[-3000:]


def test_one_line_noise_filter_drops_chatter_keeps_the_rest():
    from twolar_jax.console_noise import is_noise

    chatter = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796655004.459805    2914 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1796655009.256116    2914 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        "Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type",
        "=== Source Location Trace: ===", "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327",
        "SLF4J(I): Connected with provider of type [org.apache.logging.slf4j.SLF4JServiceProvider]",
        "Dec 07, 2026 4:12:37 PM org.apache.lucene.store.MemorySegmentIndexInputProvider <init>",
        "INFO: Using MemorySegmentIndexInput with Java 21; to disable start with -Dorg.apache.lucene.store...",
    ]
    kept = ["F0000 00:00:1796655009.256116    2914 x.cc:1] Check failed: fatal", "Segmentation fault",
            "twolar-train: error: x", "Traceback (most recent call last):"]
    assert all(is_noise(line) for line in chatter)
    assert not any(is_noise(line) for line in kept)
