"""Candidate fusion: several first-stage rankings of one query merged into one deduplicated list."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from retrieval.corpus import Corpus
from twolar_jax.errors import OptionError


def merge_candidates(
    hits: Mapping[str, Sequence[tuple[str, float]]],
    *,
    depth: int = 30,
    quotas: Optional[Mapping[str, int]] = None,
    valid: Optional[Corpus] = None,
) -> list[tuple[str, str]]:
    """Merge per-retriever rankings of one query into at most `depth` (docid, source) pairs.

    Round-robin over the retrievers in the order given, each contributing its next not-yet-taken
    document (duplicates removed, the first retriever to reach a document is its `source`). With
    `quotas` {name: n}, a retriever stops after n documents; if the list is still short of `depth`
    (a retriever was short, or quotas sum below depth) the round-robin continues without quotas.
    Documents not in `valid` (when given) are skipped.
    """
    names = list(hits)
    if quotas is not None:
        unknown = set(quotas) - set(names)
        if unknown:
            raise OptionError(f"quotas name unknown retrievers {sorted(unknown)}; have {names}")
    pos = {n: 0 for n in names}
    taken_by = {n: 0 for n in names}
    seen: set[str] = set()
    out: list[tuple[str, str]] = []

    def next_doc(name: str) -> str | None:
        ranking = hits[name]
        while pos[name] < len(ranking):
            docid = ranking[pos[name]][0]
            pos[name] += 1
            if docid not in seen and (valid is None or docid in valid):
                return docid
        return None

    for use_quotas in ((True, False) if quotas is not None else (False,)):
        progress = True
        while len(out) < depth and progress:
            progress = False
            for name in names:
                if len(out) >= depth:
                    break
                if use_quotas and taken_by[name] >= quotas.get(name, 0):
                    continue
                docid = next_doc(name)
                if docid is None:
                    continue
                seen.add(docid)
                taken_by[name] += 1
                out.append((docid, name))
                progress = True
    return out
