"""The build prices itself: `twolar-build --dry_run` on the shipped SciFact data counts the teacher's windows
and tokens without a call, and a real build against the fake chat server records that estimate and what
it spent (the server's `usage`, else the same counter) in the manifest."""
import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import gin
import pytest
from fake_chat_server import FakeChatServer

from data_pipeline.set_builder import cli as build_cli
from data_pipeline.set_builder import token_count
from data_pipeline.set_builder.teacher import build_messages
from retrieval.corpus import read_corpus
from twolar_jax.resources import shipped_data
from twolar_jax.tokenizer import T5Tokenizer

pytestmark = pytest.mark.bm25

KEY = "sk-test-pricing-0123456789"
WINDOW, STEP, DEPTH, PASSAGES, N_QUERIES = 8, 3, 30, 40, 10
PRICES = (0.15, 0.6)  # USD per million input / output tokens


def _llm_gin(tmp: Path, base_url: str) -> Path:
    """The shipped offline SciFact build with its teacher swapped for the LLM teacher on the fake server."""
    path = tmp / "llm.gin"
    path.write_text(f"""
build.teacher = @teacher.ListwiseLLMTeacher()
teacher.ListwiseLLMTeacher.client = @llm_client.ChatClient()
teacher.ListwiseLLMTeacher.window_size = {WINDOW}
teacher.ListwiseLLMTeacher.step = {STEP}
teacher.ListwiseLLMTeacher.max_words_per_passage = 40
teacher.ListwiseLLMTeacher.progress = False
llm_client.ChatClient.model = 'fake-llm'
llm_client.ChatClient.base_url = '{base_url}'
llm_client.ChatClient.api_key = '{KEY}'
llm_client.ChatClient.max_concurrency = 4
""")
    return path


def _build(tmp: Path, srv: FakeChatServer, out: Path, *extra: str) -> int:
    gin.clear_config()
    try:
        return build_cli.console_main([
            "--gin_file=runs/build_scifact_offline.gin", f"--gin_file={_llm_gin(tmp, srv.base_url)}",
            f"--gin.OUTPUT_DIR='{out}'", f"--gin.build.num_queries={N_QUERIES}", f"--gin.build.depth={DEPTH}",
            f"--gin.build.max_corpus_passages={PASSAGES}", "--gin.build.progress=False",
            "--gin.build.manifest_every_s=0.0", f"--gin.build.work_dir='{tmp / 'work'}'", "--no_compile_cache",
            *extra])
    finally:
        gin.clear_config()


def _fields(line: str) -> dict[str, str]:
    assert line.startswith("dry_run "), line
    return dict(part.split("=", 1) for part in line.split()[1:])


def _t5_messages(tok: T5Tokenizer, messages: list[dict]) -> int:
    """The documented chat count, by hand: 3 per message + role + content, + 3 for the reply."""
    return 3 + sum(3 + len(tok.encode(m["role"])) + len(tok.encode(m["content"])) for m in messages)


def _hand_windows(n: int) -> int:
    """Windows for a list of n: one at the bottom, then one per STEP until the top (none below 2 passages)."""
    return 0 if n < 2 else 1 + math.ceil(max(0, n - WINDOW) / STEP)


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    """One dry run, then a real build in the same output folder, against one fake server."""
    tmp = tmp_path_factory.mktemp("pricing")
    out = tmp / "out"
    with FakeChatServer(expected_key=KEY) as srv:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = _build(tmp, srv, out, "--dry_run", f"--price_per_million_input={PRICES[0]}",
                          f"--price_per_million_output={PRICES[1]}")
        dry_calls = len(srv.calls)
        files_after_dry = sorted(p.name for p in out.iterdir())
        code_real = _build(tmp, srv, out, f"--gin.build.price_per_million_input={PRICES[0]}",
                           f"--gin.build.price_per_million_output={PRICES[1]}")
        srv.wait_idle()
        calls = list(srv.calls)
        again = tmp / "again"  # the finished build without its labels: every window is in the call cache
        shutil.copytree(out, again, ignore=shutil.ignore_patterns("train.jsonl", "teacher_log.jsonl", "manifest.json"))
        rerun = io.StringIO()
        with contextlib.redirect_stdout(rerun):
            code_again = _build(tmp, srv, again, "--dry_run")
        yield {"out": out, "code": code, "stdout": buf.getvalue(), "dry_calls": dry_calls, "calls": calls,
               "files_after_dry": files_after_dry, "code_real": code_real, "again": (code_again, rerun.getvalue()),
               "calls_after_again": len(srv.calls)}


def _requests(out: Path) -> list[tuple[str, list[str]]]:
    corpus = read_corpus(shipped_data("beir/scifact/corpus.jsonl"), max_documents=PASSAGES)
    lines = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    return [(obj["query"], [corpus[c["docid"]].contents for c in obj["candidates"]]) for obj in lines
            if obj["candidates"]]  # a query with no candidates goes to no teacher


