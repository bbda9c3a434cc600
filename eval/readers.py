"""Strict readers for the evaluation formats: BEIR dirs, TREC topics/qrels/runs, candidate JSON, rank_llm JSONL.

Every malformed input raises `FormatError` whose message starts with "<file>:<line>: " so a user can
jump to the offending line. Nothing here guesses: duplicates, unknown queries and missing splits are
errors, not warnings.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, TextIO

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


class FormatError(ValueError):
    """A malformed input file; the message names file and line."""


def _err(path: os.PathLike | str, lineno: int | None, msg: str) -> FormatError:
    where = f"{path}:{lineno}" if lineno is not None else f"{path}"
    return FormatError(f"{where}: {msg}")


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a UTF-8 text file, transparently gunzipping `*.gz`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) for non-blank lines."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if line.strip():
                yield lineno, line


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err(path, lineno, f"invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _err(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _str_field(obj: Mapping, key: str, path, lineno, *, allow_empty: bool = False, default: Any = ...) -> str:
    if key not in obj:
        if default is not ...:
            return default
        raise _err(path, lineno, f"missing field '{key}'")
    value = obj[key]
    if isinstance(value, (int,)) and not isinstance(value, bool) and key.endswith(("id", "qid", "docid")):
        value = str(value)  # numeric ids are common in the wild; ids are strings here
    if not isinstance(value, str):
        raise _err(path, lineno, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _err(path, lineno, f"field '{key}' is empty")
    return value


# --------------------------------------------------------------------------------------------- BEIR


@dataclass(frozen=True)
class Doc:
    title: str
    text: str

    @property
    def flat(self) -> str:
        """BEIR "flat" contents, as pyserini's BeirFlatCollection: title and text joined by a space."""
        return f"{self.title} {self.text}".strip()


@dataclass
class BeirDataset:
    name: str
    path: Path
    split: str
    corpus: dict[str, Doc]
    queries: dict[str, str]  # only the queries judged in the split
    qrels: Qrels


def read_beir_corpus(path: str | os.PathLike) -> dict[str, Doc]:
    """corpus.jsonl: {"_id", "title"?, "text"} per line; duplicate ids are an error."""
    corpus: dict[str, Doc] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in _json_lines(path):
        docid = _str_field(obj, "_id", path, lineno)
        title = _str_field(obj, "title", path, lineno, allow_empty=True, default="")
        text = _str_field(obj, "text", path, lineno, allow_empty=True)
        if not (title.strip() or text.strip()):
            raise _err(path, lineno, f"document {docid!r} has empty 'title' and 'text'")
        if docid in corpus:
            raise _err(path, lineno, f"duplicate corpus id {docid!r} (first on line {first_line[docid]})")
        corpus[docid] = Doc(title, text)
        first_line[docid] = lineno
    if not corpus:
        raise _err(path, None, "empty corpus")
    return corpus


def read_beir_queries(path: str | os.PathLike) -> dict[str, str]:
    """queries.jsonl: {"_id", "text"} per line."""
    queries: dict[str, str] = {}
    for lineno, obj in _json_lines(path):
        qid = _str_field(obj, "_id", path, lineno)
        if qid in queries:
            raise _err(path, lineno, f"duplicate query id {qid!r}")
        queries[qid] = _str_field(obj, "text", path, lineno)
    return queries


def read_beir_qrels(path: str | os.PathLike) -> Qrels:
    """qrels/<split>.tsv: `query-id corpus-id score`, tab separated, optional header line."""
    qrels: Qrels = {}
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols[:1] == ["query-id"]:
            continue
        if len(cols) != 3:
            raise _err(path, lineno, f"expected 3 tab-separated columns (query-id corpus-id score), got {len(cols)}")
        qid, docid, score = (c.strip() for c in cols)
        try:
            rel = int(score)
        except ValueError:
            raise _err(path, lineno, f"relevance {score!r} is not an integer") from None
        _add_judgment(qrels, qid, docid, rel, path, lineno)
    if not qrels:
        raise _err(path, None, "no judgments")
    return qrels


def _add_judgment(qrels: Qrels, qid: str, docid: str, rel: int, path, lineno) -> None:
    if not qid or not docid:
        raise _err(path, lineno, "empty query or document id")
    judged = qrels.setdefault(qid, {})
    if docid in judged and judged[docid] != rel:
        raise _err(path, lineno, f"conflicting judgments for ({qid!r}, {docid!r}): {judged[docid]} and {rel}")
    judged[docid] = rel


