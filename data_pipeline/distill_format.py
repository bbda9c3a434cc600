"""The distillation-set JSONL (one query and its teacher-ordered candidates per line) and readers for
TWOLAR's released format and rank_llm's result JSONL.

Shared by both halves of data_pipeline: the set builder writes it, the SeqIO input pipeline reads it.
Pure Python on purpose (no TensorFlow): the build tools and the tests read and write this format
without paying for a TF import. Every bad line is reported as
`FormatError("<file>:<line>: <field>: <what>")`; with `skip_invalid=True` it is counted and logged
instead, never silently turned into a wrong batch.

Distillation line (see docs/data_format.md):
    {"qid": str, "query": str, "query_type": str,
     "candidates": [{"docid": str, "text": str, "source": str}, ...],   # teacher order, best first
     "teacher_scores": [float, ...]}                                    # optional, aligned with candidates
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, MutableMapping, Optional, Union

from twolar_jax.durable_io import atomic_writer
from twolar_jax.errors import FormatError, MissingFileError, PathLike

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate passage of a query."""

    docid: str
    text: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class DistillRecord:
    """One query with its candidates in teacher order (best first) and optional teacher scores."""

    qid: str
    query: str
    query_type: str
    candidates: tuple[Candidate, ...]
    teacher_scores: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        # Normalise lists to tuples so that records hash and compare by value.
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if self.teacher_scores is not None:
            object.__setattr__(self, "teacher_scores", tuple(float(s) for s in self.teacher_scores))


_LOGGED_SKIPS = 10  # invalid lines logged one by one; the rest only counted (and summed up at the end)


def new_stats() -> dict[str, Any]:
    """The counters `read_*` fill in: lines seen, records yielded, blank lines, skipped lines by field."""
    return {"lines": 0, "records": 0, "blank": 0, "skipped": 0, "skipped_by_field": {}}


