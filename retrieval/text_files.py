"""Reading text files line by line with errors that name the file and line (gzip transparently).

Files are read as bytes and decoded one line at a time, so a bad byte is reported by its line number
instead of surfacing as an anonymous UnicodeDecodeError; a UTF-8 byte-order mark on line 1 is accepted.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

from twolar_jax.errors import FormatError, MissingFileError, PathLike


def open_binary(path: PathLike) -> IO[bytes]:
    """Open a file for reading bytes, gunzipping `*.gz`; a missing file is a MissingFileError."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def decode_line(raw: bytes, path: PathLike, lineno: int) -> str:
    """One line as text (newline stripped); invalid UTF-8 is a FormatError naming file, line and byte."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise FormatError(path, lineno, "line", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def iter_lines(path: PathLike, *, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, text without newline) of every line, blank ones skipped unless asked for."""
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_line(raw, path, lineno)
                if skip_blank and not line.strip():
                    continue
                yield lineno, line
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FormatError(path, None, None, f"cannot read: {e}") from None


def read_text(path: PathLike) -> str:
    """A whole file as text (for one-document JSON formats); invalid UTF-8 names the byte offset."""
    with open_binary(path) as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FormatError(path, line, "line", f"invalid UTF-8 (byte 0x{data[e.start]:02x})") from None


def open_text(path: PathLike) -> IO[str]:
    """A text stream over the file (strict UTF-8); prefer iter_lines where errors should name the line."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")


def json_object_line(path: PathLike, lineno: int, line: str) -> dict:
    """One JSONL line as a dict; bad JSON or a non-object is a FormatError naming file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise FormatError(path, lineno, "line", f"invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # e.g. a number of more than 4300 digits (Python's int-from-text limit)
        raise FormatError(path, lineno, "line", f"invalid JSON ({str(e).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise FormatError(path, lineno, "line", f"expected a JSON object, got {type(obj).__name__}")
    return obj
