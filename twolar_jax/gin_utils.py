"""t5x-style gin flag handling shared by every entry point.

`--gin_file` (repeatable) names gin files, looked up in the repo's `gin/` folder, the current directory
and any `--gin_search_paths`; `--gin.NAME=VALUE` is rewritten into a binding `NAME = VALUE`, as
t5x's `gin_utils.rewrite_gin_args` does. Entry functions stay plain keyword-only Python; only the
`__main__` of each entry point wraps them with `gin.configurable`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import gin

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"


def default_search_paths() -> list[str]:
    """The repo's gin/ folder first, then the working directory."""
    return [str(GIN_DIR), os.getcwd()]


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turn `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`; other args pass through."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            out.append(f"--gin_bindings={name} = {value}")
        else:
            out.append(arg)
    return out


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """Split argv into (gin_files, gin_bindings, search_paths, remaining args). Accepts `--flag=v` and `--flag v`."""
    files, bindings, paths, rest = [], [], [], []
    args = list(rewrite_gin_args(argv))
    i = 0
    while i < len(args):
        arg = args[i]
        matched = False
        for flag, sink in (("--gin_file", files), ("--gin_bindings", bindings), ("--gin_search_paths", paths)):
            if arg == flag:
                if i + 1 >= len(args):
                    raise SystemExit(f"{flag} needs a value")
                sink.append(args[i + 1])
                i += 2
                matched = True
                break
            if arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
                sink.extend(value.split(",") if flag == "--gin_search_paths" else [value])
                i += 1
                matched = True
                break
        if not matched:
            rest.append(arg)
            i += 1
    return files, bindings, paths, rest


def _guard_package_resource_reader() -> None:
    """gin's package-resource reader crashes (TypeError) on namespace packages such as a `data/` or `runs/`
    folder in the working directory, and logs an ERROR for every include it does not find; replace its
    existence check with a quiet one that treats both as "not found", so the search goes on to gin/."""
    import importlib.util

    from gin import config as gin_config

    def quiet_exists(path: str) -> bool:
        head, filename = os.path.split(path)
        try:
            spec = importlib.util.find_spec(head.replace("/", "."))
        except (ImportError, ValueError):
            return False
        if spec is None or not spec.origin:
            return False
        return os.path.isfile(os.path.join(os.path.dirname(spec.origin), filename))

    for i, (reader, exists) in enumerate(gin_config._FILE_READERS):
        if getattr(exists, "__name__", "") == "system_path_file_exists":
            gin_config._FILE_READERS[i] = (reader, quiet_exists)


def resolve_gin_file(name: str, search_paths: Sequence[str] = ()) -> str:
    """An absolute path for a gin file named relative to the repo's gin/, the cwd or a search path."""
    if os.path.isabs(name):
        return name
    for prefix in [*search_paths, *default_search_paths()]:
        candidate = os.path.join(prefix, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise SystemExit(f"gin file {name!r} not found in {[*search_paths, *default_search_paths()]}")


def parse_gin_flags(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    *,
    skip_unknown: bool = False,
) -> None:
    """Parse gin files and bindings with the repo's gin/ folder on the search path."""
    _guard_package_resource_reader()
    from gin import config as gin_config

    for path in [*search_paths, *default_search_paths()]:
        if path not in gin_config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(path)
    if not gin_files and not gin_bindings:
        raise SystemExit("no --gin_file given: every run is a gin file (see gin/)")
    files = [resolve_gin_file(f, search_paths) for f in gin_files]
    gin.parse_config_files_and_bindings(files, list(gin_bindings), skip_unknown=skip_unknown)


def write_operative_config(directory: str | os.PathLike, name: str = "config.gin") -> Path:
    """Write gin's operative config next to the run's outputs, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(gin.operative_config_str())
    os.replace(tmp, target)
    return target


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Parse `--gin_file/--gin.X=V/--gin_bindings/--gin_search_paths` from argv and call main(rest)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    files, bindings, paths, rest = split_gin_args(argv)
    parse_gin_flags(files, bindings, paths)
    main(rest)
