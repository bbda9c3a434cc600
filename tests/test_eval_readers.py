"""retrieval.readers: every format round-trips real files, and bad input names file and line."""
import gzip
import json

import pytest

from retrieval import readers
from twolar_jax.errors import FormatError


def _beir(tmp_path, corpus, queries, qrels_lines, split="test"):
    d = tmp_path / "toy"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return d


CORPUS = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "title": "", "text": "dogs bark"}]
QUERIES = [{"_id": "q1", "text": "do cats purr"}, {"_id": "q2", "text": "unjudged"}]


def test_beir_dir(tmp_path):
    ds = readers.load_beir(_beir(tmp_path, CORPUS, QUERIES, ["q1\td1\t1", "q1\td2\t0"]))
    assert ds.name == "toy" and ds.split == "test"
    assert ds.corpus["d1"].contents == "Cats cats purr" and ds.corpus["d2"].contents == "dogs bark"
    assert ds.queries == {"q1": "do cats purr"}  # only judged queries
    assert ds.qrels == {"q1": {"d1": 1, "d2": 0}}
    assert readers.is_beir_dir(ds.path)


def test_shipped_scifact(data_dir):
    ds = readers.load_beir(data_dir / "beir" / "scifact")
    assert (len(ds.corpus), len(ds.queries), sum(map(len, ds.qrels.values()))) == (5183, 300, 339)


def test_beir_duplicate_corpus_id(tmp_path):
    d = _beir(tmp_path, CORPUS + [{"_id": "d1", "text": "again"}], QUERIES, ["q1\td1\t1"])
    with pytest.raises(FormatError, match=rf"{d / 'corpus.jsonl'}:3: _id: duplicate document id 'd1' \(first on line 1\)"):
        readers.load_beir(d)


def test_beir_missing_split(tmp_path):
    d = _beir(tmp_path, CORPUS, QUERIES, ["q1\td1\t1"], split="dev")
    with pytest.raises(FileNotFoundError, match=r"qrels/test.tsv: split 'test' not found .*available: \['dev'\]"):
        readers.load_beir(d, "test")


def test_beir_bad_lines(tmp_path):
    d = _beir(tmp_path, CORPUS, QUERIES, ["q1\td1"])
    with pytest.raises(FormatError, match=r"qrels/test.tsv:2: line: expected 4 columns .*or 3 tab-separated BEIR columns"):
        readers.load_beir(d)
    d = _beir(tmp_path / "b", CORPUS, QUERIES, ["q1\td1\thigh"])
    with pytest.raises(FormatError, match=r"test.tsv:2: relevance: 'high' is not an integer"):
        readers.load_beir(d)
    d = _beir(tmp_path / "c", CORPUS, QUERIES, ["q9\td1\t1"])
    with pytest.raises(FormatError, match=r"judged queries are not in queries.jsonl, e.g. \['q9'\]"):
        readers.load_beir(d)
    d = _beir(tmp_path / "e", [{"_id": "d1", "title": 3}], QUERIES, ["q1\td1\t1"])
    with pytest.raises(FormatError, match=r"corpus.jsonl:1: title: expected a string, got int"):
        readers.load_beir(d)
    d = _beir(tmp_path / "g", [{"title": "x", "text": "y"}], QUERIES, ["q1\td1\t1"])
    with pytest.raises(FormatError, match=r"corpus.jsonl:1: _id: missing field"):
        readers.load_beir(d)
    d = _beir(tmp_path / "f", CORPUS, QUERIES, ["q1\td1\t1"])
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": ""}\n')
    with pytest.raises(FormatError, match=r"queries.jsonl:2: text: query 'q2' is empty"):
        readers.load_beir(d)
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n[1, 2]\n')
    with pytest.raises(FormatError, match=r"queries.jsonl:2: line: expected a JSON object"):
        readers.load_beir(d)


