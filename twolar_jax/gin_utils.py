"""t5x-style gin handling shared by every entry point: flags, file lookup, registration, the operative config.

`--gin_file` (repeatable) names gin files, looked up in `--gin_search_paths`, the working directory and
the shipped gin folder (`twolar_jax.resources.gin_dir()`); `--gin.NAME=VALUE` is rewritten into a
binding `NAME = VALUE` (t5x's `rewrite_gin_args`). Entry functions stay plain keyword-only Python; each
entry point registers what its gin files name through `register`, the one registration helper.

File lookup happens in one place, `parse_gin_flags`: gin resolves a relative `include` against the
working directory first and then asks its package-resource reader, which crashes (gin-config 0.5.0)
when the include's folder name matches a namespace package on sys.path, e.g. a `data/` or `runs/`
folder in the working directory. So gin files are parsed with the working directory set to the gin
folder: gin's own first lookup finds every shipped include, and the resource reader is never asked.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tokenize
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gin

from twolar_jax import resources
from twolar_jax.durable_io import write_text_atomic
from twolar_jax.errors import MissingFileError, OptionError, TwolarError
from twolar_jax.secrets import redact_gin_config

GIN_FLAGS = ("--gin_file", "--gin_bindings", "--gin_search_paths")
_REGISTERED: dict[tuple[Optional[str], str], tuple[Any, Any]] = {}
_ADDED_SEARCH_PATHS: set[str] = set()


# ------------------------------------------------------------------------------------- registration
def register(obj: Any, *, name: Optional[str] = None, module: Optional[str] = None) -> Any:
    """`gin.external_configurable(obj, name, module)`, once per (module, name): later calls return the same
    configurable; registering a different object under a taken name is an error. Works after an earlier run
    in the same process finalized (locked) the config, e.g. an eval job started after training in a notebook."""
    key = (module, name or obj.__name__)
    if key in _REGISTERED:
        original, configurable = _REGISTERED[key]
        if original is not obj:
            raise ValueError(f"gin name {'.'.join(filter(None, key))!r} is already registered for {original!r}")
        return configurable
    with gin.unlock_config():
        configurable = gin.external_configurable(obj, name=key[1], module=module)
    _REGISTERED[key] = (obj, configurable)
    return configurable


# ------------------------------------------------------------------------------------------- flags
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
    """Split argv into (gin_files, gin_bindings, search_paths, remaining args); `--flag=v` and `--flag v`."""
    sinks: dict[str, list[str]] = {flag: [] for flag in GIN_FLAGS}
    rest: list[str] = []
    args = rewrite_gin_args(argv)
    i = 0
    while i < len(args):
        arg, flag, value = args[i], None, None
        for candidate in GIN_FLAGS:
            if arg == candidate:
                if i + 1 >= len(args):
                    raise OptionError(f"{candidate} needs a value")
                flag, value, i = candidate, args[i + 1], i + 1
            elif arg.startswith(candidate + "="):
                flag, value = candidate, arg[len(candidate) + 1:]
        if flag is None:
            rest.append(arg)
        elif flag == "--gin_search_paths":
            sinks[flag].extend(p for p in value.split(",") if p)
        else:
            sinks[flag].append(value)
        i += 1
    return sinks["--gin_file"], sinks["--gin_bindings"], sinks["--gin_search_paths"], rest


# ---------------------------------------------------------------------------------------- parsing
def search_paths(extra: Sequence[str] = ()) -> list[str]:
    """Where gin files are looked up, in order: the given paths, the working directory, the shipped gin/."""
    return [os.path.abspath(p) for p in extra] + [os.getcwd(), str(resources.gin_dir())]


def resolve_gin_file(name: str, extra_search_paths: Sequence[str] = ()) -> str:
    """An absolute path for a gin file named absolutely or relative to a search path."""
    if os.path.isabs(name):
        if not os.path.isfile(name):
            raise MissingFileError(f"gin file {name!r} not found")
        return name
    paths = search_paths(extra_search_paths)
    for prefix in paths:
        candidate = os.path.join(prefix, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise MissingFileError(f"gin file {name!r} not found in {paths}")


def parse_gin_flags(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                    extra_search_paths: Sequence[str] = (), *, skip_unknown: bool = False) -> None:
    """Parse gin files and bindings into a cleared config; includes resolve against the search paths
    (module docstring).

    Each run is its own config: an earlier run in the same process (a notebook that trains, then
    evaluates) left its bindings behind and its config finalized, which would leak into this one or make
    the parse fail with gin's "Attempted to modify locked Gin config". Registrations are kept."""
    if not gin_files and not gin_bindings:
        raise OptionError("no --gin_file given: every run is a gin file (see the shipped gin/ folder: "
                          f"{resources.gin_dir()})")
    files = [resolve_gin_file(f, extra_search_paths) for f in gin_files]
    gin.clear_config()
    for path in search_paths(extra_search_paths):
        if path not in _ADDED_SEARCH_PATHS:
            gin.add_config_file_search_path(path)
            _ADDED_SEARCH_PATHS.add(path)
    # One file and one binding at a time, so that a parse error names the file or the binding it came from.
    with contextlib.chdir(resources.gin_dir()):
        for path in files:
            with _gin_errors(f"{path}"):
                gin.parse_config_files_and_bindings([path], [], finalize_config=False, skip_unknown=skip_unknown)
        for binding in gin_bindings:
            with _gin_errors(f"gin binding {redact_gin_config(binding).strip()!r}"):
                gin.parse_config_files_and_bindings([], [binding], finalize_config=False, skip_unknown=skip_unknown)
        with _gin_errors("gin"):
            gin.finalize()


