"""BM25 then monoT5: a first stage reranked by one of our T5 rerankers (monoT5's softmax head by default)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from retrieval.base import Retriever
from retrieval.bm25 import BM25Retriever
from retrieval.corpus import Corpus
from retrieval.runs import Hits, sort_hits


class MonoT5Retriever:
    """BM25 top-`depth` reranked by monoT5 (our Reranker, "softmax" head: p(true) over {true, false})."""

    def __init__(self, *, checkpoint_path: str, name: str = "bm25_monot5", first_stage: Optional[Retriever] = None,
                 depth: int = 100, batch_size: int = 32, max_length: int = 512, score_head: str = "softmax"):
        self.name, self.checkpoint_path = name, checkpoint_path
        self.first_stage = first_stage if first_stage is not None else BM25Retriever(name="bm25")
        self.depth, self.batch_size, self.max_length, self.score_head = depth, batch_size, max_length, score_head
        self._reranker = None
        self._corpus: Optional[Corpus] = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from twolar_jax.reranker import Reranker

        self.first_stage.prepare(corpus, work_dir)
        self._reranker = Reranker.from_pretrained(self.checkpoint_path, score_head=self.score_head,
                                                  batch_size=self.batch_size, max_length=self.max_length)
        self._corpus = corpus

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._reranker is None or self._corpus is None:
            raise RuntimeError("MonoT5Retriever.prepare() was not called")
        first = self.first_stage.retrieve(queries, max(self.depth, k))
        out: dict[str, Hits] = {}
        for qid, hits in first.items():
            ids = [d for d, _ in hits if d in self._corpus]
            if not ids:
                out[qid] = []
                continue
            scores = self._reranker.score_pairs([queries[qid]] * len(ids), [self._corpus[d].contents for d in ids])
            out[qid] = sort_hits(zip(ids, scores.tolist()))[:k]
        return out
