"""Files that survive a crash: atomic whole-file writes and append-only JSONL logs.

Why one module: checkpoint metadata, run files, manifests, metrics logs, build outputs and score logs
must all obey the same two rules. A whole file is written to a temporary sibling, fsynced, then
renamed over the target, so a reader never sees half of it. A log grows one JSON line at a time, each
flushed before the next starts; a crash can leave at most one partial last line, which `repair_tail`
cuts off on the next start.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Optional

from twolar_jax.errors import FormatError, PathLike


@contextlib.contextmanager
def errors_name(path: PathLike) -> Iterator[None]:
    """An OSError without a file name (write() or fsync() on a full disk) re-raised naming `path`, so the
    one-line error a user reads says which output failed, not just "No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


# ---------------------------------------------------------------------------------------- whole files
@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "w", *, encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with errors_name(path), os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = True) -> Path:
    """JSON (UTF-8 kept as is) with a trailing newline, written atomically."""
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=sort_keys, default=str)
        f.write("\n")
    return Path(path)


# ---------------------------------------------------------------------------------------- JSONL logs
def _last_newline(f: Any, before: int) -> int:
    """Offset just past the last b"\\n" that lies before `before` (0 when there is none)."""
    pos, chunk = before, 1 << 16
    while pos > 0:
        lo = max(0, pos - chunk)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def repair_tail(path: PathLike) -> int:
    """Cut a trailing partial line (no final newline, or not JSON) left by a crash; returns bytes cut.

    Reads only the end of the file, so it is cheap on a multi-GB log.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    size = path.stat().st_size
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            keep = _last_newline(f, size)
        else:  # the last complete line must parse: a line of garbage would poison a resume
            start = _last_newline(f, size - 1)
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


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is a FormatError naming file and line."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise FormatError(path, lineno, "line", f"invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise FormatError(path, lineno, "line", f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FormatError(path, lineno, "line", f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def truncate_jsonl(path: PathLike, keep: Callable[[dict], bool]) -> int:
    """Rewrite a log atomically with only the lines `keep` accepts (after cutting a torn tail); returns lines dropped.

    Used on resume: metrics logged past the restored checkpoint are dropped so that they are not duplicated.
    """
    path = Path(path)
    if not path.exists():
        return 0
    repair_tail(path)
    kept, dropped = [], 0
    for _, obj in read_jsonl(path):
        if keep(obj):
            kept.append(obj)
        else:
            dropped += 1
    if dropped:
        with atomic_writer(path) as f:
            for obj in kept:
                f.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
    return dropped


class AppendOnlyJsonl:
    """One JSON object per line; each `append` is written and flushed before it returns.

    Flushed data survives kill -9 (it is in the OS page cache). fsync, which also survives a power cut,
    costs ~5 ms: with `fsync_interval_s=0` every append is fsynced before it returns; with an interval
    > 0 a background thread fsyncs at most that often while there are new lines (group commit), and
    `close()` fsyncs whatever is left. Each line goes to the OS in one write() call, so a crash never
    leaves a line that is half in the file and half in a Python buffer.
    """

    def __init__(self, path: PathLike, *, fsync_interval_s: float = 0.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cut_bytes = repair_tail(self.path)
        self._interval = float(fsync_interval_s)
        self._lock = threading.Lock()
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self._interval > 0:
            self._thread = threading.Thread(target=self._syncer, name=f"fsync:{self.path.name}", daemon=True)
            self._thread.start()

    def _syncer(self) -> None:
        while not self._closed.is_set():
            self._closed.wait(self._interval)
            if self._dirty.is_set():
                self._dirty.clear()
                with self._lock:
                    if self._fd is None:
                        return
                    os.fsync(self._fd)

    def append(self, obj: Mapping[str, Any] | str) -> None:
        line = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        if "\n" in line:
            raise ValueError("a JSONL record must not contain a newline")
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: append after close")
            view = memoryview(data)
            start = os.lseek(self._fd, 0, os.SEEK_END)
            with errors_name(self.path):
                try:
                    while view:  # O_APPEND: one write() per line in practice; loop only on a short write
                        written = os.write(self._fd, view)
                        view = view[written:]
                except OSError:  # a full disk mid-line: the file keeps whole lines only
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, start)
                    raise
                if self._interval <= 0:
                    os.fsync(self._fd)
                else:
                    self._dirty.set()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "AppendOnlyJsonl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
