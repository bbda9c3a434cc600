"""A precomputed TREC run as a retriever (pyserini's prebuilt SPLADE++ or DRAGON+ runs, any other system)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from retrieval.corpus import Corpus
from retrieval.readers import read_run
from retrieval.runs import Hits, sort_hits


class RunFileRetriever:
    """A precomputed TREC run (`qid Q0 docid rank score tag`), e.g. pyserini's prebuilt SPLADE++ or
    DRAGON+ runs, or candidates from any system you cannot run here. Queries absent from it get []."""

    def __init__(self, *, path: str, name: str = "run"):
        self.name, self.path = name, path
        self._run: Optional[dict[str, Hits]] = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        self._run = {q: sort_hits(hits.items()) for q, hits in read_run(self.path).items()}

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._run is None:
            raise RuntimeError("RunFileRetriever.prepare() was not called")
        return {q: list(self._run.get(q, [])[:k]) for q in queries}