def test_scale_dry_run_counts_windows_tokens_and_cost_without_a_call(priced):
    assert priced["code"] == 0 and priced["dry_calls"] == 0
    assert "train.jsonl" not in priced["files_after_dry"] and "manifest.json" not in priced["files_after_dry"]
    lines = [x for x in priced["stdout"].splitlines() if x.startswith("dry_run ")]
    assert len(lines) == 1
    got = _fields(lines[0])
    requests = _requests(priced["out"])
    assert int(got["queries"]) == len(requests) > 0
    counts = [len(p) for _, p in requests]
    assert len(set(counts)) > 1  # lists of several lengths: the arithmetic is checked beyond one case
    assert int(got["windows"]) == sum(_hand_windows(n) for n in counts) > 0
    assert got["token_counter"] == "t5_spiece" and int(got["cached_windows"]) == 0

    # Prompts by hand: every window of an order-keeping walk, built as the teacher builds them.
    tok, prompt, completion = T5Tokenizer(), 0, 0
    for query, passages in requests:
        end = len(passages)
        while len(passages) >= 2:
            start = max(0, end - WINDOW)
            prompt += _t5_messages(tok, build_messages(query, passages[start:end], max_words=40))
            completion += len(tok.encode(" > ".join(f"[{i + 1}]" for i in range(end - start))))
            if start == 0:
                break
            end -= STEP
    assert int(got["prompt_tokens"]) == prompt and int(got["completion_tokens"]) == completion
    cost = (prompt * PRICES[0] + completion * PRICES[1]) / 1e6
    assert got["cost"] == f"{cost:.4f}"
    assert float(got["price_per_million_input"]) == PRICES[0] and float(got["price_per_million_output"]) == PRICES[1]


def test_scale_real_build_records_estimate_and_spent(priced):
    assert priced["code_real"] == 0
    manifest = json.loads((priced["out"] / "manifest.json").read_text())
    run, calls = manifest["runs"][-1], priced["calls"]
    est, spent = run["estimate"], run["spent"]
    dry = _fields([x for x in priced["stdout"].splitlines() if x.startswith("dry_run ")][0])
    assert est["windows"] == int(dry["windows"]) == len(calls) == spent["windows"]
    assert est["prompt_tokens"] == int(dry["prompt_tokens"]) and est["token_counter"] == "t5_spiece"
    # The fake server answers in the given order (SciFact has no grade=), so the estimate's prompts are the
    # ones sent: the same counter over the messages the server received gives the estimate.
    counter = token_count.counter_for_model("fake-llm")
    assert sum(counter.messages(c["messages"]) for c in calls) == est["prompt_tokens"]
    assert spent["prompt_tokens"] == sum(c["usage"]["prompt_tokens"] for c in calls)
    assert spent["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in calls)
    assert spent["cost"] == pytest.approx((spent["prompt_tokens"] * PRICES[0]
                                           + spent["completion_tokens"] * PRICES[1]) / 1e6)
    assert manifest["tokens"] == {"estimate": est, "spent": spent}


def test_scale_dry_run_replays_the_call_cache(priced):
    code, stdout = priced["again"]
    got = _fields([x for x in stdout.splitlines() if x.startswith("dry_run ")][0])
    assert code == 0 and priced["calls_after_again"] == len(priced["calls"])
    assert int(got["cached_windows"]) == len(priced["calls"]) and int(got["windows"]) == 0
    assert int(got["prompt_tokens"]) == 0 and got["cost"] == "0.0000"


def test_scale_missing_usage_is_counted_with_the_same_counter(tmp_path):
    from test_teacher_faults import KEY as FAULTS_KEY
    from test_teacher_faults import llm_teacher, run_build

    with FakeChatServer(expected_key=FAULTS_KEY) as srv:
        srv.send_usage = False
        teacher = llm_teacher(srv.base_url)
        manifest = run_build(tmp_path, tmp_path / "out", ["q1", "q2"], teacher)
        calls = list(srv.calls)
    counter = token_count.counter_for_model("fake-llm")
    spent = manifest["runs"][-1]["spent"]
    assert spent["windows"] == len(calls) == manifest["runs"][-1]["estimate"]["windows"] == 4
    assert spent["prompt_tokens"] == sum(counter.messages(c["messages"]) for c in calls)
    assert spent["completion_tokens"] == sum(counter.text(c["text"]) for c in calls)
    assert manifest["runs"][-1]["teacher_calls"]["missing_usage"] == 4 and all(c["auth_ok"] for c in calls)


@pytest.mark.parametrize("args", [["--price_per_million_input=-1"], ["--price_per_million_output=nan"],
                                  ["--gin.build.price_per_million_input=-0.5"]])
def test_scale_bad_price_is_a_one_line_error(tmp_path, capfd, args):
    with FakeChatServer(expected_key=KEY) as srv:
        code = _build(tmp_path, srv, tmp_path / "out", "--dry_run", *args)
        assert srv.calls == []
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("twolar-build: error:") and "price_per_million" in err[0]
    assert not (tmp_path / "out" / "candidates.jsonl").exists()


def test_scale_tiktoken_without_offline_files_falls_back_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: tiktoken would have to download
    counter = token_count.counter_for_model("gpt-4o")
    assert counter.name == "t5_spiece(no_offline_tiktoken_file:o200k_base)"
    assert counter.text("[1] > [2]") == len(T5Tokenizer().encode("[1] > [2]"))
    assert token_count.counter_for_model("llama-3-70b").name == "t5_spiece"
