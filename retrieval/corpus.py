"""Passage corpora: one reader and one text rule for training and evaluation alike.

Formats: BEIR `corpus.jsonl` ({"_id", "title"?, "text"}; "docid"/"id" and "contents" are accepted too),
optionally gzipped, or a TSV (`docid<TAB>text`, MS MARCO's collection.tsv, or `docid<TAB>title<TAB>text`).
Text rule: whitespace runs become one space in title and text, and what every consumer reads (the BM25
index, the dense encoders, the teacher, the student in training and the reranker in evaluation) is
`Document.contents`, "title text", as pyserini's BEIR "flat" collections index it.
Bad lines: malformed JSON, a missing id, a non-string field or a repeated id is a FormatError naming
file, line and field; a document with neither title nor text is skipped, counted and logged. Repeated ids
are found after the last line is parsed (the first repeat in file order is named), so a file with both a
repeat and a later malformed line reports the malformed line.
Memory: a Corpus holds no object per passage. Ids, titles and texts are each one UTF-8 buffer with int64
end offsets, and ids are found through a sorted array of their hashes; a passage is decoded on access.
That is about 1.1 bytes per byte of UTF-8 text (docs/benchmarks.md#scale), where a dict of dataclasses
took 1.8 for ASCII and more for other scripts (Python str widens to 2 or 4 bytes a character).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from array import array
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

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


class _Strings:
    """Many strings as one UTF-8 buffer plus int64 end offsets: no Python object per string, ~1 byte per
    ASCII character and UTF-8's width otherwise."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ends = array("q")

    def append(self, s: str) -> None:
        self.buf += s.encode("utf-8")
        self.ends.append(len(self.buf))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        return self.buf[self.ends[i - 1] if i else 0:self.ends[i]].decode("utf-8")

    def nbytes(self) -> int:
        """Bytes held: the buffers' allocations (bytearray and array over-allocate up to ~1/8)."""
        return self.buf.__sizeof__() + self.ends.buffer_info()[1] * self.ends.itemsize


class _HashIndex:
    """docid -> position, without a dict (~100 bytes an entry): positions sorted by the ids' hashes, found
    by binary search and confirmed against the stored id. 12 bytes a document below 2**31 documents.
    Python's str hash is salted per process, so a pickled Corpus rebuilds its index (Corpus.__setstate__)."""

    def __init__(self, hashes: np.ndarray) -> None:
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.order = order.astype(np.int32) if len(order) < 2**31 else order

    @classmethod
    def of(cls, ids: _Strings) -> "_HashIndex":
        return cls(np.fromiter((hash(ids[i]) for i in range(len(ids))), np.int64, count=len(ids)))

    def find(self, ids: _Strings, docid: str) -> Optional[int]:
        h = hash(docid)
        lo = int(np.searchsorted(self.hashes, h))
        while lo < len(self.hashes) and self.hashes[lo] == h:
            i = int(self.order[lo])
            if ids[i] == docid:
                return i
            lo += 1
        return None

    def repeats(self, ids: _Strings) -> Iterator[list[int]]:
        """Positions (ascending) of each id stored more than once."""
        same = np.flatnonzero(self.hashes[1:] == self.hashes[:-1])
        seen_runs: set[int] = set()
        for k in same.tolist():
            lo = k
            while lo > 0 and self.hashes[lo - 1] == self.hashes[k]:
                lo -= 1
            if lo in seen_runs:
                continue
            seen_runs.add(lo)
            hi = int(np.searchsorted(self.hashes, self.hashes[k], side="right"))
            groups: dict[str, list[int]] = {}
            for i in sorted(int(x) for x in self.order[lo:hi]):
                groups.setdefault(ids[i], []).append(i)
            yield from (g for g in groups.values() if len(g) > 1)

    def nbytes(self) -> int:
        return self.hashes.nbytes + self.order.nbytes


class _Columns:
    """Ids, titles and texts in three _Strings, appended in file order."""

    def __init__(self) -> None:
        self.ids, self.titles, self.texts = _Strings(), _Strings(), _Strings()
        self.hashes = array("q")

    def append(self, docid: str, title: str, text: str) -> None:
        self.ids.append(docid)
        self.titles.append(title)
        self.texts.append(text)
        self.hashes.append(hash(docid))


