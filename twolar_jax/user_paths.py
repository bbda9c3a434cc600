"""Paths the user gave on the command line, checked before any work starts and remembered by option.

Why: an output that cannot be written (a directory where a file goes, a parent that is a regular file, a
read-only disk, a name over the file system's limit) used to fail at the final rename, after all the
scoring, with a message naming a temp file. `check_output` finds these before anything is read, scored or
created; `option_for` lets an OSError raised later (a full disk) name the option its path came from.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Optional, Union

from twolar_jax.errors import OptionError

PathLike = Union[str, os.PathLike]
_TEMP_SIBLING = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # durable_io.atomic_writer's temp file
_checked: dict[str, str] = {}  # absolute path -> the option it came from


def forget() -> None:
    """Start a new command: no path is known yet."""
    _checked.clear()


def remember(option: str, path: PathLike) -> None:
    _checked[os.path.abspath(os.fspath(path))] = option


def option_for(path: PathLike) -> Optional[str]:
    """The option whose checked path is `path`, contains it, or is the target of its temp sibling."""
    full = os.path.abspath(os.fsdecode(os.fspath(path)))
    temp = _TEMP_SIBLING.match(os.path.basename(full))
    candidates = [full] + ([os.path.join(os.path.dirname(full), temp.group("name"))] if temp else [])
    for candidate in candidates:
        for known, option in _checked.items():
            if candidate == known or candidate.startswith(known + os.sep) or candidate.startswith(known + "."):
                return option
    return None


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor; a non-directory on the way is an error."""
    current = path
    while not os.path.lexists(current):
        current = current.parent
    return current


def _fail(option: str, path: PathLike, what: str) -> OptionError:
    return OptionError(f"{option} {os.fspath(path)}: {what}")


def check_output(option: str, path: PathLike, *, kind: str = "file") -> Path:
    """Raise OptionError (naming `option`) unless `path` can be written as a `kind` ("file" or "dir"):
    no component too long, no non-directory among its existing ancestors, not the other kind already,
    and its nearest existing folder writable. Creates nothing. Remembers the option for later errors."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind={kind!r}")
    given = Path(os.fspath(path)).expanduser()
    full = Path(os.path.abspath(given))
    anchor = _nearest_existing(full)
    limit = _name_max(anchor if anchor.is_dir() else anchor.parent)
    for part in full.parts:
        if len(os.fsencode(part)) > limit:
            raise _fail(option, path, f"{os.strerror(errno.ENAMETOOLONG)} ({part[:20]}...: "
                                      f"{len(os.fsencode(part))} bytes, the file system allows {limit})")
    if anchor != full and not anchor.is_dir():
        raise _fail(option, path, f"{anchor} is a file, not a directory")
    if anchor == full:
        if kind == "file" and full.is_dir():
            raise _fail(option, path, "is a directory (a file path is expected)")
        if kind == "dir" and not full.is_dir():
            raise _fail(option, path, "is a file (a directory is expected)")
    folder = full if anchor == full and kind == "dir" else anchor if anchor != full else full.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = errno.EROFS if _read_only(folder) else errno.EACCES
        raise _fail(option, path, f"{os.strerror(reason)} ({folder} cannot be written)")
    remember(option, given)
    return given


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_input(option: str, path: PathLike, *, kind: str = "file") -> Path:
    """Raise OptionError (naming `option`) unless `path` exists as a `kind` ("file" or "dir") and is readable."""
    given = Path(os.fspath(path)).expanduser()
    if not given.exists():
        raise _fail(option, path, "not found")
    if kind == "file" and given.is_dir():
        raise _fail(option, path, "is a directory (a file is expected)")
    if kind == "dir" and not given.is_dir():
        raise _fail(option, path, "is a file (a directory is expected)")
    if not os.access(given, os.R_OK):
        raise _fail(option, path, os.strerror(errno.EACCES))
    remember(option, given)
    return given
