"""One job per output directory: an exclusive lock file inside it, held for the whole job.

Why: two jobs pointed at one MODEL_DIR, eval output_dir or build OUTPUT_DIR would interleave their appends
(score logs, train.jsonl, metrics) and race their checkpoints, and neither would notice. The second job
now refuses at once with one line (exit 2) naming the directory and the job that holds it (pid, host,
start time).

How: `fcntl.flock(LOCK_EX | LOCK_NB)` on an open descriptor of `<dir>/.twolar.lock`. The kernel drops the
lock when the descriptor closes, so a job that crashes or is killed (kill -9 included) never leaves a lock
that blocks: a stale lock file is only a file, and the next job takes it over. The holder's pid, host and
start time are written into the file for the refusal message only; the lock itself is the flock. A
released lock unlinks its file while still holding it, and a job that locked a file someone has just
unlinked retries on the fresh one (the inode check), so the file never outlives a clean exit.
flock works on local disks and on NFS (Linux emulates it with byte-range locks there); on file systems
without locks (some FUSE mounts) the lock is skipped with a warning rather than failing the job.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from twolar_jax.errors import OptionError

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".twolar.lock"
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


def lock_name(process_index: int = 0) -> str:
    """The lock file of one process of a job: on a pod all hosts share the output directory, so each locks
    its own file (`.twolar.lock` for process 0, `.twolar.lock.<i>` for process i). A second job's process i
    then meets the first job's process i, and every host of the second job refuses at once rather than
    process 0 alone refusing and leaving the others to hang in their first collective."""
    return LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"


class DirectoryInUseError(OptionError):
    """Another live job holds the directory's lock: the user waits for it, stops it, or picks another dir."""


def holder_text(info: dict) -> str:
    """`pid 123 on host h, started 2026-12-07 18:00:00 UTC` from a lock file's JSON (what is known of it)."""
    if not info:
        return "a job that is just starting (no holder recorded yet)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def read_holder(lock_path: PathLike) -> dict:
    """The holder info a lock file records; {} when it is empty, unreadable or half written."""
    try:
        value = json.loads(Path(lock_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class DirLock:
    """An acquired lock: `release()` (or leaving `hold`'s block) unlinks the file and closes the descriptor."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink first, then close: the unlink happens while the lock is still ours (see the module doc)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _write_holder(fd: int, path: Path) -> None:
    """Best effort: a full disk must not stop the job over its lock's description (the flock is what counts)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:
        log.debug("could not record the holder in %s: %s", path, e)


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding the flock on the file now at `path`; None when a live job holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder unlinked it as we opened it: lock the fresh file instead


def acquire(directory: PathLike, *, option: str, lock_name: str = LOCK_NAME,
            target: Optional[PathLike] = None) -> DirLock:
    """Create `directory` if needed and lock it for this job; DirectoryInUseError when a live job holds it.

    option: how the user named the directory (`--model_dir`, `evaluate.output_dir`), for the message;
    target: the output the message names when it is a file in `directory` (rerank_run's --output)."""
    folder = Path(directory)
    named = Path(target) if target is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    try:
        fd = _try_lock(path)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("%s %s: the file system has no locks (%s); not guarding against a second job", option, folder,
                    e.strerror)
        return DirLock(path, None)
    if fd is None:
        raise DirectoryInUseError(f"{option} {named}: in use by another job ({holder_text(read_holder(path))}); "
                                  f"wait for it to finish, stop it, or choose another output (lock file {path})")
    _write_holder(fd, path)
    return DirLock(path, fd)


@contextlib.contextmanager
def hold(directory: PathLike, *, option: str, lock_name: str = LOCK_NAME,
         target: Optional[PathLike] = None) -> Iterator[DirLock]:
    """`acquire` for the block's duration; released on any exit (an error, Ctrl-C), and by the kernel on a crash."""
    lock = acquire(directory, option=option, lock_name=lock_name, target=target)
    try:
        yield lock
    finally:
        lock.release()


def holding(param: str, *, option: str) -> Callable[[F], F]:
    """Decorate a job entry whose keyword argument `param` is its output directory: the call runs holding
    that directory's lock. A decorator so that an entry edited by others keeps its body as it is; the
    signature is kept (`__signature__`), so gin still sees, binds and checks the real parameters."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            directory = kwargs.get(param)
            if not directory:  # let the entry name its missing option as it always did
                return func(*args, **kwargs)
            with hold(directory, option=option):
                return func(*args, **kwargs)

        locked.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
        return locked  # type: ignore[return-value]

    return decorate
