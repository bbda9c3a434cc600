"""Passage corpora: one reader and one text rule for training and evaluation alike.

Formats: BEIR `corpus.jsonl` ({"_id", "title"?, "text"}; "docid"/"id" and "contents" are accepted too),
optionally gzipped, or a TSV (`docid<TAB>text`, MS MARCO's collection.tsv, or `docid<TAB>title<TAB>text`).
Text rule: whitespace runs become one space in title and text, and what every consumer reads (the BM25
index, the dense encoders, the teacher, the student in training and the reranker in evaluation) is
`Document.contents`, "title text", as pyserini's BEIR "flat" collections index it.
Bad lines: malformed JSON, a missing id, a non-string field or a repeated id is a FormatError naming
file, line and field; a document with neither title nor text is skipped, counted and logged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional

from retrieval.text_files import iter_lines, json_object_line
from twolar_jax.errors import FormatError, MissingFileError, PathLike

log = logging.getLogger(__name__)
_LOGGED_SKIPS = 5


def normalize_text(text: str) -> str:
    """Whitespace runs (newlines, tabs) to one space, no leading or trailing space."""
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class Document:
    docid: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """What retrievers index and rerankers read: "title text" (pyserini's BEIR flat contents)."""
        return f"{self.title} {self.text}" if self.title and self.text else (self.title or self.text)


@dataclasses.dataclass
class CorpusStats:
    lines: int = 0
    documents: int = 0
    skipped_empty: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Corpus(Mapping[str, Document]):
    """docid -> Document, in file order."""

    def __init__(self, documents: dict[str, Document], stats: Optional[CorpusStats] = None, path: str = ""):
        self._docs = documents
        self.stats = stats or CorpusStats(documents=len(documents))
        self.path = path
        self._fingerprint: Optional[str] = None

    def __getitem__(self, docid: str) -> Document:
        return self._docs[docid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    def documents(self) -> Iterator[Document]:
        return iter(self._docs.values())

    def contents(self, docid: str) -> Optional[str]:
        """The reranker/teacher input of a document, or None when the id is unknown."""
        doc = self._docs.get(docid)
        return None if doc is None else doc.contents

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over ids and contents: an index built for another corpus is never reused."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for doc in self._docs.values():
                h.update(doc.docid.encode("utf-8") + b"\t" + doc.contents.encode("utf-8") + b"\n")
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def _string_field(obj: Mapping, keys: tuple[str, ...], path: Path, lineno: int, *, required: bool) -> str:
    for key in keys:
        if key in obj and obj[key] is not None:
            value = obj[key]
            if isinstance(value, int) and not isinstance(value, bool) and key in ("_id", "docid", "id"):
                return str(value)  # numeric ids are common in the wild; ids are strings here
            if not isinstance(value, str):
                raise FormatError(path, lineno, key, f"expected a string, got {type(value).__name__}")
            return value
    if required:
        raise FormatError(path, lineno, keys[0], "missing field")
    return ""


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> tuple[str, str, str]:
    obj = json_object_line(path, lineno, line)
    docid = _string_field(obj, ("_id", "docid", "id"), path, lineno, required=True)
    title = _string_field(obj, ("title",), path, lineno, required=False)
    text = _string_field(obj, ("text", "contents"), path, lineno, required=False)
    return docid, title, text


def _parse_tsv_line(path: Path, lineno: int, line: str) -> tuple[str, str, str]:
    parts = line.rstrip("\n").rstrip("\r").split("\t")
    if len(parts) < 2:
        raise FormatError(path, lineno, "line", "expected 'docid<TAB>text' or 'docid<TAB>title<TAB>text'")
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], parts[1], "\t".join(parts[2:])


def read_corpus(path: PathLike, *, max_documents: Optional[int] = None) -> Corpus:
    """Read a corpus file (see the module docstring); `max_documents` keeps the first N (smoke runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: corpus file not found")
    tsv = path.name.endswith((".tsv", ".tsv.gz", ".txt"))
    parse = _parse_tsv_line if tsv else _parse_jsonl_line
    stats, docs, first_line = CorpusStats(), {}, {}
    for lineno, line in iter_lines(path):
        stats.lines += 1
        docid, title, text = parse(path, lineno, line)
        docid = docid.strip()
        if not docid:
            raise FormatError(path, lineno, "_id", "empty document id")
        if docid in docs:
            raise FormatError(path, lineno, "_id", f"duplicate document id {docid!r} (first on line {first_line[docid]})")
        doc = Document(docid, normalize_text(title), normalize_text(text))
        if not doc.contents:
            stats.skipped_empty += 1
            if stats.skipped_empty <= _LOGGED_SKIPS:
                log.warning("%s:%d: document %r has neither title nor text; skipped", path, lineno, docid)
            continue
        docs[docid], first_line[docid] = doc, lineno
        if max_documents is not None and len(docs) >= max_documents:
            break
    stats.documents = len(docs)
    if not docs:
        raise FormatError(path, None, None, "no document with text")
    return Corpus(docs, stats, str(path))
