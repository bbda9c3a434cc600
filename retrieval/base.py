"""The retriever interface shared by the first stages (BM25, SPLADE, dense, BM25+monoT5, run files).

Why one interface: the distillation set takes candidates from several first stages; which of them run
(and from which checkpoints) is a gin choice, and a retriever too costly to run here can be replaced by
a precomputed run file without touching the rest. Every retriever returns `{qid: [(docid, score), ...]}`
best first (retrieval.runs.sort_hits), at most k per query; fewer than k is legal and counted by callers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Protocol

from retrieval.corpus import Corpus
from retrieval.runs import Hits


class Retriever(Protocol):
    """`prepare` builds or loads what the retriever needs (indexes are cached under work_dir);
    `retrieve` returns up to k hits per query, best first."""

    name: str

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        ...

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        ...


def path_tag(path: str) -> str:
    """8 hex chars naming a checkpoint path, so caches of different encoders never mix."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