def load_beir(path: str | os.PathLike, split: str = "test", *, name: str | None = None) -> BeirDataset:
    """A BEIR dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

    Only queries judged in the split are kept; a judged query missing from queries.jsonl is an error.
    """
    path = Path(path)
    qrels_path = path / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (path / "qrels").glob("*.tsv")) if (path / "qrels").is_dir() else []
        raise FileNotFoundError(f"{qrels_path}: split {split!r} not found in {path} (available: {available or 'none'})")
    for required in ("corpus.jsonl", "queries.jsonl"):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path / required}: missing (a BEIR dataset dir needs corpus.jsonl, queries.jsonl, qrels/)")
    qrels = read_beir_qrels(qrels_path)
    all_queries = read_beir_queries(path / "queries.jsonl")
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise _err(qrels_path, None, f"{len(missing)} judged queries are not in queries.jsonl, e.g. {missing[:3]}")
    corpus = read_beir_corpus(path / "corpus.jsonl")
    queries = {q: all_queries[q] for q in qrels}
    return BeirDataset(name or path.name, path, split, corpus, queries, qrels)


def is_beir_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file() and (path / "qrels").is_dir()


# --------------------------------------------------------------------------------------------- TREC


def read_topics(path: str | os.PathLike) -> dict[str, str]:
    """TREC topics as `qid<TAB>text` lines (optionally .gz), as pyserini/anserini-tools ship them."""
    topics: dict[str, str] = {}
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if len(cols) != 2:
            raise _err(path, lineno, f"expected 'qid<TAB>text', got {len(cols)} tab-separated columns")
        qid, text = cols[0].strip(), cols[1].strip()
        if not qid or not text:
            raise _err(path, lineno, "empty query id or text")
        if qid in topics:
            raise _err(path, lineno, f"duplicate query id {qid!r}")
        topics[qid] = text
    if not topics:
        raise _err(path, None, "no topics")
    return topics


def read_qrels(path: str | os.PathLike) -> Qrels:
    """TREC qrels: `qid iter docid rel` (whitespace separated; optionally .gz)."""
    qrels: Qrels = {}
    for lineno, line in _lines(path):
        cols = line.split()
        if len(cols) != 4:
            raise _err(path, lineno, f"expected 4 columns 'qid iter docid rel', got {len(cols)}")
        try:
            rel = int(cols[3])
        except ValueError:
            raise _err(path, lineno, f"relevance {cols[3]!r} is not an integer") from None
        _add_judgment(qrels, cols[0], cols[2], rel, path, lineno)
    if not qrels:
        raise _err(path, None, "no judgments")
    return qrels