class Corpus(Mapping[str, Document]):
    """docid -> Document, in file order; passages are decoded on access (see the module docstring).
    `Corpus({docid: Document})` still builds one from a dict (tests, small corpora)."""

    def __init__(self, documents: Optional[Mapping[str, Document]] = None, stats: Optional[CorpusStats] = None,
                 path: str = ""):
        cols = _Columns()
        for docid, doc in (documents or {}).items():
            cols.append(docid, doc.title, doc.text)
        self._adopt(cols, stats or CorpusStats(documents=len(cols.ids)), path)

    @classmethod
    def _of_columns(cls, cols: _Columns, stats: CorpusStats, path: str) -> "Corpus":
        corpus = cls.__new__(cls)
        corpus._adopt(cols, stats, path)
        return corpus

    def _adopt(self, cols: _Columns, stats: CorpusStats, path: str) -> None:
        self._ids, self._titles, self._texts = cols.ids, cols.titles, cols.texts
        self._index = _HashIndex(np.frombuffer(cols.hashes, np.int64))
        self.stats, self.path = stats, path
        self._fingerprint: Optional[str] = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = _HashIndex.of(self._ids)

    def _position(self, docid: object) -> Optional[int]:
        return self._index.find(self._ids, docid) if isinstance(docid, str) else None

    def _document(self, i: int) -> Document:
        return Document(self._ids[i], self._titles[i], self._texts[i])

    def __getitem__(self, docid: str) -> Document:
        i = self._position(docid)
        if i is None:
            raise KeyError(docid)
        return self._document(i)

    def __contains__(self, docid: object) -> bool:
        return self._position(docid) is not None

    def __iter__(self) -> Iterator[str]:
        return (self._ids[i] for i in range(len(self._ids)))

    def __len__(self) -> int:
        return len(self._ids)

    def documents(self) -> Iterator[Document]:
        return (self._document(i) for i in range(len(self._ids)))

    def contents(self, docid: str) -> Optional[str]:
        """The reranker/teacher input of a document, or None when the id is unknown."""
        i = self._position(docid)
        return None if i is None else self._document(i).contents

    def text_bytes(self) -> int:
        """UTF-8 bytes of every id, title and text: the yardstick of `nbytes`."""
        return len(self._ids.buf) + len(self._titles.buf) + len(self._texts.buf)

    def nbytes(self) -> int:
        """Bytes this corpus holds (buffers, offsets, id index), for the memory budget (<= 2x text_bytes)."""
        return self._ids.nbytes() + self._titles.nbytes() + self._texts.nbytes() + self._index.nbytes()

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over ids and contents: an index built for another corpus is never reused."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for doc in self.documents():
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


def _first_repeat(corpus: Corpus, lines: array, skipped: list[tuple[str, int]]) -> Optional[tuple[int, str, int]]:
    """(line, docid, first line) of the first repeated id in file order, as a dict-based reader would stop
    at: a kept id repeated by a later kept or empty document."""
    found: list[tuple[int, str, int]] = []
    for group in corpus._index.repeats(corpus._ids):
        found.append((lines[group[1]], corpus._ids[group[0]], lines[group[0]]))
    for docid, lineno in skipped:
        i = corpus._position(docid)
        if i is not None and lines[i] < lineno:
            found.append((lineno, docid, lines[i]))
    return min(found) if found else None


def _read_columns(path: Path, max_documents: Optional[int]) -> tuple[_Columns, CorpusStats, array, list]:
    """Parse every line into columns; (columns, stats, line of each kept document, skipped (docid, line))."""
    tsv = path.name.endswith((".tsv", ".tsv.gz", ".txt"))
    parse = _parse_tsv_line if tsv else _parse_jsonl_line
    stats, cols, lines, skipped = CorpusStats(), _Columns(), array("q"), []
    for lineno, line in iter_lines(path):
        stats.lines += 1
        docid, title, text = parse(path, lineno, line)
        docid = docid.strip()
        if not docid:
            raise FormatError(path, lineno, "_id", "empty document id")
        title, text = normalize_text(title), normalize_text(text)
        if not (title or text):
            stats.skipped_empty += 1
            skipped.append((docid, lineno))
            if stats.skipped_empty <= _LOGGED_SKIPS:
                log.warning("%s:%d: document %r has neither title nor text; skipped", path, lineno, docid)
            continue
        cols.append(docid, title, text)
        lines.append(lineno)
        if max_documents is not None and len(lines) >= max_documents:
            break
    return cols, stats, lines, skipped


def read_corpus(path: PathLike, *, max_documents: Optional[int] = None) -> Corpus:
    """Read a corpus file (see the module docstring); `max_documents` keeps the first N (smoke runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: corpus file not found")
    cols, stats, lines, skipped = _read_columns(path, max_documents)
    stats.documents = len(lines)
    if not lines:
        raise FormatError(path, None, None, "no document with text")
    corpus = Corpus._of_columns(cols, stats, str(path))
    del cols
    repeat = _first_repeat(corpus, lines, skipped)
    if repeat is not None:
        lineno, docid, first = repeat
        raise FormatError(path, lineno, "_id", f"duplicate document id {docid!r} (first on line {first})")
    return corpus
