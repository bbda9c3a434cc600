"""kill -9 the build mid-way (a real subprocess, the real entry point), then let it finish: no query
labelled twice, none lost, no API call repeated for a window that was already cached, every request
the killed builds sent is one an uninterrupted build sends (the same windows, in the same order, per
query), and the manifest counts each paid call once.

The fake server answers each request as a pure function of its messages (no plan), so any difference
between an interrupted and an uninterrupted build comes from the build, not from the server's history.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from busy_cpus import busy_cpus
from fake_chat_server import FakeChatServer
from test_teacher_faults import KEY, N_DOCS, write_inputs

from data_pipeline.distill_format import read_distill_jsonl
from data_pipeline.set_builder.build import build
from data_pipeline.set_builder.manifest import CallLedger, paid_totals
from data_pipeline.set_builder.queries import OriginalQueries
from data_pipeline.set_builder.teacher import QueryStats, RunStats, TeacherResult
from retrieval.run_file import RunFileRetriever
from retrieval.runs import sort_hits
from twolar_jax.durable_io import repair_tail

REPO = Path(__file__).resolve().parent.parent
N_QUERIES = 60
PRICES = (1.0, 2.0)  # per 1K prompt / completion tokens: cost is checked, not only tokens


def _gin(tmp: Path, base_url: str, *, timeout_s: float = 5.0, n_queries: int = N_QUERIES) -> Path:
    corpus, queries, run = write_inputs(tmp, [f"q{i:03d}" for i in range(n_queries)])
    gin_file = tmp / "resume.gin"
    gin_file.write_text(f"""
