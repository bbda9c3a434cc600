"""Fault tests: the LLM teacher inside a real build, against a scripted chat server on 127.0.0.1.

Every query ends labelled; retries (429 with Retry-After, 500, a hang past the timeout) and repairs
(malformed, duplicate, out-of-range, partial answers) are counted exactly; a re-run costs no call;
the API key reaches no file and no log line.
"""
import json
import logging
from pathlib import Path

import pytest

from data_pipeline.set_builder.build import build
from data_pipeline.distill_format import read_distill_jsonl
from data_pipeline.set_builder.llm_client import ChatClient
from data_pipeline.set_builder.queries import OriginalQueries
from retrieval.run_file import RunFileRetriever
from data_pipeline.set_builder.teacher import ListwiseLLMTeacher, parse_permutation, window_spans
from fake_chat_server import FakeChatServer, render, right_order

KEY = "sk-test-SECRET-0123456789abcdef"
N_DOCS = 6  # window 4, step 2 -> windows (2, 6) and (0, 4): two calls per query


def write_inputs(tmp: Path, qids: list[str], *, n_docs: int = N_DOCS) -> tuple[Path, Path, Path]:
    """A corpus whose passages carry grade=N (the fake server's notion of relevance), a TSV of queries
    whose text equals their id (the server's plan key), and a run giving every query all passages."""
    corpus = tmp / "corpus.jsonl"
    with corpus.open("w") as f:
        for q in qids:
            for j in range(n_docs):
                f.write(json.dumps({"_id": f"{q}-d{j}", "title": "", "text": f"passage {j} of {q} grade={(j * 5) % 7}"})
                        + "\n")
    queries = tmp / "queries.tsv"
    queries.write_text("".join(f"{q}\t{q}\n" for q in qids))
    run = tmp / "run.trec"
    run.write_text("".join(f"{q} Q0 {q}-d{j} {j + 1} {100 - j} bm25\n" for q in qids for j in range(n_docs)))
    return corpus, queries, run


def llm_teacher(base_url: str, *, timeout_s: float = 2.0, max_retries: int = 4, concurrency: int = 4,
                cache_path: str | None = None) -> ListwiseLLMTeacher:
    client = ChatClient(model="fake-llm", base_url=base_url, api_key=KEY, timeout_s=timeout_s,
                        max_retries=max_retries, backoff_base_s=0.05, backoff_max_s=0.2, max_concurrency=concurrency,
                        seed=0)
    return ListwiseLLMTeacher(client=client, window_size=4, step=2, progress=False, cache_path=cache_path,
                              prompt_price_per_1k=1.0, completion_price_per_1k=2.0)


def run_build(tmp: Path, out: Path, qids: list[str], teacher) -> dict:
    corpus, queries, run = write_inputs(tmp, qids)
    return build(output_dir=str(out), corpus_path=str(corpus), teacher=teacher,
                 retrievers={"bm25": RunFileRetriever(path=str(run))},
                 query_sources={"original": OriginalQueries(path=str(queries))}, query_mix={"original": 1.0},
                 num_queries=len(qids), depth=N_DOCS, progress=False, manifest_every_s=0.0)


def simulate(passages: list[str], answers: list[str], window: int = 4, step: int = 2) -> list[int]:
    """Independent reference: apply the given answers window by window (bottom to top)."""
    order = list(range(len(passages)))
    for (start, end), answer in zip(window_spans(len(order), window, step), answers):
        win = order[start:end]
        perm, _ = parse_permutation(answer, len(win))
        order[start:end] = [win[p] for p in perm]
    return order


def oracle_answers(passages: list[str]) -> list[str]:
    order, answers = list(range(len(passages))), []
    for start, end in window_spans(len(order), 4, 2):
        win = order[start:end]
        right = right_order([passages[i] for i in win])
        answers.append(render(right))
        order[start:end] = [win[p] for p in right]
    return answers


PLAN = {
    "q-429": ["429:1"],
    "q-500": ["500", "500"],
    "q-hang": ["hang:4"],  # past the 2 s client timeout
    "q-malformed": ["malformed"],
    "q-dup": ["ok", "dup"],
    "q-oob": ["oob"],
    "q-partial": ["partial"],
}
QIDS = ["q-ok", *PLAN]


