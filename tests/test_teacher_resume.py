"""kill -9 the build mid-way (a real subprocess, the real entry point), twice, then let it finish:
no query labelled twice, none lost, and no API call repeated for a window that was already cached."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fake_chat_server import FakeChatServer
from test_teacher_faults import KEY, N_DOCS, write_inputs

from data_pipeline.distill_format import read_distill_jsonl

REPO = Path(__file__).resolve().parent.parent
N_QUERIES = 60


def _gin(tmp: Path, base_url: str) -> Path:
    corpus, queries, run = write_inputs(tmp, [f"q{i:03d}" for i in range(N_QUERIES)])
    gin_file = tmp / "resume.gin"
    gin_file.write_text(f"""
build.output_dir = %OUTPUT_DIR
build.corpus_path = '{corpus}'
build.num_queries = {N_QUERIES}
build.depth = {N_DOCS}
build.progress = False
build.manifest_every_s = 0.2
build.query_sources = {{'original': @OriginalQueries()}}
build.query_mix = {{'original': 1.0}}
OriginalQueries.path = '{queries}'
build.retrievers = {{'bm25': @RunFileRetriever()}}
RunFileRetriever.path = '{run}'
build.teacher = @ListwiseLLMTeacher()
ListwiseLLMTeacher.client = @ChatClient()
ListwiseLLMTeacher.window_size = 4
ListwiseLLMTeacher.step = 2
ListwiseLLMTeacher.progress = False
ChatClient.model = 'fake-llm'
ChatClient.base_url = '{base_url}'
ChatClient.max_concurrency = 4
ChatClient.timeout_s = 5.0
ChatClient.api_key = '{KEY}'
""")
    return gin_file


def _start(gin_file: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)  # the key comes from the gin binding, which config.gin must not repeat
    return subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.set_builder", f"--gin_file={gin_file}", f"--gin.OUTPUT_DIR='{out}'"],
        cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _cache_keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text().splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (ValueError, KeyError):
            pass  # a torn last line: the build cuts it on the next start
    return keys


def test_resume_after_kill9_labels_each_query_once(tmp_path):
    out, log = tmp_path / "out", tmp_path / "build.log"
    with FakeChatServer(delay_s=0.03, expected_key=KEY) as srv:
        gin_file = _gin(tmp_path, srv.base_url)
        cached_at_kill: list[tuple[int, set[str]]] = []
        for kill_after in (10, 35):  # kill -9 twice, at different depths of the teacher stage
            proc = _start(gin_file, out, log)
            deadline = time.time() + 60
            while _lines(out / "train.jsonl") < kill_after and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"build ended before the kill:\n{log.read_text()[-3000:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            n_calls = len(srv.calls)
            cached_at_kill.append((n_calls, _cache_keys(out / "llm_cache.jsonl")))
            assert kill_after <= _lines(out / "train.jsonl") < N_QUERIES
        # A torn write at the very end of each file must be cut, not parsed or duplicated.
        with (out / "train.jsonl").open("ab") as f:
            f.write(b'{"qid": "q0')
        with (out / "llm_cache.jsonl").open("ab") as f:
            f.write(b'{"key": "ab')

        proc = _start(gin_file, out, log)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

        records = list(read_distill_jsonl(out / "train.jsonl"))
        qids = [r.qid for r in records]
        assert len(qids) == len(set(qids)) == N_QUERIES  # none twice, none lost
        assert all(len(r.candidates) == N_DOCS for r in records)
        # No window that was in the cache when a build died was asked of the server afterwards.
        for n_calls, keys in cached_at_kill:
            later = {c["cache_key"] for c in srv.calls[n_calls:]}
            assert not (later & keys)
        # Overall, a window is asked again only if it was in flight (asked, not yet cached) at a kill.
        asked = [c["cache_key"] for c in srv.calls]
        assert len(asked) - len(set(asked)) <= 2 * 4  # at most max_concurrency per kill
        assert len(set(asked)) == 2 * N_QUERIES

        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["labelled"]["queries"] == N_QUERIES
        assert manifest["runs"][-1]["status"] == "complete" and len(manifest["runs"]) >= 2
        teacher_log_qids = {json.loads(x)["qid"] for x in (out / "teacher_log.jsonl").read_text().splitlines()}
        assert teacher_log_qids == set(qids)
        config = (out / "config.gin").read_text()
        assert "ChatClient.api_key = None  # redacted" in config and "ChatClient.model = 'fake-llm'" in config
    assert KEY not in log.read_text()
    assert all(KEY not in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
