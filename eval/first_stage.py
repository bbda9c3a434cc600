"""First stages: pyserini BM25 over a local BEIR corpus (cached index), an existing run file, or candidate JSON.

BM25 follows pyserini's BEIR "flat" baseline (2cr/beir.yaml): title and text in one field, Anserini's
default English analyzer, k1=0.9, b=0.4, `--remove-query` (drop a hit whose docid equals the query id,
after retrieving k hits, as pyserini does).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping

from tqdm import tqdm

from eval.readers import BeirDataset, Doc, RankCandidate, RankRequest, Run
from eval.runs import ranked

DEFAULT_CACHE_DIR = Path(os.environ.get("TWOLAR_EVAL_CACHE", Path.home() / ".cache" / "twolar_eval"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def flat_index(dataset: BeirDataset, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """The BM25 "flat" index of a BEIR corpus, built once under cache_dir (keyed by corpus content hash)."""
    from eval import lucene

    corpus_file = dataset.path / "corpus.jsonl"
    index_dir = Path(cache_dir) / f"bm25-flat-{dataset.name}-{_file_digest(corpus_file)}"
    if not lucene.index_is_complete(index_dir):
        docs = ({"id": d, "contents": doc.flat} for d, doc in dataset.corpus.items())
        lucene.build_index(docs, index_dir)
    return index_dir


def bm25_run(
    dataset: BeirDataset,
    *,
    k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
    remove_query: bool = True,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    threads: int = 1,
) -> Run:
    """BM25 top-k for every judged query of the split."""
    from eval import lucene

    searcher = lucene.BM25Searcher(flat_index(dataset, cache_dir), k1=k1, b=b)
    try:
        hits = searcher.batch_search(dataset.queries, k, threads=threads)
    finally:
        searcher.close()
    run: Run = {}
    for qid, pairs in hits.items():
        run[qid] = {d: s for d, s in pairs if not (remove_query and d == qid)}
    return run


def requests_from_run(
    run: Run,
    queries: Mapping[str, str],
    doc_text: Callable[[str], str | None],
    *,
    k: int = 100,
    source: str = "run",
) -> list[RankRequest]:
    """Top-k candidates per query of a first-stage run, with texts; unknown queries/docs are errors."""
    requests = []
    for qid in tqdm(sorted(run), desc="candidates", disable=len(run) < 1000):
        if qid not in queries:
            raise ValueError(f"{source}: query {qid!r} has no text in the topics")
        cands = []
        for docid, score in ranked(run[qid])[:k]:
            text = doc_text(docid)
            if text is None:
                raise ValueError(f"{source}: document {docid!r} (query {qid!r}) is not in the corpus")
            cands.append(RankCandidate(docid, score, text))
        requests.append(RankRequest(qid, queries[qid], cands))
    return requests


def corpus_text(corpus: Mapping[str, Doc]) -> Callable[[str], str | None]:
    """Reranker input for a BEIR doc: the same flat title + text the first stage indexed."""
    return lambda docid: corpus[docid].flat if docid in corpus else None
