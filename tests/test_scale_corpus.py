"""The compact Corpus (one UTF-8 buffer per column, offsets, a hash index): exact round trips, lookups,
order, strict errors, its memory budget (<= 2 bytes per byte of text), and the scale benchmark's smoke run."""
import json
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from retrieval.corpus import Corpus, Document, read_corpus
from twolar_jax.errors import FormatError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    {"_id": "a1", "title": "Plain", "text": "ascii text only"},
    {"_id": "é2", "title": "", "text": "café naïve Zürich ßtraße"},
    {"_id": "g3", "title": "Ελληνικά", "text": "αλφα βήτα γάμμα"},
    {"_id": "c4", "title": "東京", "text": "数据 검색 москва"},
    {"_id": "🙂5", "title": "emoji 🚀", "text": "4-byte 🙂😀🎉 characters"},
    {"_id": "t6", "title": "title only", "text": ""},
    {"_id": "7", "title": "", "text": "numeric-looking id"},
]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def test_scale_corpus_round_trips_every_passage_exactly(tmp_path):
    corpus = read_corpus(_write(tmp_path / "corpus.jsonl", DOCS))
    assert list(corpus) == [d["_id"] for d in DOCS]  # file order
    got = [(d.docid, d.title, d.text) for d in corpus.documents()]
    assert got == [(d["_id"], d["title"], d["text"]) for d in DOCS]
    for d in DOCS:
        assert corpus[d["_id"]] == Document(d["_id"], d["title"], d["text"])
        assert corpus.contents(d["_id"]) == Document(d["_id"], d["title"], d["text"]).contents
    assert corpus["t6"].contents == "title only" and corpus["é2"].contents == "café naïve Zürich ßtraße"
    assert len(corpus) == len(DOCS) and corpus.stats.documents == len(DOCS)


def test_scale_corpus_lookups_miss_cleanly(tmp_path):
    corpus = read_corpus(_write(tmp_path / "corpus.jsonl", DOCS))
    assert "nope" not in corpus and 7 not in corpus and None not in corpus
    assert corpus.contents("nope") is None and corpus.get("nope") is None
    with pytest.raises(KeyError):
        corpus["a"]  # a prefix of a stored id
    assert "7" in corpus and corpus["🙂5"].title == "emoji 🚀"


def test_scale_corpus_from_a_dict_and_pickle_keep_everything():
    docs = {d["_id"]: Document(d["_id"], d["title"], d["text"]) for d in DOCS}
    corpus = Corpus(docs)
    assert dict(corpus.items()) == docs and list(corpus) == list(docs)
    again = pickle.loads(pickle.dumps(corpus))
    assert dict(again.items()) == docs and again.fingerprint() == corpus.fingerprint()
    assert "c4" in again and again.contents("c4") == "東京 数据 검색 москва"


def test_scale_corpus_fingerprint_is_the_documented_sha256():
    import hashlib

    docs = {d["_id"]: Document(d["_id"], d["title"], d["text"]) for d in DOCS}
    h = hashlib.sha256()
    for doc in docs.values():
        h.update(doc.docid.encode() + b"\t" + doc.contents.encode() + b"\n")
    assert Corpus(docs).fingerprint() == h.hexdigest()[:16]


def test_scale_corpus_duplicate_ids_stay_strict(tmp_path):
    docs = DOCS[:3] + [{"_id": "g3", "text": "again"}] + DOCS[3:] + [{"_id": "a1", "text": "later"}]
    with pytest.raises(FormatError, match=r"corpus.jsonl:4: _id: duplicate document id 'g3' \(first on line 3\)"):
        read_corpus(_write(tmp_path / "corpus.jsonl", docs))
    # an empty document repeating a kept id is a repeat too; an id first seen empty (skipped) is not
    with pytest.raises(FormatError, match=r"corpus.jsonl:2: _id: duplicate document id 'a1' \(first on line 1\)"):
        read_corpus(_write(tmp_path / "corpus.jsonl", [DOCS[0], {"_id": "a1", "text": " "}, DOCS[1]]))
    corpus = read_corpus(_write(tmp_path / "corpus.jsonl", [{"_id": "x", "text": ""}, {"_id": "x", "text": "y"}]))
    assert corpus["x"].text == "y" and corpus.stats.skipped_empty == 1


def test_scale_corpus_tsv_and_max_documents(tmp_path):
    path = tmp_path / "collection.tsv"
    path.write_text("1\tfirst  passage\n2\tTitle\tsecond 🙂 passage\n3\tthird\n", encoding="utf-8")
    corpus = read_corpus(path, max_documents=2)
    assert [(d.docid, d.title, d.text) for d in corpus.documents()] == [("1", "", "first passage"),
                                                                      ("2", "Title", "second 🙂 passage")]
    path.write_text("1\tfine\nbroken line\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"collection.tsv:2: line: expected"):
        read_corpus(path)


def _synthetic(n: int, seed: int = 0) -> list[str]:
    """n JSONL lines of ~335-character passages; every other one holds non-ASCII words, nearly always a 4-byte
    emoji, which widens a Python str to 4 bytes a character (a dict of dataclasses held 2.9 bytes per byte
    of text here; 1.74 with 1 passage in 20 non-ASCII, so that corpus could not tell the two apart)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "retrieval", "passage", "corpus", "query", "ranking", "model",
             "café", "東京", "🙂"]
    lines = []
    for i in range(n):
        k = int(np.clip(rng.lognormal(3.91, 0.47), 2, 360))
        pick = rng.integers(0, 10 if i % 2 else len(words), size=k)
        lines.append(json.dumps({"_id": str(i), "title": "", "text": " ".join(words[j] for j in pick)},
                                ensure_ascii=False))
    return lines


def test_scale_corpus_memory_is_at_most_two_bytes_per_text_byte(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(_synthetic(200_000)) + "\n", encoding="utf-8")
    tracemalloc.start()
    try:
        corpus = read_corpus(path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = corpus.text_bytes()
    assert text == sum(len(d.docid.encode()) + len(d.title.encode()) + len(d.text.encode())
                       for d in corpus.documents())
    assert len(corpus) == 200_000 and text > 200_000 * 250
    assert corpus.nbytes() / text <= 2.0, corpus.nbytes() / text
    assert held / text <= 2.0, f"{held / text:.3f} bytes held per byte of text"


def test_scale_benchmark_smoke_prints_its_keys(tmp_path):
    """--quick: read, Lucene index and BM25 search of 2,000 passages, each in its own process (~30 s)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--size", "2000", "--quick",
                           "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("exponent_read=", "exponent_index=", "exponent_search=", "corpus_bytes_per_text_byte=",
                "corpus_held_bytes_per_text_byte="):
        assert key in proc.stdout, proc.stdout
    held = float(proc.stdout.split("corpus_held_bytes_per_text_byte=")[1].split()[0])
    assert 1.0 <= held <= 2.0
    assert "  2000       read" in proc.stdout and "  2000     search" in proc.stdout
    assert "2000 docs, " in proc.stdout and "1000 queries, " in proc.stdout  # the index holds every passage
