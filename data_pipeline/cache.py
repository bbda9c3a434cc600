"""Durable files for long builds: append-only JSONL that survives kill -9, and the LLM call cache.

Why: a distillation build runs for days against a paid API. Every finished unit of work is one JSONL
line, flushed and fsynced before the next one starts; a crash can leave at most one partial last
line, which `repair_tail` cuts off on the next start. The call cache is such a file, keyed by
sha256(model + request), so a re-run answers every window it has seen without a call.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping


def _last_newline(f: Any, size: int, before: int) -> int:
    """Offset just past the last b"\\n" that lies before `before` (0 when there is none)."""
    pos = before
    chunk = 1 << 16
    while pos > 0:
        lo = max(0, pos - chunk)
        f.seek(lo)
        block = f.read(pos - lo)
        i = block.rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def repair_tail(path: str | os.PathLike) -> int:
    """Cut a trailing partial line (no final newline, or not JSON) left by a crash; returns bytes cut.

    Reads only the end of the file, so it is cheap on a multi-GB output.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            keep = _last_newline(f, size, size)
        else:
            # The last complete line must parse: a line of garbage at the end would poison a resume.
            start = _last_newline(f, size, size - 1)
            f.seek(start)
            try:
                json.loads(f.read(size - start).decode("utf-8"))
                keep = size
            except (UnicodeDecodeError, json.JSONDecodeError):
                keep = start
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line; a bad line is an error naming file:line."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


class AppendOnlyJsonl:
    """One JSON object per line; each `append` is written and flushed before it returns.

    Flushed data survives kill -9 (it is in the OS page cache). fsync, which also survives a power
    cut, costs ~5 ms here: with `fsync_interval_s=0` every append is fsynced before it returns;
    with an interval > 0 a background thread fsyncs at most that often while there are new lines
    (group commit), and `close()` fsyncs whatever is left.
    """

    def __init__(self, path: str | os.PathLike, *, fsync_interval_s: float = 0.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cut_bytes = repair_tail(self.path)
        self._interval = float(fsync_interval_s)
        self._lock = threading.Lock()
        self._f = self.path.open("a", encoding="utf-8")
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self._interval > 0:
            self._thread = threading.Thread(target=self._syncer, name=f"fsync:{self.path.name}", daemon=True)
            self._thread.start()

    def _syncer(self) -> None:
        while not self._closed.is_set():
            self._closed.wait(self._interval)
            if self._dirty.is_set():
                self._dirty.clear()
                with self._lock:
                    if self._f.closed:
                        return
                    fd = self._f.fileno()
                os.fsync(fd)

    def append(self, obj: Mapping[str, Any] | str) -> None:
        line = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        if "\n" in line:
            raise ValueError("a JSONL record must not contain a newline")
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            if self._interval <= 0:
                os.fsync(self._f.fileno())
            else:
                self._dirty.set()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()

    def __enter__(self) -> "AppendOnlyJsonl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temporary sibling, fsync it, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def request_key(model: str, request: Mapping[str, Any]) -> str:
    """sha256 over the model name and the canonical JSON of the request (messages + sampling params).

    The API key and base URL are deliberately not part of it: the same prompt to the same model is the
    same answer whichever endpoint served it, and the key must never reach a file.
    """
    canonical = json.dumps({"model": model, "request": request}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CallCache:
    """On-disk cache of chat completions: {key, model, text, prompt_tokens, completion_tokens} per line.

    Loaded whole into memory at start (40K windows is a few tens of MB); new entries are appended and
    flushed at once (kill -9 safe) and fsynced in groups (a power cut may cost the last second of
    answers, i.e. a few repeated calls, never a wrong label). Two runs sharing one cache file must not run at the same time.
    """

    def __init__(self, path: str | os.PathLike | None, *, fsync_interval_s: float = 1.0):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self._file: AppendOnlyJsonl | None = None
        if self.path is not None:
            self._file = AppendOnlyJsonl(self.path, fsync_interval_s=fsync_interval_s)
            for _, obj in read_jsonl(self.path):
                if isinstance(obj.get("key"), str) and isinstance(obj.get("text"), str):
                    self._entries[obj["key"]] = obj

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def keys(self) -> set[str]:
        return set(self._entries)

    def put(self, key: str, *, model: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        entry = {"key": key, "model": model, "text": text, "prompt_tokens": int(prompt_tokens),
                 "completion_tokens": int(completion_tokens)}
        self._entries[key] = entry
        if self._file is not None:
            self._file.append(entry)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
