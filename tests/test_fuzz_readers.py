"""Property-based fuzzing of every reader: hostile files give the project's FormatError naming the file
(and the line, for line formats), or parse into values that hold the readers' promises; nothing else.

Inputs start from a valid file of each format and are broken two ways: bytes (truncation, flipped and
inserted bytes, deleted ranges, duplicated lines) and structure (a JSON field replaced by a wrong type,
a huge or non-finite number, removed, or wrapped in a list). Hypothesis runs derandomized (a fixed
seed) with a bounded number of examples, so the file is repeatable and takes well under a minute.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twolar_jax.errors import CheckpointError, FormatError, MissingFileError

EXAMPLES = int(os.environ.get("TWOLAR_FUZZ_EXAMPLES", "150"))
FUZZ = settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
TRIED: Counter = Counter()
HUGE = "__HUGE_NUMBER__"  # replaced by a 5000-digit JSON number (over Python's int-from-text limit)


@pytest.fixture(scope="module", autouse=True)
def report_examples():
    """Print how many inputs each reader was given (run with -s to see it)."""
    yield
    print("\nfuzz examples per reader: " + ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items())))


# ------------------------------------------------------------------------------------------ seeds
def _distill(qid: str, n: int = 3) -> dict:
    return {"qid": qid, "query": f"query {qid}", "query_type": "crop",
            "candidates": [{"docid": f"{qid}-d{j}", "text": f"passage {j}", "source": "bm25"} for j in range(n)],
            "teacher_scores": [float(n - j) for j in range(n)]}


DISTILL = [_distill("q1"), _distill("q2", 4)]
TWOLAR = [{"query_id": 7, "query": "what is x", "retrieved_passages": [
    {"docid": "d1", "text": "one", "title": "t"}, {"docid": 2, "text": "two"}]},
          {"query": "y", "retrieved_passages": [{"docid": "d3", "text": "three"}, {"docid": "d4", "text": 4}]}]
RANK_LLM = [{"query": {"text": "what is x", "qid": "1"}, "candidates": [
    {"docid": "d1", "score": 1.5, "doc": {"contents": "x"}}, {"docid": "d2", "score": 0.5, "doc": "plain text"}]},
            {"query": {"text": "y", "qid": "2"}, "candidates": [{"docid": "d3", "score": 2, "doc": {"title": "t",
                                                                                                 "text": "z"}}]}]
CANDIDATES = [{"query": "what is x", "hits": [{"content": "c1", "qid": "1", "docid": "d1", "rank": 1, "score": 2.5},
                                              {"content": "c2", "qid": "1", "docid": "d2", "rank": 2, "score": 1.0}]},
              {"query": "y", "hits": [{"content": "c3", "qid": 2, "docid": "d3", "rank": 1, "score": 0.1}]}]
CORPUS = [{"_id": "d1", "title": "Title", "text": "some text"}, {"_id": 2, "text": "more"},
          {"docid": "d3", "contents": "c"}]
QUERIES = [{"_id": "q1", "text": "first query"}, {"qid": "q2", "query": "second"}]
HF_CONFIG = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": 128, "d_model": 16,
             "d_kv": 4, "d_ff": 32, "num_heads": 2, "num_layers": 1, "num_decoder_layers": 1,
             "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "dropout_rate": 0.1,
             "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
             "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
RUN = b"q1 Q0 d1 1 12.5 bm25\nq1 Q0 d2 2 -3e-2 bm25\nq2 Q0 d1 1 7 bm25\n"
QRELS = b"q1 0 d1 1\nq1 0 d2 0\nq2 0 d1 2\n"
QRELS_BEIR = b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\n"
QUERIES_TSV = b"q1\tfirst query\nq2\tsecond one\n"
CORPUS_TSV = b"d1\tsome text\nd2\tTitle\tmore text\n"


def _jsonl(objs: list) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


# ------------------------------------------------------------------------------------- mutations
SPECIAL = [HUGE, 10 ** 400, -(10 ** 400), float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 2 ** 63, -1, 0,
           0.5, True, False, None, "", "   ", "\u2028", "\x00", "nan", "1e999", [], {}, [None], {"": None}, [[1]]]
HOSTILE = st.one_of(
    st.sampled_from(SPECIAL), st.sampled_from(SPECIAL),  # twice: the special values are the likeliest to break
    st.integers(min_value=-(10 ** 20), max_value=10 ** 20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value if action == "replace" else [obj]
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "replace":
        parent[key] = value
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif isinstance(parent, dict):
        del parent[key]
    else:
        parent.pop(key)
    return obj


def _dumps(obj: Any) -> str:
    """JSON with NaN/Infinity literals kept (json.loads accepts them) and HUGE as a 5000-digit number."""
    def default(o):
        return str(o)
    try:
        text = json.dumps(obj, allow_nan=True, default=default)
    except ValueError:  # an int too long to print: write it as text
        text = json.dumps(json.loads(json.dumps(obj, default=str)), allow_nan=True)
    return text.replace(json.dumps(HUGE), "9" * 5000)


@st.composite
def json_mutation(draw, seed: Any) -> str:
    """One JSON value with 1-3 positions replaced by a hostile value, deleted or wrapped in a list."""
    obj = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        leaves = [p for p in paths if not isinstance(_get(obj, p), (dict, list))] or paths
        path = draw(st.sampled_from(leaves) if draw(st.integers(0, 3)) else st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "wrap"]))
        try:
            obj = _set(obj, path, action, copy.deepcopy(draw(HOSTILE)))  # never share a mutable value
        except (KeyError, IndexError, TypeError):
            pass
    return _dumps(obj)


@st.composite
def jsonl_mutation(draw, seeds: list) -> bytes:
    """A JSONL file whose lines are each kept, or structurally mutated."""
    lines = []
    for seed in seeds:
        lines.append(draw(json_mutation(seed)) if draw(st.booleans()) else json.dumps(seed))
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """1-4 byte-level edits: truncate, flip, insert, delete a range, duplicate or drop a line."""
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "dup_line", "newline"]))
        i = draw(st.integers(0, len(data)))
        if op == "truncate":
            data = data[:i]
        elif op == "flip" and i < len(data):
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + draw(st.binary(min_size=1, max_size=6) | st.sampled_from(
                [b"\t", b" ", b"\n\n", b"\xef\xbb\xbf", b"\xff\xfe", b"nan", b"inf", b"1e999", b"-", b'"', b"{",
                 b"\r\n", b"\x00"])) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 12)):]
        elif op == "dup_line":
            lines = data.splitlines(keepends=True)
            k = min(i, len(lines) - 1)
            data = b"".join(lines[:k + 1] + lines[k:])
        elif op == "newline":
            data = data[:i] + b"\n" + data[i:]
    return data


NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
HOSTILE_TOKENS = [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"-inf", b"1" + b"0" * 400,
                  b"9" * 5000, b"-0", b"1.5", b"0x10", b"1_000", b"true", b"null", b'"7"', b"[1]", b"", b"\xc3\xa9",
                  b"\xff", b"1e-400", b"\xd9\xa3"]  # the last: an Arabic-Indic digit, which int() accepts


@st.composite
def number_mutation(draw, data: bytes) -> bytes:
    """1-3 numbers of the file replaced by hostile tokens: non-finite, huge, other types, nothing."""
    for _ in range(draw(st.integers(1, 3))):
        matches = list(NUMBER.finditer(data))
        if not matches:
            break
        m = draw(st.sampled_from(matches))
        data = data[:m.start()] + draw(st.sampled_from(HOSTILE_TOKENS)) + data[m.end():]
    return data


def hostile(seed_bytes: bytes, seeds_json: list | None = None, whole_json: Any = None):
    """Byte mutations of the seed file, hostile numbers, plus structural ones for JSON formats."""
    options = [byte_mutation(seed_bytes), number_mutation(seed_bytes)]
    if seeds_json is not None:
        options.append(jsonl_mutation(seeds_json))
        options.append(jsonl_mutation(seeds_json).flatmap(byte_mutation))
    if whole_json is not None:
        options.append(json_mutation(whole_json).map(lambda t: t.encode("utf-8", "surrogatepass")))
    return st.one_of(*options)


# ----------------------------------------------------------------------------------------- checks
def _check(name: str, content: bytes, filename: str, read: Callable[[Path], Any],
           allowed: tuple[type, ...] = (FormatError,), line_format: bool = True) -> Any:
    """Write `content`, read it; only `allowed` errors may escape, and they must name the file (and a line
    that exists)."""
    TRIED[name] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(content)
        try:
            return read(path)
        except allowed as e:
            assert str(path) in str(e), f"{name}: error does not name the file: {e}"
            if isinstance(e, FormatError):
                assert e.path == str(path), e
                if line_format and e.lineno is not None:
                    assert 1 <= e.lineno <= content.count(b"\n") + 1, e
            return None


def _finite(x: float) -> None:
    assert isinstance(x, float) and math.isfinite(x), x


# ------------------------------------------------------------------------------------ distillation
@FUZZ
@given(content=hostile(_jsonl(DISTILL), DISTILL))
def test_fuzz_distill_jsonl_readers(content):
    from data_pipeline.distill_format import (DistillIndex, new_stats, parse_distill_line, read_distill_jsonl)

    def strict(path):
        return list(read_distill_jsonl(path))

    def lenient(path):
        stats = new_stats()
        records = list(read_distill_jsonl(path, skip_invalid=True, stats=stats))
        assert stats["records"] == len(records) and stats["lines"] >= stats["records"] + stats["skipped"]
        return records

    def index(path):
        idx = DistillIndex(path, skip_invalid=True)
        return [idx.read(e.offset, e.lineno) for e in idx.entries]

    for records in (_check("distill_jsonl", content, "d.jsonl", strict),
                    _check("distill_jsonl_skip_invalid", content, "d.jsonl", lenient),
                    _check("distill_index", content, "d.jsonl", index)):
        for r in records or []:
            assert r.candidates and r.qid.strip() and r.query.strip()
            for s in r.teacher_scores or ():
                _finite(s)
    TRIED["parse_distill_line"] += 1
    for lineno, line in enumerate(content.splitlines() or [b""], 1):
        try:
            parse_distill_line(line, path="mem.jsonl", lineno=lineno)
        except FormatError as e:
            assert str(e).startswith(f"mem.jsonl:{lineno}: "), e


@FUZZ
@given(content=hostile(_jsonl(TWOLAR), TWOLAR))
def test_fuzz_twolar_jsonl(content):
    from data_pipeline.distill_format import read_twolar_jsonl

    _check("twolar_jsonl", content, "t.jsonl", lambda p: list(read_twolar_jsonl(p)))
    _check("twolar_jsonl_skip_invalid", content, "t.jsonl", lambda p: list(read_twolar_jsonl(p, skip_invalid=True)))


# -------------------------------------------------------------------------------------- TREC files
@FUZZ
@given(content=hostile(RUN))
def test_fuzz_trec_run(content):
    from retrieval.readers import read_run

    run = _check("trec_run", content, "run.trec", read_run)
    for docs in (run or {}).values():
        for score in docs.values():
            _finite(score)
    _check("trec_run_known_queries", content, "run.trec", lambda p: read_run(p, known_queries={"q1"}))


@FUZZ
@given(content=st.one_of(hostile(QRELS), hostile(QRELS_BEIR)))
def test_fuzz_qrels(content):
    from retrieval.readers import read_qrels

    qrels = _check("qrels", content, "qrels.txt", read_qrels)
    for judged in (qrels or {}).values():
        assert all(isinstance(v, int) for v in judged.values())


@FUZZ
@given(content=st.one_of(hostile(QUERIES_TSV), hostile(_jsonl(QUERIES), QUERIES)))
def test_fuzz_topics_and_queries(content):
    from retrieval.readers import read_queries

    for name in ("topics.tsv", "queries.jsonl"):
        queries = _check(f"queries_{name.split('.')[1]}", content, name, read_queries)
        assert all(q and t for q, t in (queries or {}).items())
        _check(f"queries_{name.split('.')[1]}_skip_empty", content, name, lambda p: read_queries(p, skip_empty=True))


# -------------------------------------------------------------------------------------------- BEIR
@FUZZ
@given(content=st.one_of(hostile(_jsonl(CORPUS), CORPUS), hostile(CORPUS_TSV)))
def test_fuzz_beir_corpus(content):
    from retrieval.corpus import read_corpus

    for name in ("corpus.jsonl", "corpus.tsv"):
        corpus = _check(f"corpus_{name.split('.')[1]}", content, name, read_corpus)
        assert all(doc.contents for doc in (corpus.documents() if corpus else ()))


@FUZZ
@given(corpus=hostile(_jsonl(CORPUS), CORPUS), queries=hostile(_jsonl(QUERIES), QUERIES), qrels=hostile(QRELS_BEIR))
def test_fuzz_beir_folder(corpus, queries, qrels):
    from retrieval.readers import load_beir

    TRIED["beir_folder"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "beir"
        (root / "qrels").mkdir(parents=True)
        (root / "corpus.jsonl").write_bytes(corpus)
        (root / "queries.jsonl").write_bytes(queries)
        (root / "qrels" / "test.tsv").write_bytes(qrels)
        try:
            load_beir(root)
        except (FormatError, MissingFileError) as e:
            assert str(root) in str(e), e


# ---------------------------------------------------------------------------------- candidate lists
@FUZZ
@given(content=hostile(_jsonl(RANK_LLM), RANK_LLM))
def test_fuzz_rank_llm_jsonl(content):
    from data_pipeline.distill_format import read_rank_llm_distill
    from retrieval.readers import read_rank_llm_jsonl

    requests = _check("rank_llm_jsonl", content, "r.jsonl", read_rank_llm_jsonl)
    for r in requests or []:
        for c in r.candidates:
            _finite(c.score)
    _check("rank_llm_distill", content, "r.jsonl", lambda p: read_rank_llm_distill(p, query_type="t"),
           line_format=False)


@FUZZ
@given(content=hostile(json.dumps(CANDIDATES).encode(), whole_json=CANDIDATES))
def test_fuzz_candidates_json(content):
    from retrieval.readers import read_candidates_json

    requests = _check("candidates_json", content, "c.json", read_candidates_json, line_format=False)
    for r in requests or []:
        for c in r.candidates:
            _finite(c.score)


# ------------------------------------------------------------------------------------ HF config.json
@FUZZ
@given(content=hostile(json.dumps(HF_CONFIG).encode(), whole_json=HF_CONFIG))
def test_fuzz_hf_config_json(content):
    from twolar_jax.hf_conversion import read_hf_config

    def read(path):
        assert path.name == "config.json"
        return read_hf_config(path.parent)

    config = _check("hf_config_json", content, "config.json", read, allowed=(CheckpointError, MissingFileError),
                    line_format=False)
    if config is not None:
        assert config.d_model > 0 and config.num_heads > 0