def read_run(path: str | os.PathLike, *, known_queries: Collection[str] | None = None) -> Run:
    """TREC run: `qid Q0 docid rank score tag`. Ranks are ignored (order comes from scores, see eval.runs).

    known_queries: when given, a run line naming another query is an error.
    """
    run: Run = {}
    for lineno, line in _lines(path):
        cols = line.split()
        if len(cols) != 6:
            raise _err(path, lineno, f"expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
        qid, _, docid, rank, score, _ = cols
        try:
            int(rank)
            value = float(score)
        except ValueError:
            raise _err(path, lineno, f"bad rank {rank!r} or score {score!r}") from None
        if value != value:  # NaN
            raise _err(path, lineno, "score is NaN")
        if known_queries is not None and qid not in known_queries:
            raise _err(path, lineno, f"unknown query {qid!r} (not in the topics/qrels)")
        ranked = run.setdefault(qid, {})
        if docid in ranked:
            raise _err(path, lineno, f"document {docid!r} appears twice for query {qid!r}")
        ranked[docid] = value
    if not run:
        raise _err(path, None, "empty run")
    return run


# --------------------------------------------------------------------------------------------- candidate lists


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


def _check_candidates(req: RankRequest, path, lineno) -> None:
    seen: set[str] = set()
    for c in req.candidates:
        if c.docid in seen:
            raise _err(path, lineno, f"document {c.docid!r} appears twice for query {req.qid!r}")
        seen.add(c.docid)


def _number(obj: Mapping, key: str, path, lineno, default: float | None = None) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(path, lineno, f"field '{key}' must be a number, got {value!r}")
    return float(value)


def read_candidates_json(path: str | os.PathLike) -> list[RankRequest]:
    """rank_llm_data's retrieve_results JSON: `[{"query", "hits": [{"content","qid","docid","rank","score"}]}]`.

    Errors name the list index as `entry N` and the hit as `hit M` (the file is one JSON document).
    """
    with open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise _err(path, e.lineno, f"invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise _err(path, None, "expected a JSON list of {query, hits}")
    requests: list[RankRequest] = []
    seen_q: set[str] = set()
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise _err(path, None, f"{where}: expected an object")
        query = _str_field(entry, "query", path, None)
        hits = entry.get("hits")
        if not isinstance(hits, list) or not hits:
            raise _err(path, None, f"{where}: field 'hits' must be a non-empty list")
        qids = set()
        cands = []
        for j, hit in enumerate(hits):
            hwhere = f"{path}: {where} hit {j}"
            if not isinstance(hit, dict):
                raise FormatError(f"{hwhere}: expected an object")
            for key in ("qid", "docid", "content"):
                if key not in hit:
                    raise FormatError(f"{hwhere}: missing field '{key}'")
            if isinstance(hit.get("score"), bool) or not isinstance(hit.get("score"), (int, float)):
                raise FormatError(f"{hwhere}: field 'score' must be a number")
            if not isinstance(hit["content"], str):
                raise FormatError(f"{hwhere}: field 'content' must be a string")
            qids.add(str(hit["qid"]))
            cands.append(RankCandidate(str(hit["docid"]), float(hit["score"]), hit["content"]))
        if len(qids) != 1:
            raise _err(path, None, f"{where}: hits name {len(qids)} different qids {sorted(qids)[:3]}")
        qid = qids.pop()
        if qid in seen_q:
            raise _err(path, None, f"{where}: query {qid!r} appears twice")
        seen_q.add(qid)
        req = RankRequest(qid, query, cands)
        _check_candidates(req, path, None)
        requests.append(req)
    return requests


def _rank_llm_text(doc: Any, path, lineno) -> str:
    """rank_llm's doc dict: text from 'text'|'segment'|'contents'|'body'|'passage', title prepended if any."""
    if isinstance(doc, str):
        return doc
    if not isinstance(doc, dict):
        raise _err(path, lineno, "candidate field 'doc' must be an object or a string")
    for key in ("text", "segment", "contents", "body", "passage"):
        if isinstance(doc.get(key), str):
            content = doc[key]
            break
    else:
        raise _err(path, lineno, "candidate 'doc' has none of text/segment/contents/body/passage")
    title = doc.get("title")
    return f"{title} {content}".strip() if isinstance(title, str) and title else content


def read_rank_llm_jsonl(path: str | os.PathLike) -> list[RankRequest]:
    """rank_llm requests/results JSONL: `{"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc"}]}`.

    Candidates keep their file order, which for rank_llm's rerank results is the reranked order.
    """
    requests: list[RankRequest] = []
    seen: set[str] = set()
    for lineno, obj in _json_lines(path):
        q = obj.get("query")
        if not isinstance(q, dict):
            raise _err(path, lineno, "field 'query' must be an object {text, qid}")
        qid = _str_field(q, "qid", path, lineno)
        text = _str_field(q, "text", path, lineno)
        cands_raw = obj.get("candidates")
        if not isinstance(cands_raw, list):
            raise _err(path, lineno, "field 'candidates' must be a list")
        cands = []
        for c in cands_raw:
            if not isinstance(c, dict):
                raise _err(path, lineno, "each candidate must be an object")
            docid = _str_field(c, "docid", path, lineno)
            score = _number(c, "score", path, lineno, default=0.0)
            cands.append(RankCandidate(docid, score, _rank_llm_text(c.get("doc", ""), path, lineno)))
        if qid in seen:
            raise _err(path, lineno, f"query {qid!r} appears twice")
        seen.add(qid)
        req = RankRequest(qid, text, cands)
        _check_candidates(req, path, lineno)
        requests.append(req)
    return requests


def requests_to_run(requests: list[RankRequest]) -> Run:
    """The first-stage run of candidate lists: file order kept, by rank-derived scores (n, n-1, ...)."""
    return {r.qid: {c.docid: float(len(r.candidates) - i) for i, c in enumerate(r.candidates)} for r in requests}