def _all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_teacher_faults_exact_counts_and_resume_costs_nothing(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    with FakeChatServer(PLAN, expected_key=KEY) as srv:
        manifest = run_build(tmp_path, out, QIDS, llm_teacher(srv.base_url))
        calls_first = list(srv.calls)

        # Every query labelled once, in the distillation format, with the candidates' source kept.
        records = {r.qid: r for r in read_distill_jsonl(out / "train.jsonl")}
        assert sorted(records) == sorted(QIDS)
        assert all(len(r.candidates) == N_DOCS and {c.source for c in r.candidates} == {"bm25"}
                   for r in records.values())
        passages = {q: [f"passage {j} of {q} grade={(j * 5) % 7}" for j in range(N_DOCS)] for q in QIDS}
        for q in ("q-ok", "q-429", "q-500", "q-hang"):  # faults that a retry fixes give the right order
            expect = simulate(passages[q], oracle_answers(passages[q]))
            assert [c.docid for c in records[q].candidates] == [f"{q}-d{i}" for i in expect]
        # A malformed first window leaves the list in retrieval order; the second window is answered right.
        top = right_order(passages["q-malformed"][:4])
        assert [c.docid for c in records["q-malformed"].candidates] == [f"q-malformed-d{i}" for i in [*top, 4, 5]]

        # Exact call accounting: 8 queries x 2 windows + 1 (429) + 2 (500) + 1 (hang).
        assert len(calls_first) == 20
        assert all(c["auth_ok"] for c in calls_first)
        run = manifest["runs"][-1]
        tc = run["teacher_calls"]
        assert (tc["attempts"], tc["successes"], tc["retries"]) == (20, 16, 4)
        assert (tc["retries_429"], tc["retries_5xx"], tc["retries_timeout"]) == (1, 2, 1)
        assert tc["failed_calls"] == 0 and tc["cache_hits"] == 0
        labels = manifest["teacher_labels"]
        assert labels["repairs"] == {"duplicates": 1, "out_of_range": 1, "missing": 4 + 2, "unparseable": 1}
        assert labels["repaired_windows"] == 4
        assert labels["retries"] == 4 and labels["api_calls"] == 20 and labels["windows"] == 16
        assert run["status"] == "complete" and run["labelled"] == 8 and run["failed"] == 0
        assert manifest["labelled"]["by_query_type"] == {"original": 8}
        assert manifest["labelled"]["candidates_by_source"] == {"bm25": 8 * N_DOCS}
        assert manifest["teacher"]["model"] == "fake-llm" and manifest["teacher"]["prompt_version"] == "rankgpt-v1"
        # Tokens and cost come from the server's usage numbers and the gin prices (1.0 / 2.0 per 1K).
        assert tc["prompt_tokens"] > 0 and tc["completion_tokens"] > 0
        assert tc["cost"] == pytest.approx(tc["prompt_tokens"] / 1000 + 2 * tc["completion_tokens"] / 1000)

        # Retry-After: 1 was honoured (the retry came at least 1 s after the 429).
        t429 = [c["t_start"] for c in calls_first if c["query"] == "q-429"]
        assert t429[1] - t429[0] >= 1.0

        # Re-running the finished build costs no call and adds no line.
        before = (out / "train.jsonl").read_bytes()
        manifest2 = run_build(tmp_path, out, QIDS, llm_teacher(srv.base_url))
        assert len(srv.calls) == len(calls_first)
        assert (out / "train.jsonl").read_bytes() == before
        assert manifest2["runs"][-1]["pending_at_start"] == 0 and len(manifest2["runs"]) == 2
        assert manifest2["calls_all_runs"]["attempts"] == 20

        # A fresh output dir sharing the call cache relabels everything from the cache: zero calls.
        out3 = tmp_path / "out3"
        manifest3 = run_build(tmp_path, out3, QIDS,
                              llm_teacher(srv.base_url, cache_path=str(out / "llm_cache.jsonl")))
        assert len(srv.calls) == len(calls_first)
        assert manifest3["runs"][-1]["teacher_calls"]["cache_hits"] == 16
        assert (out3 / "train.jsonl").read_bytes().count(b"\n") == 8

    # The API key is in no file, no log record and no captured output.
    captured = capfd.readouterr()
    assert KEY not in _all_text(tmp_path)
    assert KEY not in caplog.text and KEY not in captured.out and KEY not in captured.err


def test_teacher_gives_up_then_rerun_labels_the_rest(tmp_path):
    out = tmp_path / "out"
    plan = {"q-down": ["500"] * 3}  # max_retries=2: three attempts, all 500 -> the query stays unlabelled
    with FakeChatServer(plan, expected_key=KEY) as srv:
        manifest = run_build(tmp_path, out, ["q-a", "q-down", "q-b"], llm_teacher(srv.base_url, max_retries=2))
        run = manifest["runs"][-1]
        assert run["status"] == "incomplete" and run["failed"] == 1 and run["failed_qids"] == ["q-down"]
        assert run["teacher_calls"]["failed_calls"] == 1 and run["teacher_calls"]["retries_5xx"] == 2
        assert sorted(r.qid for r in read_distill_jsonl(out / "train.jsonl")) == ["q-a", "q-b"]
        n = len(srv.calls)
        assert n == 2 + 2 + 3
        manifest = run_build(tmp_path, out, ["q-a", "q-down", "q-b"], llm_teacher(srv.base_url, max_retries=2))
        assert manifest["runs"][-1]["status"] == "complete" and manifest["labelled"]["queries"] == 3
        assert len(srv.calls) == n + 2  # only the failed query's two windows are asked again


def test_teacher_bad_key_aborts_and_keeps_finished_work(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    with FakeChatServer({"q-2": ["401"]}, expected_key=KEY) as srv:
        srv.echo_key_on_401 = True  # like OpenAI, the server quotes the key it got
        manifest = run_build(tmp_path, out, ["q-1", "q-2", "q-3"], llm_teacher(srv.base_url, concurrency=1))
    run = manifest["runs"][-1]
    assert run["status"] == "aborted" and "HTTP 401" in run["aborted"]
    assert KEY not in run["aborted"] and "Incorrect API key provided: ***" in run["aborted"]
    order = [json.loads(line)["qid"] for line in (out / "queries.jsonl").read_text().splitlines()]
    before_bad = order[:order.index("q-2")]  # concurrency 1: queries go in order, the build stops at q-2
    assert [r.qid for r in read_distill_jsonl(out / "train.jsonl")] == before_bad
    assert manifest["labelled"]["queries"] == len(before_bad)
    assert KEY not in _all_text(tmp_path) and KEY not in caplog.text


def test_teacher_client_refuses_remote_url_without_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        ChatClient(model="m", base_url="https://api.example.com/v1")
    assert ChatClient(model="m", base_url="http://127.0.0.1:9/v1").describe()["base_url"] == "http://127.0.0.1:9/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:pw@127.0.0.1:9/v1")
    assert "pw" not in repr(ChatClient(model="m"))
