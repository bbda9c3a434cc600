"""BM25 over a local Lucene index (pyserini), the one BM25 of the project: distillation candidates and
the evaluation first stage use the same index, analyzer and parameters.

It follows pyserini's BEIR "flat" baseline (2cr/beir.yaml): `Document.contents` (title and text) in one
field, Anserini's default English analyzer, k1=0.9, b=0.4, and for evaluation `--remove-query` (drop a hit
whose docid equals the query id, after retrieving k hits, as pyserini does). Indexes are built once per
corpus content (Corpus.fingerprint) under a cache folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from retrieval.corpus import Corpus
from retrieval.runs import Hits, Run

DEFAULT_CACHE_DIR = Path(os.environ.get("TWOLAR_CACHE", Path.home() / ".cache" / "twolar"))


def bm25_index(corpus: Corpus, cache_dir: str | os.PathLike, *, threads: int = 1) -> Path:
    """The Lucene index of `corpus`, built once under cache_dir (named by the corpus fingerprint)."""
    from retrieval import lucene

    index_dir = Path(cache_dir) / f"bm25-{corpus.fingerprint()}"
    if not lucene.index_is_complete(index_dir):
        lucene.build_index(({"id": d.docid, "contents": d.contents} for d in corpus.documents()), index_dir,
                           threads=threads)
    return index_dir


class BM25Retriever:
    """pyserini Lucene BM25 over `Document.contents`; k1=0.9, b=0.4 as Anserini's defaults."""

    def __init__(self, *, name: str = "bm25", k1: float = 0.9, b: float = 0.4, index_dir: Optional[str] = None,
                 threads: int = 1):
        self.name, self.k1, self.b, self.index_dir, self.threads = name, k1, b, index_dir, threads
        self._searcher = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from retrieval import lucene

        index_dir = Path(self.index_dir) if self.index_dir else bm25_index(corpus, work_dir, threads=self.threads)
        self._searcher = lucene.BM25Searcher(index_dir, k1=self.k1, b=self.b)

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._searcher is None:
            raise RuntimeError("BM25Retriever.prepare() was not called")
        return self._searcher.batch_search(dict(queries), k, threads=self.threads)

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None


def bm25_run(corpus: Corpus, queries: Mapping[str, str], *, k: int = 100, k1: float = 0.9, b: float = 0.4,
             remove_query: bool = True, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, threads: int = 1) -> Run:
    """BM25 top-k (with the retriever's own scores) for every query; `remove_query` as pyserini's BEIR runs."""
    retriever = BM25Retriever(k1=k1, b=b, threads=threads)
    retriever.prepare(corpus, Path(cache_dir))
    try:
        hits = retriever.retrieve(queries, k)
    finally:
        retriever.close()
    return {qid: {d: s for d, s in pairs if not (remove_query and d == qid)} for qid, pairs in hits.items()}
