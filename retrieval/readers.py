"""Strict readers for queries, qrels, TREC runs, candidate lists (rank_llm JSON / JSONL) and BEIR folders.

Every malformed input raises `twolar_jax.errors.FormatError`, whose message starts with
"<file>:<line>: <field>: " so a user can jump to the offending line. Nothing here guesses: duplicates,
unknown queries, non-finite scores and missing splits are errors, not warnings.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

from retrieval.corpus import Corpus, read_corpus
from retrieval.runs import Qrels, Run
from retrieval.text_files import iter_lines, json_object_line, read_text
from twolar_jax.errors import FormatError, MissingFileError, PathLike

log = logging.getLogger(__name__)


def _str_field(obj: Mapping, key: str, path: PathLike, lineno: Optional[int], *, allow_empty: bool = False,
               default: Any = ..., where: str = "") -> str:
    name = f"{where}{key}"
    if key not in obj:
        if default is not ...:
            return default
        raise FormatError(path, lineno, name, "missing field")
    value = obj[key]
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("id"):
        value = str(value)  # numeric ids are common in the wild; ids are strings here
    if not isinstance(value, str):
        raise FormatError(path, lineno, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FormatError(path, lineno, name, "empty string")
    return value


def _number(obj: Mapping, key: str, path: PathLike, lineno: Optional[int], *, default: Optional[float] = None,
            where: str = "") -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(path, lineno, f"{where}{key}", f"expected a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond float64
        raise FormatError(path, lineno, f"{where}{key}", f"not finite as a float64 ({str(value)[:20]}...)") from None
    if not math.isfinite(value):
        raise FormatError(path, lineno, f"{where}{key}", f"not finite ({value})")
    return value


# -------------------------------------------------------------------------------------------- queries
def read_queries(path: PathLike, *, skip_empty: bool = False, stats: Optional[dict] = None) -> dict[str, str]:
    """Queries by id, in file order, from BEIR `queries.jsonl` ({"_id"|"qid", "text"|"query"}) or a TSV
    `qid<TAB>text`; whitespace runs become one space.

    Duplicate ids are errors; an empty query is an error, or with `skip_empty` skipped, logged and counted
    in `stats["skipped_empty"]`.
    """
    path = Path(path)
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    empty = 0
    for lineno, line in iter_lines(path):
        if jsonl:
            obj = json_object_line(path, lineno, line)
            key = "qid" if "qid" in obj and "_id" not in obj else "_id"
            qid = _str_field(obj, key, path, lineno)
            text = _str_field(obj, "text" if "text" in obj else "query", path, lineno, allow_empty=True)
        else:
            cols = line.split("\t")
            if len(cols) != 2:
                raise FormatError(path, lineno, "line", f"expected 'qid<TAB>text', got {len(cols)} tab-separated columns")
            qid, text = cols[0].strip(), cols[1]
            if not qid:
                raise FormatError(path, lineno, "qid", "empty string")
        text = " ".join(text.split())
        if qid in queries:
            raise FormatError(path, lineno, "qid", f"duplicate query id {qid!r} (first on line {first_line[qid]})")
        if not text:
            if not skip_empty:
                raise FormatError(path, lineno, "text", f"query {qid!r} is empty")
            empty += 1
            if empty <= 5:
                log.warning("%s:%d: query %r is empty; skipped", path, lineno, qid)
            continue
        queries[qid], first_line[qid] = text, lineno
    if stats is not None:
        stats["skipped_empty"] = empty
    if not queries:
        raise FormatError(path, None, None, "no queries")
    return queries


# ---------------------------------------------------------------------------------------------- qrels
def _add_judgment(qrels: Qrels, qid: str, docid: str, rel: int, path: PathLike, lineno: int) -> None:
    if not qid or not docid:
        raise FormatError(path, lineno, "line", "empty query or document id")
    judged = qrels.setdefault(qid, {})
    if docid in judged and judged[docid] != rel:
        raise FormatError(path, lineno, "relevance",
                          f"conflicting judgments for ({qid!r}, {docid!r}): {judged[docid]} and {rel}")
    judged[docid] = rel


def _relevance(value: str, path: PathLike, lineno: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise FormatError(path, lineno, "relevance", f"{value!r} is not an integer") from None


def read_qrels(path: PathLike) -> Qrels:
    """TREC qrels `qid iter docid rel` (whitespace separated), or BEIR `query-id<TAB>corpus-id<TAB>score`
    with an optional header line; `.gz` allowed."""
    qrels: Qrels = {}
    for lineno, line in iter_lines(path):
        if "\t" in line and len(line.split("\t")) == 3:
            if lineno == 1 and line.split("\t")[0].strip() == "query-id":
                continue
            qid, docid, rel = (c.strip() for c in line.split("\t"))
        else:
            cols = line.split()
            if len(cols) != 4:
                raise FormatError(path, lineno, "line", f"expected 4 columns 'qid iter docid rel' "
                                                        f"(or 3 tab-separated BEIR columns), got {len(cols)}")
            qid, _, docid, rel = cols
        _add_judgment(qrels, qid, docid, _relevance(rel, path, lineno), path, lineno)
    if not qrels:
        raise FormatError(path, None, None, "no judgments")
    return qrels


# ----------------------------------------------------------------------------------------------- runs
def read_run(path: PathLike, *, known_queries: Optional[Collection[str]] = None,
             known_from: str = "the topics/qrels") -> Run:
    """TREC run `qid Q0 docid rank score tag`, scores as float64. Ranks are checked to be integers but the
    order comes from the scores (trec_eval's rule, see retrieval.runs). NaN and infinite scores are errors;
    with `known_queries`, a line naming another query is an error."""
    run: Run = {}
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) != 6:
            raise FormatError(path, lineno, "line", f"expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
        qid, _, docid, rank, score, _ = cols
        try:
            int(rank)
        except ValueError:
            raise FormatError(path, lineno, "rank", f"{rank!r} is not an integer") from None
        try:
            value = float(score)
        except ValueError:
            raise FormatError(path, lineno, "score", f"{score!r} is not a number") from None
        if not math.isfinite(value):
            raise FormatError(path, lineno, "score", f"{score!r} is not finite")
        if known_queries is not None and qid not in known_queries:
            raise FormatError(path, lineno, "qid", f"unknown query {qid!r} (not in {known_from})")
        ranked = run.setdefault(qid, {})
        if docid in ranked:
            raise FormatError(path, lineno, "docid", f"document {docid!r} appears twice for query {qid!r}")
        ranked[docid] = value
    if not run:
        raise FormatError(path, None, None, "empty run")
    return run


# ------------------------------------------------------------------------------------- candidate lists
@dataclass(frozen=True)
class RankCandidate:
    docid: str
    score: float  # first-stage score
    text: str


@dataclass
class RankRequest:
    """One query and its first-stage candidates, best first (rank_llm's Request, flattened)."""

    qid: str
    query: str
    candidates: list[RankCandidate] = field(default_factory=list)


def _check_candidates(req: RankRequest, path: PathLike, lineno: Optional[int], where: str = "") -> None:
    seen: set[str] = set()
    for c in req.candidates:
        if c.docid in seen:
            raise FormatError(path, lineno, f"{where}docid", f"document {c.docid!r} appears twice for query {req.qid!r}")
        seen.add(c.docid)


def _candidates_json_entry(entry: Any, i: int, path: PathLike) -> RankRequest:
    where = f"[{i}]."
    if not isinstance(entry, dict):
        raise FormatError(path, None, f"[{i}]", "expected an object {query, hits}")
    query = _str_field(entry, "query", path, None, where=where)
    hits = entry.get("hits")
    if not isinstance(hits, list) or not hits:
        raise FormatError(path, None, f"{where}hits", "must be a non-empty list")
    qids, cands = set(), []
    for j, hit in enumerate(hits):
        hwhere = f"{where}hits[{j}]."
        if not isinstance(hit, dict):
            raise FormatError(path, None, hwhere.rstrip("."), "expected an object")
        qids.add(_str_field(hit, "qid", path, None, where=hwhere))
        content = _str_field(hit, "content", path, None, allow_empty=True, where=hwhere)
        cands.append(RankCandidate(_str_field(hit, "docid", path, None, where=hwhere),
                                   _number(hit, "score", path, None, where=hwhere), content))
    if len(qids) != 1:
        raise FormatError(path, None, f"{where}hits", f"hits name {len(qids)} different qids {sorted(qids)[:3]}")
    return RankRequest(qids.pop(), query, cands)


def read_candidates_json(path: PathLike) -> list[RankRequest]:
    """rank_llm_data's retrieve_results JSON: `[{"query", "hits": [{"content","qid","docid","rank","score"}]}]`.

    The file is one JSON document, so errors name the entry and hit as a field (`[3].hits[7].score`).
    """
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise FormatError(path, e.lineno, "line", f"invalid JSON ({e.msg})") from None
    except ValueError as e:  # e.g. a number of more than 4300 digits (Python's int-from-text limit)
        raise FormatError(path, None, "line", f"invalid JSON ({str(e).split(';')[0]})") from None
    if not isinstance(data, list):
        raise FormatError(path, None, None, "expected a JSON list of {query, hits}")
    requests, seen = [], set()
    for i, entry in enumerate(data):
        req = _candidates_json_entry(entry, i, path)
        if req.qid in seen:
            raise FormatError(path, None, f"[{i}]", f"query {req.qid!r} appears twice")
        seen.add(req.qid)
        _check_candidates(req, path, None, where=f"[{i}].hits.")
        requests.append(req)
    return requests


def _rank_llm_text(doc: Any, path: PathLike, lineno: int, where: str) -> str:
    """rank_llm's doc dict: text from 'text'|'segment'|'contents'|'body'|'passage', title prepended if any."""
    if isinstance(doc, str):
        return doc
    if not isinstance(doc, dict):
        raise FormatError(path, lineno, f"{where}doc", "must be an object or a string")
    for key in ("text", "segment", "contents", "body", "passage"):
        if isinstance(doc.get(key), str):
            content = doc[key]
            break
    else:
        raise FormatError(path, lineno, f"{where}doc", "has none of text/segment/contents/body/passage")
    title = doc.get("title")
    return f"{title} {content}".strip() if isinstance(title, str) and title else content


def read_rank_llm_jsonl(path: PathLike) -> list[RankRequest]:
    """rank_llm requests/results JSONL: `{"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc"}]}`.

    Candidates keep their file order, which for rank_llm's rerank results is the reranked order.
    """
    requests: list[RankRequest] = []
    seen: set[str] = set()
    for lineno, line in iter_lines(path):
        obj = json_object_line(path, lineno, line)
        q = obj.get("query")
        if not isinstance(q, dict):
            raise FormatError(path, lineno, "query", "must be an object {text, qid}")
        qid = _str_field(q, "qid", path, lineno, where="query.")
        text = _str_field(q, "text", path, lineno, where="query.")
        cands_raw = obj.get("candidates")
        if not isinstance(cands_raw, list):
            raise FormatError(path, lineno, "candidates", "must be a list")
        cands = []
        for j, c in enumerate(cands_raw):
            where = f"candidates[{j}]."
            if not isinstance(c, dict):
                raise FormatError(path, lineno, where.rstrip("."), "must be an object")
            cands.append(RankCandidate(_str_field(c, "docid", path, lineno, where=where),
                                       _number(c, "score", path, lineno, default=0.0, where=where),
                                       _rank_llm_text(c.get("doc", ""), path, lineno, where)))
        if qid in seen:
            raise FormatError(path, lineno, "query.qid", f"query {qid!r} appears twice")
        seen.add(qid)
        req = RankRequest(qid, text, cands)
        _check_candidates(req, path, lineno, where="candidates.")
        requests.append(req)
    return requests


def requests_to_run(requests: list[RankRequest]) -> Run:
    """The first-stage run of candidate lists, with each candidate's own (first-stage) score."""
    return {r.qid: {c.docid: c.score for c in r.candidates} for r in requests}


def requests_in_file_order(requests: list[RankRequest]) -> Run:
    """The run that file order defines (scores n, n-1, ...): rank_llm *results* list candidates in the
    reranked order while their `score` is still the first-stage one."""
    return {r.qid: {c.docid: float(len(r.candidates) - i) for i, c in enumerate(r.candidates)} for r in requests}


# ----------------------------------------------------------------------------------------------- BEIR
@dataclass
class BeirDataset:
    name: str
    path: Path
    split: str
    corpus: Corpus
    queries: dict[str, str]  # only the queries judged in the split
    qrels: Qrels


def load_beir(path: PathLike, split: str = "test", *, name: Optional[str] = None) -> BeirDataset:
    """A BEIR dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

    Only queries judged in the split are kept; a judged query missing from queries.jsonl is an error.
    """
    path = Path(path)
    qrels_path = path / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (path / "qrels").glob("*.tsv")) if (path / "qrels").is_dir() else []
        raise MissingFileError(f"{qrels_path}: split {split!r} not found in {path} (available: {available or 'none'})")
    for required in ("corpus.jsonl", "queries.jsonl"):
        if not (path / required).is_file():
            raise MissingFileError(f"{path / required}: missing (a BEIR dataset dir needs corpus.jsonl, "
                                   "queries.jsonl, qrels/)")
    qrels = read_qrels(qrels_path)
    all_queries = read_queries(path / "queries.jsonl")
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise FormatError(qrels_path, None, None, f"{len(missing)} judged queries are not in queries.jsonl, "
                                                  f"e.g. {missing[:3]}")
    corpus = read_corpus(path / "corpus.jsonl")
    return BeirDataset(name or path.name, path, split, corpus, {q: all_queries[q] for q in qrels}, qrels)


def is_beir_dir(path: PathLike) -> bool:
    path = Path(path)
    return (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file() and (path / "qrels").is_dir()
