"""The distillation JSONL and the TWOLAR / rank_llm readers: round trips and every bad input.

No TensorFlow here (distill_format.py must stay importable without it; one test checks that)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_pipeline import distill_format as formats
from data_pipeline.distill_format import Candidate, DistillRecord, FormatError


def _good(qid="q1", n=3, scores=True, **over):
    obj = {
        "qid": qid, "query": "what is a cat?", "query_type": "crop",
        "candidates": [{"docid": f"d{i}", "text": f"passage {i} é", "source": "bm25"} for i in range(n)],
    }
    if scores:
        obj["teacher_scores"] = [float(n - i) for i in range(n)]
    obj.update(over)
    return obj


def _write_lines(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
    return path


def test_round_trip_write_read(tmp_path):
    records = [
        DistillRecord("q1", "what is a cat?", "crop", (Candidate("a", "Ünïcode text", "bm25"), Candidate("b", "x", "")),
                      (2.0, -1.5)),
        DistillRecord("q2", "dogs", "msmarco", (Candidate("c", "y", "splade"),), None),
    ]
    path = tmp_path / "set.jsonl"
    assert formats.write_distill_jsonl(path, records) == 2
    assert list(formats.read_distill_jsonl(path)) == records
    assert formats.parse_distill_line(formats.record_to_json(records[0])) == records[0]
    assert "teacher_scores" not in json.loads(formats.record_to_json(records[1]))
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_formats_does_not_import_tensorflow():
    code = "import sys, data_pipeline.distill_format; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BAD_LINES = [
    # (line text, field named, words in the message)
    ({k: v for k, v in _good().items() if k != "qid"}, "qid", "missing field"),
    ({k: v for k, v in _good().items() if k != "query_type"}, "query_type", "missing field"),
    (_good(query=""), "query", "empty string"),
    (_good(qid=7), "qid", "expected a string, got int"),
    (_good(candidates=[]), "candidates", "empty candidate list"),
    (_good(candidates={"docid": "a"}), "candidates", "expected a list, got dict"),
    (_good(candidates=[{"docid": "a", "text": "t", "source": "s"}, {"docid": "b", "source": "s"}], scores=False),
     "candidates[1].text", "missing field"),
    (_good(candidates=[{"docid": "a", "text": "t", "source": "s"}, {"docid": "a", "text": "u", "source": "s"}],
           scores=False), "candidates[1].docid", "duplicate docid 'a' (first at candidates[0])"),
    (_good(candidates=[{"docid": "a", "text": "   ", "source": "s"}], scores=False), "candidates[0].text",
     "empty string"),
    (_good(candidates=[{"docid": "a", "text": "t", "source": None}], scores=False), "candidates[0].source",
     "expected a string, got null"),
    (_good(teacher_scores=[1.0, 2.0]), "teacher_scores", "length 2 != 3 candidates"),
    (_good(teacher_scores=[1.0, "2", 3.0]), "teacher_scores[1]", "expected a number, got str"),
    (_good(teacher_scores=[1.0, True, 3.0]), "teacher_scores[1]", "expected a number, got bool"),
    (_good(teacher_scores=3.0), "teacher_scores", "expected a list of numbers or null, got float"),
    ([1, 2], "line", "expected a JSON object, got list"),
]


@pytest.mark.parametrize("obj,field,what", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, obj, field, what):
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(_good("ok1")), "", json.dumps(obj)])
    with pytest.raises(FormatError) as info:
        list(formats.read_distill_jsonl(path))
    assert str(info.value) == f"{path}:3: {field}: {what}"
    assert (info.value.lineno, info.value.field) == (3, field)


def test_malformed_json_and_nan(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [json.dumps(_good()), '{"qid": "q2", "query": '])
    with pytest.raises(FormatError, match=rf"^{path}:2: line: malformed JSON \(Expecting value at column 24\)$"):
        list(formats.read_distill_jsonl(path))
    nan = json.dumps(_good()).replace("[3.0, 2.0, 1.0]", "[3.0, NaN, 1.0]")
    with pytest.raises(FormatError, match=r"^x.jsonl:9: teacher_scores\[1\]: not finite \(nan\)$"):
        formats.parse_distill_line(nan, path="x.jsonl", lineno=9)


def test_invalid_utf8_is_named_by_line(tmp_path):
    bad = json.dumps(_good("q2")).encode("utf-8").replace(b"what", b"wh\xffat")
    path = _write_lines(tmp_path / "u.jsonl", [json.dumps(_good("q1")), json.dumps(_good("q3")), bad + b"\n"])
    with pytest.raises(FormatError) as info:
        list(formats.read_distill_jsonl(path))
    assert bad.index(b"\xff") == 26
    assert str(info.value) == f"{path}:3: line: invalid UTF-8 (byte 0xff at byte offset 26)"


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    lines = [json.dumps(_good("q1")), json.dumps(_good("q2", candidates=[])), "", "{nope",
             json.dumps(_good("q3")).encode() .replace(b"cat", b"c\xe9t") + b"\n",
             json.dumps(_good("q4", teacher_scores=[1.0])), json.dumps(_good("q5"))]
    path = _write_lines(tmp_path / "s.jsonl", lines)
    stats = {}
    with caplog.at_level("WARNING", logger="data_pipeline.distill_format"):
        got = list(formats.read_distill_jsonl(path, skip_invalid=True, stats=stats))
    assert [r.qid for r in got] == ["q1", "q5"]
    assert stats == {"lines": 7, "records": 2, "blank": 1, "skipped": 4,
                     "skipped_by_field": {"candidates": 1, "line": 2, "teacher_scores": 1}}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert f"{path}:2: candidates: empty candidate list" in messages[0]
    assert f"{path}:6: teacher_scores: length 1 != 3 candidates" in messages[3]


def test_bom_and_blank_lines_are_not_errors(tmp_path):
    path = _write_lines(tmp_path / "b.jsonl", [b"\xef\xbb\xbf" + json.dumps(_good("q1")).encode() + b"\n", "   ",
                                                json.dumps(_good("q2"))])
    assert [r.qid for r in formats.read_distill_jsonl(path)] == ["q1", "q2"]


def test_index_offsets_reread_records(tmp_path):
    objs = [_good("q1"), _good("q2", query_type="doct5query"), _good("q3")]
    path = _write_lines(tmp_path / "i.jsonl", [b"\xef\xbb\xbf" + json.dumps(objs[0]).encode() + b"\n", "",
                                               json.dumps(objs[1]), json.dumps(objs[2])])
    index = formats.DistillIndex(path)
    assert [e.lineno for e in index.entries] == [1, 3, 4]
    assert index.query_types() == {"crop": 2, "doct5query": 1}
    assert [index.read(e.offset, e.lineno).qid for e in index.select("crop")] == ["q1", "q3"]
    bad = _write_lines(tmp_path / "j.jsonl", [json.dumps(objs[0]), json.dumps(_good("q9", candidates=[]))])
    with pytest.raises(FormatError, match=rf"^{bad}:2: candidates: empty candidate list$"):
        formats.DistillIndex(bad)
    assert len(formats.DistillIndex(bad, skip_invalid=True)) == 1


def test_group_texts_padding_modes():
    from twolar_jax.ranking.pointwise_inputs import group_texts

    rec = formats.parse_distill_line(json.dumps(_good(n=3)))
    texts = [c.text for c in rec.candidates]
    assert group_texts(texts, 2) == ["passage 0 é", "passage 1 é"]
    assert group_texts(texts, 5) == ["passage 0 é", "passage 1 é", "passage 2 é"]
    assert group_texts(texts, 5, padding="twolar")[3:] == ["<padding_passage>"] * 2
    with pytest.raises(ValueError, match="padding='zero'"):
        group_texts(texts, 5, padding="zero")


# ------------------------------------------------------------------------------------------ TWOLAR format


def test_twolar_reader(tmp_path):
    lines = [
        json.dumps({"query": "who won?", "positive_passages": [{"docid": "7", "text": "p"}],
                    "retrieved_passages": [{"docid": 7, "title": "T", "text": "seven"},
                                           {"docid": "8", "title": "", "text": 8}]}),
        json.dumps({"query_id": "q2", "query": "x", "retrieved_passages": [{"docid": "1", "text": "one"}]}),
    ]
    path = _write_lines(tmp_path / "twolar.jsonl", lines)
    got = list(formats.read_twolar_jsonl(path, query_type="doct5query"))
    assert got[0] == DistillRecord("line1", "who won?", "doct5query",
                                   (Candidate("7", "seven", "twolar"), Candidate("8", "8", "twolar")))
    assert got[1].qid == "q2" and got[1].candidates == (Candidate("1", "one", "twolar"),)
    titled = list(formats.read_twolar_jsonl(path, with_title=True))
    assert titled[0].candidates[0].text == "T seven" and titled[0].query_type == "unknown"


@pytest.mark.parametrize("obj,field,what", [
    ({"query": "q"}, "retrieved_passages", "missing field"),
    ({"query": "q", "retrieved_passages": []}, "retrieved_passages", "empty candidate list"),
    ({"query": "q", "retrieved_passages": [{"docid": "1", "text": "a"}, {"docid": "1", "text": "b"}]},
     "retrieved_passages[1].docid", "duplicate docid '1' (first at retrieved_passages[0])"),
    ({"query": "q", "retrieved_passages": [{"text": "a"}]}, "retrieved_passages[0].docid", "missing field"),
    ({"retrieved_passages": [{"docid": "1", "text": "a"}]}, "query", "missing field"),
])
def test_twolar_reader_errors(tmp_path, obj, field, what):
    path = _write_lines(tmp_path / "t.jsonl", ["", json.dumps(obj)])
    with pytest.raises(FormatError) as info:
        list(formats.read_twolar_jsonl(path))
    assert str(info.value) == f"{path}:2: {field}: {what}"
    stats = {}
    assert list(formats.read_twolar_jsonl(path, skip_invalid=True, stats=stats)) == []
    assert stats["skipped"] == 1


# ---------------------------------------------------------------------------------------- rank_llm format


def test_rank_llm_result_to_distill(tmp_path):
    pytest.importorskip("retrieval.readers")
    rows = [
        {"query": {"text": "how tall?", "qid": 5},
         "candidates": [{"docid": "b", "score": 1.0, "doc": {"contents": "second by bm25"}},
                        {"docid": "a", "score": 9.0, "doc": {"contents": "first by bm25"}}]},
        {"query": {"text": "why?", "qid": "6"}, "candidates": [{"docid": "c", "score": 2.0, "doc": {"text": "c"}}]},
    ]
    path = _write_lines(tmp_path / "rank_llm.jsonl", [json.dumps(r) for r in rows])
    got = formats.read_rank_llm_distill(path, query_type="msmarco")
    assert got[0] == DistillRecord("5", "how tall?", "msmarco",
                                   (Candidate("b", "second by bm25", "rank_llm"), Candidate("a", "first by bm25",
                                                                                             "rank_llm")))
    assert got[0].teacher_scores is None  # rank_llm's score is the first-stage score, not the teacher's
    assert got[1].candidates == (Candidate("c", "c", "rank_llm"),)
