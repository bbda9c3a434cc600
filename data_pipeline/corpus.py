"""Read a passage corpus (BEIR corpus.jsonl or MS MARCO collection.tsv) into memory, counting bad lines.

Why its own module: query sources, retrievers and the teacher all need the same docid -> text map,
and the rules for bad lines (documented in docs/distillation_set.md) must be the same everywhere:
a line that is not JSON is an error naming file and line; a line without text is skipped and counted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Passage:
    docid: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """What retrievers index and the teacher and student read: "title text" (pyserini BEIR flat)."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclasses.dataclass
class CorpusStats:
    lines: int = 0
    passages: int = 0
    skipped_no_text: int = 0
    skipped_no_id: int = 0
    duplicate_ids: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Corpus:
    """docid -> Passage, in file order."""

    def __init__(self, passages: dict[str, Passage], stats: CorpusStats | None = None, path: str = ""):
        self.passages = passages
        self.stats = stats or CorpusStats(passages=len(passages))
        self.path = path

    def __len__(self) -> int:
        return len(self.passages)

    def __contains__(self, docid: str) -> bool:
        return docid in self.passages

    def __getitem__(self, docid: str) -> Passage:
        return self.passages[docid]

    def get(self, docid: str) -> Passage | None:
        return self.passages.get(docid)

    def ids(self) -> list[str]:
        return list(self.passages)

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages.values())


def _parse_line(path: Path, lineno: int, line: str, tsv: bool) -> tuple[str | None, str, str]:
    if tsv:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
            return (parts[0].strip() or None), "", ""
        if len(parts) == 2:
            return parts[0].strip() or None, "", parts[1]
        return parts[0].strip() or None, parts[1], "\t".join(parts[2:])
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    docid = obj.get("_id", obj.get("docid", obj.get("id")))
    docid = str(docid) if docid is not None and str(docid).strip() else None
    title = obj.get("title") or ""
    text = obj.get("text", obj.get("contents"))
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
    if not isinstance(title, str):
        raise ValueError(f"{path}:{lineno}: field 'title' must be a string, got {type(title).__name__}")
    return docid, title, text or ""


def load_corpus(path: str | os.PathLike, *, max_passages: int | None = None) -> Corpus:
    """Load `corpus.jsonl` ({"_id", "title", "text"}; "docid"/"id" and "contents" also accepted) or a
    TSV (`docid \\t text` or `docid \\t title \\t text`).

    Lines without text (empty or whitespace) and without id are skipped and counted; a repeated id
    keeps the first passage and is counted. The first few skips are logged with file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found")
    tsv = path.suffix.lower() in (".tsv", ".txt")
    stats = CorpusStats()
    passages: dict[str, Passage] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.lines += 1
            docid, title, text = _parse_line(path, lineno, line, tsv)
            if docid is None:
                stats.skipped_no_id += 1
                if stats.skipped_no_id <= 5:
                    log.warning("%s:%d: no document id; line skipped", path, lineno)
                continue
            if not text.strip():
                stats.skipped_no_text += 1
                if stats.skipped_no_text <= 5:
                    log.warning("%s:%d: document %r has no text; skipped", path, lineno, docid)
                continue
            if docid in passages:
                stats.duplicate_ids += 1
                continue
            passages[docid] = Passage(docid, " ".join(title.split()), " ".join(text.split()))
            if max_passages is not None and len(passages) >= max_passages:
                break
    stats.passages = len(passages)
    if not passages:
        raise ValueError(f"{path}: no passage with text")
    return Corpus(passages, stats, str(path))
