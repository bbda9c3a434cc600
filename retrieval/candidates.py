"""Candidate lists for reranking: the top-k of a first-stage run, with each document's text."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

from retrieval.readers import RankCandidate, RankRequest
from retrieval.runs import Run, sort_hits
from twolar_jax.errors import FormatError


def requests_from_run(run: Run, queries: Mapping[str, str], doc_text: Callable[[str], Optional[str]], *,
                      k: int = 100, source: str = "run") -> list[RankRequest]:
    """Top-k candidates per query of a first-stage run (trec_eval order), with texts, queries sorted by id.

    A query without text or a document missing from the corpus is an error naming `source`.
    """
    requests = []
    for qid in sorted(run):
        if qid not in queries:
            raise FormatError(source, None, "qid", f"query {qid!r} has no text in the topics")
        cands = []
        for docid, score in sort_hits(run[qid].items())[:k]:
            text = doc_text(docid)
            if text is None:
                raise FormatError(source, None, "docid", f"document {docid!r} (query {qid!r}) is not in the corpus")
            cands.append(RankCandidate(docid, score, text))
        requests.append(RankRequest(qid, queries[qid], cands))
    return requests
