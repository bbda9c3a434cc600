"""What every console entry point shares: user errors as one line and exit code 2, --debug, --log_level,
the compilation cache, and a --help that lists the shipped gin files and the macros they require.

Why one place: a user who mistypes a path or a binding should read one line naming the file, line,
field or option (`twolar-train: error: data.jsonl:3: candidates: ...`), not 30 lines of traceback; a
bug (any other exception) keeps its traceback. Both are redacted (twolar_jax.secrets). `--debug` (or
TWOLAR_DEBUG=1) shows the traceback of user errors too.

    def console_main(argv=None) -> int:
        return entry.run_console("twolar-x", _main, argv)
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from twolar_jax import console_noise, host_heap, stop_signals, user_paths
from twolar_jax.errors import OptionError, TwolarError
from twolar_jax.secrets import redact

DEBUG_ENV = "TWOLAR_DEBUG"
EXIT_USER_ERROR = 2
EXIT_BUG = 1
# OSErrors that a user's path or disk causes (and fixes): shown as one line naming the path and, where
# the path came from an option, the option.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
                         errno.EXDEV, errno.EFBIG, errno.ELOOP, errno.EMFILE})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_GIN_CALL = re.compile(r"In call to configurable '([^']+)'")
_MISSING_ARGUMENT = re.compile(r"missing \d+ required (keyword-only |positional )?arguments?: ")
_REQUIRED_MACRO = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*=\s*%gin\.REQUIRED", re.MULTILINE)


# ------------------------------------------------------------------------------------ classification
def _third_party_user_errors() -> tuple[type, ...]:
    """Errors of libraries that only bad input raises (safetensors' header errors); empty if not installed."""
    found: list[type] = []
    try:
        from safetensors import SafetensorError

        found.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a core dependency
        pass
    return tuple(found)


def gin_original(exc: BaseException) -> BaseException:
    """The exception gin re-raised through its message-augmenting proxy (`gin.utils.augment_exception_message_
    and_reraise`): the proxy is an instance of the same class but without its attributes, so a full disk
    inside a gin-configured job would lose its errno and filename, and read as a bug."""
    for _ in range(8):  # a proxy of a proxy when configurables call configurables
        getter = type(exc).__dict__.get("__getattr__")
        if "augment_exception_message" not in getattr(getter, "__qualname__", ""):
            return exc
        inner = [c.cell_contents for c in getter.__closure__ or () if isinstance(c.cell_contents, BaseException)]
        if not inner:
            return exc
        exc = inner[0]
    return exc


def is_user_error(exc: BaseException) -> bool:
    """True for errors a user fixes (bad input, option, path, binding, a full disk); False for bugs.
    An OSError is judged by gin's original (its errno); the rest by the message gin added (the call)."""
    original = gin_original(exc)
    if isinstance(original, OSError) and original.errno in USER_ERRNOS:
        return True
    if isinstance(exc, (TwolarError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        return True
    if isinstance(exc, RuntimeError) and str(exc).startswith("Required bindings for"):  # gin.REQUIRED params
        return True
    if isinstance(exc, TypeError) and _MISSING_ARGUMENT.search(str(exc)) and _GIN_CALL.search(str(exc)):
        return True  # a gin-configured entry called without a required parameter: a missing binding
    return isinstance(exc, _third_party_user_errors())


def os_error_message(exc: OSError) -> str:
    """`<option> <path>: <what the system said>`: the option the path came from when one was checked."""
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n]
    what = exc.strerror or type(exc).__name__
    if not names:
        return what
    for name in reversed(names):  # a rename's target names the user's path, its source a temp file
        option = user_paths.option_for(name)
        if option:
            return f"{option} {name}: {what}"
    return f"{names[0]}: {what}" + (f" (renaming to {names[1]})" if len(names) > 1 else "")


def error_line(prog: str, exc: BaseException) -> str:
    """`prog: error: <first line of the message> [in <gin configurable>]`, secrets redacted, one line."""
    original = gin_original(exc)
    if isinstance(original, OSError) and not isinstance(original, TwolarError) and original.errno in USER_ERRNOS:
        call = _GIN_CALL.search(str(exc))
        return redact(f"{prog}: error: {os_error_message(original)}" + (f" [in {call.group(1)}]" if call else ""))
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    if (isinstance(exc, RuntimeError) and message.startswith("Required bindings for")) or (
            isinstance(exc, TypeError) and _MISSING_ARGUMENT.search(message)):
        message += " (bind them in a gin file or with --gin.configurable.param=VALUE)"
    call = _GIN_CALL.search(text)
    if call and call.group(1) not in message:
        message += f" [in {call.group(1)}]"
    return redact(f"{prog}: error: {message}")


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(--debug given or TWOLAR_DEBUG set, argv without --debug)."""
    rest = [a for a in argv if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return env or len(rest) != len(argv), rest


def requested_log_level(argv: Sequence[str]) -> Optional[str]:
    """The --log_level value in argv (upper-cased), before any parser runs; None when not given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--log_level="):
            return arg.split("=", 1)[1].upper()
        if arg == "--log_level" and i + 1 < len(argv):
            return argv[i + 1].upper()
    return None


_own_process = False  # a console command's own process (quiet_console ran), not a call from Python code


def quiet_console(argv: Sequence[str]) -> None:
    """For a process a console command runs: third-party chatter off stderr unless --log_level=DEBUG."""
    global _own_process
    _own_process = True
    console_noise.install(requested_log_level(argv))


NOTHING_SAVED = "nothing was written"
_interrupt_note = NOTHING_SAVED


def on_interrupt(note: str) -> None:
    """What a Ctrl-C leaves saved, for the one line it prints (`scores so far are in X.scores.jsonl`)."""
    global _interrupt_note
    _interrupt_note = note


def interrupted_line(prog: str) -> str:
    if _interrupt_note == NOTHING_SAVED:
        return f"{prog}: interrupted: {NOTHING_SAVED}; run the same command again"
    return f"{prog}: interrupted: {_interrupt_note}; run the same command again to resume"


def run_console(prog: str, main: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call main(argv) and return its exit code (None: 0); user errors become one line on stderr and 2,
    Ctrl-C one line and 130. argv None means a process of its own (sys.argv): its console is quieted."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if argv is None:
        quiet_console(raw)
    debug, args = debug_requested(raw)
    user_paths.forget()
    on_interrupt(NOTHING_SAVED)
    try:
        return int(main(args) or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            print(redact("".join(traceback.format_exc())), file=sys.stderr, end="")
        print(interrupted_line(prog), file=sys.stderr, flush=True)
        return stop_signals.exit_code("SIGINT")
    except BaseException as exc:  # noqa: BLE001 - the one place that decides how an error is shown
        user = is_user_error(exc)
        if user and not debug:
            print(error_line(prog, exc), file=sys.stderr)
            return EXIT_USER_ERROR
        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        if user:
            print(error_line(prog, exc), file=sys.stderr)
        return EXIT_USER_ERROR if user else EXIT_BUG


# ------------------------------------------------------------------------------------------- flags
def add_common_flags(parser: argparse.ArgumentParser, *, log_level: str = "INFO",
                     compile_cache: bool = True) -> argparse.ArgumentParser:
    """--log_level, --debug and (for programs that compile) --no_compile_cache."""
    parser.add_argument("--log_level", default=log_level, type=str.upper, choices=LOG_LEVELS,
                        help=f"logging level (default {log_level})")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of errors (also {DEBUG_ENV}=1)")
    if compile_cache:
        parser.add_argument("--no_compile_cache", action="store_true",
                            help="do not use the persistent JAX compilation cache (also TWOLAR_COMPILE_CACHE=off)")
        parser.add_argument("--host_heap", default=None, choices=host_heap.MODES,
                            help="keep freed host memory for reuse (keep), or glibc's default (release); auto "
                                 f"(default, or ${host_heap.ENV}) keeps it when JAX runs on the CPU, where "
                                 "each step's temporaries would otherwise be page-faulted in afresh")
    return parser


def start(flags: argparse.Namespace) -> None:
    """Logging at --log_level, the host heap (before JAX starts) and, unless turned off, the persistent
    compilation cache."""
    from twolar_jax.logging_setup import setup_logging

    setup_logging(flags.log_level)
    if hasattr(flags, "host_heap"):
        host_heap.configure(flags.host_heap)
    if hasattr(flags, "no_compile_cache"):
        from twolar_jax import compile_cache

        if flags.no_compile_cache:
            if _own_process:  # also for what the command builds later (the Reranker's stored programs)
                os.environ[compile_cache.ENV] = "off"
        else:
            compile_cache.enable_compilation_cache()


# -------------------------------------------------------------------------------------------- help
def shipped_gin_files(*prefixes: str) -> list[str]:
    """Shipped gin files (relative to the gin folder) whose path starts with one of `prefixes`."""
    from twolar_jax import resources

    root = resources.gin_dir()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.gin"))
    return [n for n in names if not prefixes or n.startswith(prefixes)]


def required_macros(relative_path: str) -> list[str]:
    """Macros a shipped gin file declares as `NAME = %gin.REQUIRED`."""
    from twolar_jax import resources

    text = (Path(resources.gin_dir()) / relative_path).read_text(encoding="utf-8")
    return [m.group("name") for m in _REQUIRED_MACRO.finditer(text)]


def gin_help(*prefixes: str, note: str = "") -> str:
    """The --help epilog: the shipped gin files an entry point knows and the macros they require."""
    from twolar_jax import resources

    files = shipped_gin_files(*prefixes)
    required = [f"  {name:<22} (declared by {f})" for f in files for name in required_macros(f)]
    lines = [f"gin files it knows (shipped in {resources.gin_dir()}; pass --gin_file=NAME, repeatable):"]
    lines += [f"  {f}" for f in files] or ["  (none)"]
    lines += ["", "required macros (set with --gin.NAME=VALUE, strings quoted: --gin.NAME=\"'...'\"):"]
    lines += required or ["  (none)"]
    lines += ["", "any gin parameter can be set with --gin.configurable.param=VALUE; "
                  "--gin_search_paths=DIR,... adds folders to look gin files up in."]
    return "\n".join(lines + (["", note] if note else []))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are OptionErrors: `prog: error: ...` on one line, exit 2, no usage block
    (run_console prints it; --help still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(f"{message} ({self.prog} --help lists the flags)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def parser_with_gin_help(prog: str, description: str, *prefixes: str, note: str = "") -> ArgumentParser:
    """An ArgumentParser whose --help ends with gin_help(*prefixes)."""
    return ArgumentParser(prog=prog, description=description, epilog=gin_help(*prefixes, note=note),
                          formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