class GinConfigError(OptionError):
    """A gin file or binding that does not parse, names an unknown configurable, or leaves a macro unset."""


_GIN_LOCATION = re.compile(r'In file "(?P<file>[^"]+)", line (?P<line>\d+)')
_GIN_REQUIRED_MACRO = re.compile(r"^(?P<name>[\w.]+)/macro\.value set to `%gin\.REQUIRED`")


def describe_gin_error(exc: BaseException, where: str) -> str:
    """One line for a gin parse error: where (file:line or the binding), what, and the offending text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
    first = lines[0] if lines else type(exc).__name__
    required = _GIN_REQUIRED_MACRO.match(first)
    if required:
        name = required.group("name")
        return (f"required macro {name} is not set (it is %gin.REQUIRED): add --gin.{name}=VALUE "
                "(a string needs quotes: \"'...'\")")
    if isinstance(exc, tokenize.TokenError):
        what = exc.args[0] if exc.args else "incomplete statement"
        return f"{where}: gin: cannot parse ({what}; an unclosed bracket or quote?)"
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        if where.startswith("gin binding"):  # `where` already shows the (redacted) binding
            return f"{where}: gin: {exc.msg or first}"
        text = f" ({redact_gin_config(exc.text.strip()).strip()})" if exc.text and exc.text.strip() else ""
        return f"{where}:{exc.lineno}: gin: {exc.msg or first}{text}"
    match = _GIN_LOCATION.search(str(exc))
    if match:
        location = f"{match.group('file')}:{match.group('line')}"
        code = lines[-1] if len(lines) > 2 else ""
        return f"{location}: gin: {first}" + (f" ({redact_gin_config(code).strip()})" if code else "")
    return f"{where}: gin: {first}"


@contextlib.contextmanager
def _gin_errors(where: str):
    """Turn gin's parse errors (ValueError, SyntaxError, tokenize.TokenError...) into one-line GinConfigErrors."""
    try:
        yield
    except TwolarError:
        raise
    except (ValueError, SyntaxError, tokenize.TokenError, TypeError, ImportError, KeyError, OSError) as exc:
        raise GinConfigError(describe_gin_error(exc, where)) from exc


def is_bound(name: str) -> bool:
    """Whether a gin parameter (`scope/fn.param`) or macro (`NAME`) is bound, without evaluating it."""
    try:
        gin.query_parameter(name if "." in name else f"%{name}")
    except ValueError:
        return False
    return True


def query(name: str) -> Any:
    """The value of a gin parameter (`scope/fn.param`) or a macro (`NAME`), following macro references."""
    value = gin.query_parameter(name if "." in name else f"%{name}")
    while isinstance(value, gin.config.ConfigurableReference) or hasattr(value, "scoped_configurable_fn"):
        value = value.scoped_configurable_fn()
    return value


def operative_config() -> str:
    """gin's operative config with secrets redacted (by binding name and by value)."""
    return redact_gin_config(gin.operative_config_str())


def write_operative_config(directory: str | os.PathLike, name: str = "config.gin") -> Path:
    """Write the (redacted) operative config next to the run's outputs, atomically."""
    return write_text_atomic(Path(directory) / name, operative_config())


def run(main: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Parse `--gin_file/--gin.X=V/--gin_bindings/--gin_search_paths` from argv and call main(rest)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    files, bindings, paths, rest = split_gin_args(argv)
    parse_gin_flags(files, bindings, paths)
    return main(rest)