build.output_dir = %OUTPUT_DIR
build.corpus_path = '{corpus}'
build.num_queries = {n_queries}
build.depth = {N_DOCS}
build.progress = False
build.manifest_every_s = 0.2
build.query_sources = {{'original': @OriginalQueries()}}
build.query_mix = {{'original': 1.0}}
OriginalQueries.path = '{queries}'
build.retrievers = {{'bm25': @RunFileRetriever()}}
RunFileRetriever.path = '{run}'
build.retrieval_batch_size = 8
build.teacher = @ListwiseLLMTeacher()
ListwiseLLMTeacher.client = @ChatClient()
ListwiseLLMTeacher.window_size = 4
ListwiseLLMTeacher.step = 2
ListwiseLLMTeacher.progress = False
ListwiseLLMTeacher.prompt_price_per_1k = {PRICES[0]}
ListwiseLLMTeacher.completion_price_per_1k = {PRICES[1]}
ChatClient.model = 'fake-llm'
ChatClient.base_url = '{base_url}'
ChatClient.max_concurrency = 4
ChatClient.timeout_s = {timeout_s}
ChatClient.api_key = '{KEY}'
""")
    return gin_file


def _start(gin_file: Path, out: Path, log: Path, kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    """The real entry point; with kill_at=(file, n) it kill -9s itself after its n-th line to that file."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)  # the key comes from the gin binding, which config.gin must not repeat
    args = [f"--gin_file={gin_file}", f"--gin.OUTPUT_DIR='{out}'"]
    entry = (["-m", "data_pipeline.set_builder"] if kill_at is None else
             [str(REPO / "tests" / "kill_at.py"), kill_at[0], str(kill_at[1]), "--"])
    return subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


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


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_qid(path: Path) -> dict[str, str]:
    return {json.loads(line)["qid"]: line for line in path.read_text().splitlines()}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _run_ref(tmp: Path, srv: FakeChatServer, n_queries: int = N_QUERIES) -> Path:
    """An uninterrupted build into tmp/ref/out."""
    ref = tmp / "ref"
    ref.mkdir()
    proc = _start(_gin(ref, srv.base_url, timeout_s=60.0, n_queries=n_queries), ref / "out", ref / "build.log")
    assert proc.wait(timeout=300) == 0, (ref / "build.log").read_text()[-3000:]
    srv.wait_idle()
    return ref / "out"


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
            srv.wait_idle()  # every request the dead process had sent is now logged (or was incomplete)
            cached_at_kill.append((len(srv.calls), _cache_keys(out / "llm_cache.jsonl")))
            assert kill_after <= _lines(out / "train.jsonl") < N_QUERIES
        # A torn write at the very end of each file must be cut, not parsed or duplicated.
        with (out / "train.jsonl").open("ab") as f:
            f.write(b'{"qid": "q0')
        with (out / "llm_cache.jsonl").open("ab") as f:
            f.write(b'{"key": "ab')

        proc = _start(gin_file, out, log)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        srv.wait_idle()

        records = list(read_distill_jsonl(out / "train.jsonl"))
        qids = [r.qid for r in records]
        assert len(qids) == len(set(qids)) == N_QUERIES  # none twice, none lost
        assert all(len(r.candidates) == N_DOCS for r in records)
        # No window that was in the cache when a build died was asked of the server afterwards.
        for n_calls, keys in cached_at_kill:
            later = {c["cache_key"] for c in srv.calls[n_calls:]}
            assert not (later & keys)
        # A window is asked again only if it was in flight (asked, not yet cached) at a kill: at most one per
        # worker (max_concurrency = 4) per kill. Sets, not counts: a retry after a timeout repeats a key.
        marks = [0] + [n for n, _ in cached_at_kill]
        for lo, hi in zip(marks, marks[1:]):
            assert len({c["cache_key"] for c in srv.calls[lo:hi]} & {c["cache_key"] for c in srv.calls[hi:]}) <= 4
        assert len({c["cache_key"] for c in srv.calls}) == 2 * N_QUERIES

        manifest = _manifest(out)
        assert manifest["labelled"]["queries"] == N_QUERIES
        assert manifest["runs"][-1]["status"] == "complete" and len(manifest["runs"]) >= 2
        assert manifest["paid"]["answers"] == 2 * N_QUERIES  # each window's answer counted once
        teacher_log_qids = {json.loads(x)["qid"] for x in (out / "teacher_log.jsonl").read_text().splitlines()}
        assert teacher_log_qids == set(qids)
        config = (out / "config.gin").read_text()
        assert "ChatClient.api_key = None  # redacted" in config and "ChatClient.model = 'fake-llm'" in config
    assert KEY not in log.read_text()
    assert all(KEY not in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_resume_fake_server_drops_a_request_whose_body_never_arrived():
    """httpcore writes a request's headers and body separately; a client killed between the two writes
    left the server headers and EOF, which it used to log as an empty request (the 121st window of issue
    13). Such a request asks nothing: no call, no plan action, one `incomplete` entry."""
    with FakeChatServer({"q": ["500"]}, expected_key=KEY) as srv:
        part = b'{"model": "fake-llm", "mess'
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1233\r\n\r\n" + part)
        srv.wait_idle()
        assert srv.calls == [] and len(srv.incomplete) == 1
        assert srv.incomplete[0]["content_length"] == 1233 and srv.incomplete[0]["received"] == len(part)
        assert srv.next_action("q") == "500"  # the dead request consumed no action of the plan


# ------------------------------------------------------------------------------------- exact kill points


def _windows_by_query(calls: list[dict]) -> dict[str, list[str]]:
    """Per query, its distinct requests (cache keys) in the order they were first sent."""
    out: dict[str, list[str]] = defaultdict(list)
    for c in calls:
        if c["cache_key"] not in out[c["query"]]:
            out[c["query"]].append(c["cache_key"])
    return dict(out)


def _window_diff(ref_calls: list[dict], calls: list[dict]) -> str:
    """The first query whose windows differ, each window as its passages in prompt order (for the failure)."""
    def passages(c: dict) -> list[str]:
        return [m["content"] for m in c["messages"] if m["role"] == "user" and m["content"].startswith("[")]

    def by_query(cs: list[dict]) -> dict[str, list[list[str]]]:
        out: dict[str, list] = defaultdict(list)
        for c in cs:
            if passages(c) not in out[c["query"]]:
                out[c["query"]].append(passages(c))
        return out

    ref, got = by_query(ref_calls), by_query(calls)
    for q in sorted(set(ref) | set(got)):
        if ref.get(q) != got.get(q):
            return f"query {q!r}:\n  uninterrupted: {ref.get(q)}\n  killed+resumed: {got.get(q)}"
    return ""


# Kill points in units of work (tests/kill_at.py): a loaded machine changes which other windows are in
# flight at a kill, never where the build dies.
KILL_POINTS = [
    ("candidates.jsonl", 11),  # inside the candidate stage, mid-batch (batches of 8)
    ("llm_cache.jsonl", 9),    # an answer durable, the window built from it (or the query's line) not yet
    ("teacher_log.jsonl", 6),  # between a query's teacher log line and its train.jsonl line
    ("train.jsonl", 20),       # after N labelled queries
]


@pytest.mark.slow
def test_resume_killed_builds_send_exactly_the_requests_of_an_uninterrupted_build(tmp_path):
    # timeout_s=60: retries are not what this test is about (it passes with them too: a retry repeats a key)
    with busy_cpus(), FakeChatServer(delay_s=0.03, expected_key=KEY) as srv:
        ref_out = _run_ref(tmp_path, srv)
        ref_calls, n_ref = list(srv.calls), len(srv.calls)

        run = tmp_path / "killed"
        run.mkdir()
        out, log = run / "out", run / "build.log"
        gin_file = _gin(run, srv.base_url, timeout_s=60.0)
        marks, cached_at_kill = [n_ref], []
        for point in KILL_POINTS:
            proc = _start(gin_file, out, log, kill_at=point)
            assert proc.wait(timeout=300) == -signal.SIGKILL, f"{point} not reached:\n{log.read_text()[-3000:]}"
            srv.wait_idle()
            marks.append(len(srv.calls))
            cache = out / "llm_cache.jsonl"
            cached_at_kill.append(_cache_keys(cache) if cache.exists() else set())
        proc = _start(gin_file, out, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        srv.wait_idle()
        marks.append(len(srv.calls))
        killed_calls = srv.calls[n_ref:]

    # Request by request: per query, the same windows in the same order as the uninterrupted build, and
    # no request the uninterrupted build does not send (it sends 2 distinct windows per query).
    assert len({c["cache_key"] for c in ref_calls}) == 2 * N_QUERIES
    assert _windows_by_query(killed_calls) == _windows_by_query(ref_calls), _window_diff(ref_calls, killed_calls)
    # A window answered (cached) before a kill is never asked again; one asked by a build that died is
    # asked again only if it was still in flight: at most one per worker (max_concurrency = 4) per kill.
    for i, cached in enumerate(cached_at_kill):
        asked_here = {c["cache_key"] for c in killed_calls[marks[i] - n_ref:marks[i + 1] - n_ref]}
        asked_later = {c["cache_key"] for c in killed_calls[marks[i + 1] - n_ref:]}
        assert not (asked_later & cached), KILL_POINTS[i]
        assert len(asked_here & asked_later) <= 4, KILL_POINTS[i]
    # The same outputs, line for line per query, and the same paid answers, tokens and cost.
    for name in ("candidates.jsonl", "train.jsonl"):
        assert _by_qid(out / name) == _by_qid(ref_out / name), name
    assert _lines(out / "train.jsonl") == N_QUERIES
    manifest, ref_manifest = _manifest(out), _manifest(ref_out)
    assert manifest["paid"] == ref_manifest["paid"] and manifest["paid"]["answers"] == 2 * N_QUERIES
    assert [r["status"] for r in manifest["runs"]] == ["killed"] * (len(KILL_POINTS) - 1) + ["complete"]


def test_resume_kill_between_log_and_train_counts_each_paid_call_once(tmp_path):
    """kill -9 right after a query's teacher_log line, before its train line: the next run labels it
    again from the cache (a second log line, all cache hits). Its windows count once, what its first run
    paid still counts, and the build's paid totals equal an uninterrupted build's."""
    n_queries = 20
    with FakeChatServer(delay_s=0.03, expected_key=KEY) as srv:
        ref_out = _run_ref(tmp_path, srv, n_queries)
        run = tmp_path / "killed"
        run.mkdir()
        out, log = run / "out", run / "build.log"
        gin_file = _gin(run, srv.base_url, timeout_s=60.0, n_queries=n_queries)
        proc = _start(gin_file, out, log, kill_at=("teacher_log.jsonl", 5))
        assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
        orphan = _jsonl(out / "teacher_log.jsonl")[-1]
        assert orphan["qid"] not in _by_qid(out / "train.jsonl") and orphan["api_calls"] == 2
        srv.wait_idle()
        proc = _start(gin_file, out, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    logs = [x for x in _jsonl(out / "teacher_log.jsonl") if x["qid"] == orphan["qid"]]
    assert len(logs) == 2 and logs[1]["cache_hits"] == 2 and logs[1]["api_calls"] == 0
    ref_log = next(x for x in _jsonl(ref_out / "teacher_log.jsonl") if x["qid"] == orphan["qid"])
    assert logs[0]["prompt_tokens"] == ref_log["prompt_tokens"] > 0
    assert _by_qid(out / "train.jsonl") == _by_qid(ref_out / "train.jsonl")

    manifest, ref_manifest = _manifest(out), _manifest(ref_out)
    labels, ref_labels = manifest["teacher_labels"], ref_manifest["teacher_labels"]
    assert labels["windows"] == ref_labels["windows"] == 2 * n_queries  # the relabelled query's windows once
    # What the build paid, from the call cache: each answer once, whatever the kill left in the logs.
    assert manifest["paid"] == ref_manifest["paid"] and manifest["paid"]["answers"] == 2 * n_queries
    assert manifest["paid"]["cost"] == pytest.approx(
        manifest["paid"]["prompt_tokens"] / 1000 * PRICES[0] + manifest["paid"]["completion_tokens"] / 1000 * PRICES[1])
    assert ref_labels["prompt_tokens"] == ref_manifest["paid"]["prompt_tokens"]
    # Per query api_calls + cache_hits == windows (no retries here), except the orphan: its first run's 2
    # calls stay in the labels' paid fields and its last line's 2 cache hits describe its label.
    assert labels["api_calls"] + labels["cache_hits"] == labels["windows"] + 2
    killed_run = manifest["runs"][0]
    assert killed_run["status"] == "killed" and killed_run["paid"]["answers"] >= 10  # 5 queries, 2 windows each
    assert sum(r["paid"]["answers"] for r in manifest["runs"]) == 2 * n_queries


# ---------------------------------------------------------------------------------------------- candidates


class _BatchSensitiveRun(RunFileRetriever):
    """A run file whose scores are tied up to a last-bits jitter that depends on the whole batch, as a
    padded dense encoder's are: the candidate order of a query depends on what else is in its batch."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches: list[tuple[str, ...]] = []

    def retrieve(self, queries, k):
        self.batches.append(tuple(queries))
        signature = sum(int(q[1:]) for q in queries) + len(queries)
        return {q: sort_hits((d, 1.0 + ((j * signature) % 5) * 1e-12) for j, (d, _) in enumerate(self._run[q]))[:k]
                for q in queries}


class _IdentityTeacher:
    model_name, prompt_version = "identity", "none"

    def rank_all(self, requests, on_result, *, work_dir, total=None):
        for r in requests:
            on_result(TeacherResult(r.qid, list(range(len(r.passages))), None, QueryStats()))
        return RunStats()

    def describe(self):
        return {"kind": "identity"}

    def call_stats(self):
        return {}


class _Killed(Exception):
    pass


def test_resume_candidate_stage_retrieves_the_same_batches(tmp_path):
    """kill -9 inside the candidate stage (emulated: an exception at the 3rd batch, then the file cut to
    11 lines, i.e. mid-batch): the resumed stage hands the retriever the uninterrupted build's batches,
    so a batch-sensitive retriever gives the same candidates."""
    qids = [f"q{i:03d}" for i in range(30)]
    corpus, queries, run_path = write_inputs(tmp_path, qids)

    def go(out: Path, retriever) -> None:
        build(output_dir=str(out), corpus_path=str(corpus), teacher=_IdentityTeacher(),
              retrievers={"bm25": retriever}, query_sources={"original": OriginalQueries(path=str(queries))},
              query_mix={"original": 1.0}, num_queries=len(qids), depth=N_DOCS, retrieval_batch_size=8,
              progress=False, manifest_every_s=0.0)

    ref = _BatchSensitiveRun(path=str(run_path))
    go(tmp_path / "ref", ref)
    assert [len(b) for b in ref.batches] == [8, 8, 8, 6]

    dying = _BatchSensitiveRun(path=str(run_path))
    original = dying.retrieve

    def retrieve_then_die(q, k):
        if len(dying.batches) == 2:
            raise _Killed
        return original(q, k)

    dying.retrieve = retrieve_then_die
    with pytest.raises(_Killed):
        go(tmp_path / "out", dying)
    cands = tmp_path / "out" / "candidates.jsonl"
    lines = cands.read_text().splitlines(keepends=True)
    assert len(lines) == 16
    cands.write_text("".join(lines[:11]))

    resumed = _BatchSensitiveRun(path=str(run_path))
    go(tmp_path / "out", resumed)
    assert resumed.batches == ref.batches[1:]  # the half-written batch whole again, then the rest
    assert _by_qid(cands) == _by_qid(tmp_path / "ref" / "candidates.jsonl")
    assert _by_qid(tmp_path / "out" / "train.jsonl") == _by_qid(tmp_path / "ref" / "train.jsonl")


# ------------------------------------------------------------------------------------------------ ledger


def _cache_line(key: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    return (json.dumps({"key": key, "model": "m", "text": "[1] > [2]", "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens}) + "\n").encode()


def test_resume_ledger_settles_a_killed_run_and_skips_other_builds_lines(tmp_path):
    """The call ledger counts, per run, the cache bytes that run appended: a killed run's stale count is
    redone up to the next run's start (its torn last line excluded), a clean run counts only from its own
    start, so lines another build appended to a shared cache before a run are not this build's."""
    cache = tmp_path / "llm_cache.jsonl"
    cache.write_bytes(_cache_line("other-build", 1000, 1000))  # a shared cache: not this build's
    ledger = CallLedger(cache, prompt_price_per_1k=1.0, completion_price_per_1k=2.0)
    killed = {"status": "running"}
    ledger.start(killed)
    with cache.open("ab") as f:
        f.write(_cache_line("a", 10, 1))
    ledger.advance(killed)  # its last manifest write saw one answer
    with cache.open("ab") as f:
        f.write(_cache_line("b", 20, 2) + _cache_line("c", 30, 3) + b'{"key": "d", "te')  # then kill -9
    repair_tail(cache)  # the next start opens the cache: the torn line is cut
    killed["status"] = "killed"
    current = {"status": "running"}
    ledger.start(current)
    runs = [killed, current]
    ledger.settle(runs)
    assert killed["paid"] == {"answers": 3, "prompt_tokens": 60, "completion_tokens": 6, "cost": 0.072}
    with cache.open("ab") as f:
        f.write(_cache_line("e", 5, 5))
    ledger.advance(current)
    ledger.settle(runs)  # settled once: unchanged
    assert current["paid"] == {"answers": 1, "prompt_tokens": 5, "completion_tokens": 5, "cost": 0.015}
    assert paid_totals(runs) == {"answers": 4, "prompt_tokens": 65, "completion_tokens": 11, "cost": 0.087}