# ----------------------------------------------------------------------------------------------------
# Validation of one decoded JSON object.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(obj: Mapping[str, Any], key: str, field: str, err: Callable[[str, str], FormatError],
                 *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise err(field, "missing field")
    value = obj[key]
    if not isinstance(value, str):
        raise err(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise err(field, "empty string")
    return value


def _finite_float(value: int | float) -> bool:
    """True when the number is a finite float64 (a JSON integer may be too large for one)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _validate_record(obj: Any, err: Callable[[str, str], FormatError]) -> DistillRecord:
    if not isinstance(obj, dict):
        raise err("line", f"expected a JSON object, got {_type_name(obj)}")
    qid = _require_str(obj, "qid", "qid", err)
    query = _require_str(obj, "query", "query", err)
    query_type = _require_str(obj, "query_type", "query_type", err)

    if "candidates" not in obj:
        raise err("candidates", "missing field")
    raw = obj["candidates"]
    if not isinstance(raw, list):
        raise err("candidates", f"expected a list, got {_type_name(raw)}")
    if not raw:
        raise err("candidates", "empty candidate list")
    candidates = []
    first_seen: dict[str, int] = {}
    for i, cand in enumerate(raw):
        where = f"candidates[{i}]"
        if not isinstance(cand, dict):
            raise err(where, f"expected a JSON object, got {_type_name(cand)}")
        docid = _require_str(cand, "docid", f"{where}.docid", err)
        text = _require_str(cand, "text", f"{where}.text", err)
        source = _require_str(cand, "source", f"{where}.source", err, allow_empty=True)
        if docid in first_seen:
            raise err(f"{where}.docid", f"duplicate docid {docid!r} (first at candidates[{first_seen[docid]}])")
        first_seen[docid] = i
        candidates.append(Candidate(docid=docid, text=text, source=source))

    scores = obj.get("teacher_scores")
    if scores is not None:
        if not isinstance(scores, list):
            raise err("teacher_scores", f"expected a list of numbers or null, got {_type_name(scores)}")
        if len(scores) != len(candidates):
            raise err("teacher_scores", f"length {len(scores)} != {len(candidates)} candidates")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise err(f"teacher_scores[{i}]", f"expected a number, got {_type_name(s)}")
            if not _finite_float(s):
                raise err(f"teacher_scores[{i}]", f"not finite ({s})" if isinstance(s, float) else
                          f"not finite as a float64 ({str(s)[:20]}...)")
        scores = tuple(float(s) for s in scores)
    return DistillRecord(qid=qid, query=query, query_type=query_type, candidates=tuple(candidates),
                         teacher_scores=scores)


def _decode_line(raw: Union[str, bytes], err: Callable[[str, str], FormatError]) -> str:
    if isinstance(raw, str):
        return raw.rstrip("\r\n")
    try:
        return raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise err("line", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start})") from None


def _loads(text: str, err: Callable[[str, str], FormatError]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise err("line", f"malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # e.g. a number of more than 4300 digits (Python's int-from-text limit)
        raise err("line", f"malformed JSON ({str(e).split(';')[0]})") from None


def _error_factory(path: PathLike, lineno: int) -> Callable[[str, str], FormatError]:
    return lambda field, what: FormatError(path, lineno, field, what)


def parse_distill_line(line: Union[str, bytes], *, path: PathLike = "<string>", lineno: int = 1) -> DistillRecord:
    """Parse and validate one distillation line; raises FormatError naming path, line and field."""
    err = _error_factory(path, lineno)
    return _validate_record(_loads(_decode_line(line, err), err), err)


# ----------------------------------------------------------------------------------------------------
# Reading files line by line (bytes, so a bad UTF-8 line is named by its number).


def _open_input(path: PathLike):
    """Open a distillation file for bytes; a missing path or a directory is an error naming it."""
    if os.path.isdir(path):
        raise FormatError(path, None, None, "is a directory, expected a JSONL file")
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such distillation file")
    return open(path, "rb")


def _iter_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    with _open_input(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not an error
            yield lineno, raw


def _count_skip(stats: MutableMapping[str, Any], error: FormatError) -> None:
    """Count a skipped line under its top-level field ("candidates[2].text" -> "candidates") and log it."""
    stats["skipped"] += 1
    key = error.field.split("[")[0].split(".")[0]
    stats["skipped_by_field"][key] = stats["skipped_by_field"].get(key, 0) + 1
    if stats["skipped"] <= _LOGGED_SKIPS:
        logger.warning("skipping invalid line: %s", error)
    elif stats["skipped"] == _LOGGED_SKIPS + 1:
        logger.warning("skipping more invalid lines of %s; the count follows at the end", error.path)


def _log_skip_summary(path: PathLike, stats: Mapping[str, Any], level: int = logging.INFO) -> None:
    """One line with how many lines were skipped as invalid, by field (with skip_invalid)."""
    if stats.get("skipped"):
        logger.log(level, "%s: skipped %d invalid of %d lines (by field: %s); %d records kept", path,
                   stats["skipped"], stats["lines"], stats["skipped_by_field"], stats["records"])


def _read_validated(path: PathLike, convert: Callable[[Any, Callable[[str, str], FormatError], int], Any], *,
                    skip_invalid: bool, stats: Optional[MutableMapping[str, Any]]) -> Iterator[Any]:
    """Shared loop: decode, parse, convert; raise or count-and-log each bad line."""
    if stats is None:
        stats = new_stats()
    for key, value in new_stats().items():
        stats.setdefault(key, value)
    for lineno, raw in _iter_lines(path):
        stats["lines"] += 1
        if not raw.strip():
            stats["blank"] += 1
            continue
        err = _error_factory(path, lineno)
        try:
            item = convert(_loads(_decode_line(raw, err), err), err, lineno)
        except FormatError as e:
            if not skip_invalid:
                raise
            _count_skip(stats, e)
            continue
        stats["records"] += 1
        yield item
    _log_skip_summary(path, stats)


def read_distill_jsonl(path: PathLike, *, skip_invalid: bool = False,
                       stats: Optional[MutableMapping[str, Any]] = None) -> Iterator[DistillRecord]:
    """Yield the records of a distillation JSONL file, validated line by line.

    Blank lines are ignored (counted in stats["blank"]). With skip_invalid, bad lines are logged and
    counted in stats["skipped"] (and stats["skipped_by_field"]) instead of raising.
    """
    return _read_validated(path, lambda obj, err, _: _validate_record(obj, err),
                           skip_invalid=skip_invalid, stats=stats)


def record_to_dict(record: DistillRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "qid": record.qid,
        "query": record.query,
        "query_type": record.query_type,
        "candidates": [{"docid": c.docid, "text": c.text, "source": c.source} for c in record.candidates],
    }
    if record.teacher_scores is not None:
        out["teacher_scores"] = list(record.teacher_scores)
    return out


def record_to_json(record: DistillRecord) -> str:
    """One JSONL line (no newline), UTF-8 text kept as is."""
    return json.dumps(record_to_dict(record), ensure_ascii=False)


def write_distill_jsonl(path: PathLike, records: Iterable[DistillRecord]) -> int:
    """Write records atomically; returns the number written."""
    n = 0
    with atomic_writer(path) as fh:
        for record in records:
            fh.write(record_to_json(record) + "\n")
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# TWOLAR's released / RankGPT-style training format.
#
# Dundalia/TWOLAR train.py reads `json.loads(line)` per line and utils.RerankData uses:
#   item["query"]                      the query text
#   item["retrieved_passages"]         list of {"docid", "text", ...} already in the LLM's order
#   item["positive_passages"]          only when label=True (the paper's runs use label=False)
# It keeps the first 30 texts (`str(psg["text"])`) and pads with "<padding_passage>". The format has
# no qid field in that code; RankGPT/Tevatron files carry "query_id", which we use when present.


def _twolar_to_record(obj: Any, err: Callable[[str, str], FormatError], lineno: int, *, query_type: str,
                      source: str, with_title: bool) -> DistillRecord:
    if not isinstance(obj, dict):
        raise err("line", f"expected a JSON object, got {_type_name(obj)}")
    qid = obj.get("qid", obj.get("query_id"))
    if qid is None:
        qid = f"line{lineno}"
    elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise err("query_id", f"expected a string or integer, got {_type_name(qid)}")
    if "retrieved_passages" not in obj:
        raise err("retrieved_passages", "missing field")
    passages = obj["retrieved_passages"]
    if not isinstance(passages, list):
        raise err("retrieved_passages", f"expected a list, got {_type_name(passages)}")
    candidates = []
    for i, psg in enumerate(passages):
        where = f"retrieved_passages[{i}]"
        if not isinstance(psg, dict):
            raise err(where, f"expected a JSON object, got {_type_name(psg)}")
        if "docid" not in psg:
            raise err(f"{where}.docid", "missing field")
        docid = psg["docid"]
        if isinstance(docid, bool) or not isinstance(docid, (str, int)):
            raise err(f"{where}.docid", f"expected a string or integer, got {_type_name(docid)}")
        if "text" not in psg or psg["text"] is None:
            raise err(f"{where}.text", "missing field")
        text = str(psg["text"])  # the reference coerces with str()
        title = psg.get("title")
        if with_title and isinstance(title, str) and title.strip():
            text = f"{title.strip()} {text}"
        candidates.append({"docid": str(docid), "text": text, "source": source})
    as_distill = {"qid": str(qid), "query_type": obj.get("query_type", query_type), "candidates": candidates}
    if "query" in obj:
        as_distill["query"] = obj["query"]
    try:
        return _validate_record(as_distill, err)
    except FormatError as e:  # name the field as it is spelled in the TWOLAR file
        raise err(e.field.replace("candidates", "retrieved_passages"),
                  e.what.replace("candidates[", "retrieved_passages[")) from None


def read_twolar_jsonl(path: PathLike, *, query_type: str = "unknown", source: str = "twolar",
                      with_title: bool = False, skip_invalid: bool = False,
                      stats: Optional[MutableMapping[str, Any]] = None) -> Iterator[DistillRecord]:
    """Read TWOLAR's training JSONL (query + `retrieved_passages` in LLM order) as DistillRecords.

    qid: "qid" or "query_id" when present, else "line<N>". Titles are dropped as in the reference
    (`with_title=True` prepends them). `query_type` fills records that have no "query_type" field.
    """
    def convert(obj, err, lineno):
        return _twolar_to_record(obj, err, lineno, query_type=query_type, source=source, with_title=with_title)

    return _read_validated(path, convert, skip_invalid=skip_invalid, stats=stats)


# ----------------------------------------------------------------------------------------------------
# rank_llm request/result JSONL: {"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc": {...}}]}
# Parsing is retrieval.readers.read_rank_llm_jsonl's job; we only convert its output.


def records_from_rank_requests(requests: Iterable[Any], *, query_type: str, source: str = "rank_llm",
                               path: PathLike = "<rank_llm>") -> Iterator[DistillRecord]:
    """Turn rank_llm results (RankRequest(qid, query, candidates=[RankCandidate(docid, score, text)]))
    into DistillRecords. The list order is the teacher order (a rank_llm *result* file is written in the
    reranked order); the candidates' `score` is the first-stage score, so it is not kept as a teacher
    score. Requests are numbered from 1 in error messages (the reader has already named bad lines).
    """
    for n, req in enumerate(requests, start=1):
        err = _error_factory(path, n)
        obj = {
            "qid": str(req.qid),
            "query": req.query,
            "query_type": query_type,
            "candidates": [{"docid": str(c.docid), "text": c.text, "source": source} for c in req.candidates],
        }
        yield _validate_record(obj, err)


def read_rank_llm_distill(path: PathLike, *, query_type: str, source: str = "rank_llm") -> list[DistillRecord]:
    """Read a rank_llm result JSONL (via retrieval.readers) as DistillRecords in the file's order."""
    from retrieval.readers import read_rank_llm_jsonl

    return list(records_from_rank_requests(read_rank_llm_jsonl(path), query_type=query_type, source=source,
                                           path=path))


# ----------------------------------------------------------------------------------------------------
# Random access for the training source: validate the whole file once, keep byte offsets.


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    offset: int
    lineno: int
    query_type: str


class DistillIndex:
    """The valid lines of a distillation file as (byte offset, line number, query type).

    Why: the training source shuffles whole queries (not a small buffer of tokenized groups) and must
    fail before training starts, not hours in. So the file is validated once, in full, here (a bad line
    raises FormatError, or is counted and logged with skip_invalid); records are re-read by offset.
    Queries with a single candidate (no pair to learn from, unless padding='twolar' adds padding
    passages) are counted in `single_candidate` and logged here, at the training data's boundary.
    """

    def __init__(self, path: PathLike, *, skip_invalid: bool = False):
        self.path = str(path)
        self.stats = new_stats()
        self.single_candidate = 0  # queries with one candidate: counted and logged at this boundary
        entries: list[IndexEntry] = []
        offset = 0
        with _open_input(self.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw, start = raw[3:], start + 3
                self.stats["lines"] += 1
                if not raw.strip():
                    self.stats["blank"] += 1
                    continue
                try:
                    record = parse_distill_line(raw, path=self.path, lineno=lineno)
                except FormatError as e:
                    if not skip_invalid:
                        raise
                    _count_skip(self.stats, e)
                    continue
                self.stats["records"] += 1
                if len(record.candidates) < 2:
                    self.single_candidate += 1
                entries.append(IndexEntry(start, lineno, record.query_type))
        _log_skip_summary(self.path, self.stats, logging.WARNING)
        if self.single_candidate:
            logger.warning("%s: %d of %d queries have a single candidate: nothing to compare, so they teach nothing "
                           "unless padding='twolar' adds padding passages to rank below them", self.path,
                           self.single_candidate, self.stats["records"])
        self.entries: tuple[IndexEntry, ...] = tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def query_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.query_type] = out.get(e.query_type, 0) + 1
        return out

    def select(self, query_type: Optional[str] = None) -> list[IndexEntry]:
        """Entries in file order, optionally of one query type."""
        return [e for e in self.entries if query_type is None or e.query_type == query_type]

    def read(self, offset: int, lineno: int) -> DistillRecord:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return parse_distill_line(fh.readline(), path=self.path, lineno=lineno)