def test_topics_tsv_and_gz(tmp_path, data_dir):
    topics = readers.read_queries(data_dir / "trec_dl" / "topics.dl19-passage.tsv")
    assert len(topics) == 43 and topics["156493"] == "do goldfish grow"
    gz = tmp_path / "t.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("1\tfirst query\n2\tsecond\n")
    assert readers.read_queries(gz) == {"1": "first query", "2": "second"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tok\n2 no tab here\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: line: expected 'qid<TAB>text'"):
        readers.read_queries(bad)


def test_qrels(tmp_path, data_dir):
    qrels = readers.read_qrels(data_dir / "trec_dl" / "qrels.dl19-passage.txt")
    assert len(qrels) == 43 and sum(map(len, qrels.values())) == 9260
    bad = tmp_path / "q.txt"
    bad.write_text("1 0 d1 1\n1 0 d2\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: line: expected 4 columns"):
        readers.read_qrels(bad)
    bad.write_text("1 0 d1 1\n1 0 d1 2\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: relevance: conflicting judgments"):
        readers.read_qrels(bad)


def test_run_file(tmp_path, data_dir):
    run = readers.read_run(data_dir / "trec_dl" / "run.bm25.dl19.top100.trec")
    assert len(run) == 43 and all(len(v) == 100 for v in run.values())
    assert run["264014"]["5611210"] == pytest.approx(15.780599594116211)
    bad = tmp_path / "r.trec"
    bad.write_text("1 Q0 d1 1 2.5 t\n1 Q0 d2 2 x t\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: score: 'x' is not a number"):
        readers.read_run(bad)
    bad.write_text("1 Q0 d1 1 2.5 t\n1 Q0 d2 2 1.0\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: line: expected 6 columns"):
        readers.read_run(bad)
    bad.write_text("1 Q0 d1 1 2.5 t\n7 Q0 d2 1 1.0 t\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: qid: unknown query '7'"):
        readers.read_run(bad, known_queries={"1"})
    bad.write_text("1 Q0 d1 1 2.5 t\n1 Q0 d1 2 1.0 t\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: docid: document 'd1' appears twice"):
        readers.read_run(bad)


def test_candidate_json(tmp_path, data_dir):
    reqs = readers.read_candidates_json(data_dir / "trec_dl" / "dl19_bm25_top100.json")
    assert len(reqs) == 43 and all(len(r.candidates) == 100 for r in reqs)
    assert reqs[0].query == "how long is life cycle of flea"
    # The same ranking as the shipped run file.
    run = readers.read_run(data_dir / "trec_dl" / "run.bm25.dl19.top100.trec")
    for r in reqs:
        assert [c.docid for c in r.candidates] == list(run[r.qid])  # file order
        assert {c.docid: c.score for c in r.candidates} == pytest.approx(run[r.qid])
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([{"query": "q", "hits": [{"qid": 1, "docid": "a", "score": 1.0}]}]))
    with pytest.raises(FormatError, match=rf"{bad}: \[0\].hits\[0\].content: missing field"):
        readers.read_candidates_json(bad)
    bad.write_text('[{"query": "q",\n "hits": [}]')
    with pytest.raises(FormatError, match=rf"{bad}:2: line: invalid JSON"):
        readers.read_candidates_json(bad)


def test_rank_llm_jsonl(tmp_path):
    path = tmp_path / "rl.jsonl"
    lines = [
        {"query": {"text": "what is a cat", "qid": 264014},
         "candidates": [{"docid": "7", "score": 3.5, "doc": {"title": "Cat", "text": "A small feline."}},
                        {"docid": "9", "score": 2.0, "doc": {"segment": "Dogs."}}]},
        {"query": {"text": "q2", "qid": "2"}, "candidates": []},
    ]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    reqs = readers.read_rank_llm_jsonl(path)
    assert reqs[0] == readers.RankRequest("264014", "what is a cat", [
        readers.RankCandidate("7", 3.5, "Cat A small feline."), readers.RankCandidate("9", 2.0, "Dogs.")])
    assert reqs[1].candidates == []
    assert readers.requests_in_file_order(reqs) == {"264014": {"7": 2.0, "9": 1.0}, "2": {}}
    assert readers.requests_to_run(reqs) == {"264014": {"7": 3.5, "9": 2.0}, "2": {}}  # first-stage scores
    path.write_text(json.dumps(lines[1]) + "\n" + json.dumps({"query": {"qid": "3"}, "candidates": []}) + "\n")
    with pytest.raises(FormatError, match=rf"{path}:2: query.text: missing field"):
        readers.read_rank_llm_jsonl(path)
    path.write_text(json.dumps({"query": {"qid": "3", "text": "t"}, "candidates": [{"docid": "1", "doc": {"x": 1}}]}) + "\n")
    with pytest.raises(FormatError, match=rf"{path}:1: candidates\[0\].doc: has none of"):
        readers.read_rank_llm_jsonl(path)


def test_corpus_text_rule_and_empty_documents(tmp_path, caplog):
    """One text rule for training and evaluation: whitespace collapsed, "title text", empty docs skipped."""
    from retrieval.corpus import read_corpus

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in [
        {"_id": "a", "title": " A\ttitle ", "text": "line one\n  line two"},
        {"_id": 7, "title": "only a title", "text": ""},
        {"_id": "c", "title": "", "text": "   "}]))
    with caplog.at_level("WARNING"):
        corpus = read_corpus(path)
    assert corpus["a"].contents == "A title line one line two"
    assert corpus["7"].contents == "only a title"
    assert "c" not in corpus and corpus.stats.skipped_empty == 1
    assert f"{path}:3: document 'c' has neither title nor text" in caplog.text
    tsv = tmp_path / "c.tsv"
    tsv.write_text("p1\tplain text\np2\tTitle\tbody text\n")
    assert [d.contents for d in read_corpus(tsv).documents()] == ["plain text", "Title body text"]
    tsv.write_text("p1 no tab\n")
    with pytest.raises(FormatError, match=rf"{tsv}:1: line: expected 'docid<TAB>text'"):
        read_corpus(tsv)


def test_non_utf8_run_names_file_and_line(tmp_path):
    bad = tmp_path / "r.trec"
    bad.write_bytes(b"1 Q0 d1 1 2.5 t\n1 Q0 d\xff 2 1.0 t\n")
    with pytest.raises(FormatError, match=rf"{bad}:2: line: invalid UTF-8 \(byte 0xff"):
        readers.read_run(bad)
