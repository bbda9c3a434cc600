"""Keep third-party start-up chatter off a console command's stderr (all of it at --log_level=DEBUG).

Why: TensorFlow, XLA and libtpu, the CUDA stubs and the JVM (SLF4J) write to file descriptor 2 from C++
and Java, outside Python's logging and at levels no environment variable reliably controls (TF 2.21 prints
its oneDNN and cuda-stub notes even with TF_CPP_MIN_LOG_LEVEL=3, libtpu prints its host-bounds warning on
every CPU machine). A user who reads `E0000 ... failed call to cuInit` above our one-line error or our
progress bar reads a failure that did not happen.

How: Python's own `sys.stderr` moves to a duplicate of the real stderr, so our logs, progress bars and
errors go straight out. Descriptor 2, which native code writes to, is pointed at an unlinked file that a
thread reads, dropping the lines that match NOISE and passing every other line (a native crash report,
say) through. Only console entry points install it: never a library import, never an in-process call.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Optional

# Lines written by native code that say nothing a user must act on. A fatal (F...) line is never dropped.
NOISE = tuple(re.compile(p) for p in (
    r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./+-]+:\d+\] ",  # absl / glog lines of TF, XLA, libtpu
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^WARNING: Logging before InitGoogle\(\) is written to STDERR",
    r"^Failed to find host bounds for accelerator type",  # libtpu on a machine without a TPU
    r"^=== Source Location Trace: ===",
    r"^[\w./+-]+\.(cc|h):\d+\s*$",  # the trace's file:line lines
    r"^To enable the following instructions: .* rebuild TensorFlow",
    r"^SLF4J",  # the JVM's logging facade saying which (or that no) provider it found
    r"^WARNING: Using incubator modules",
    r"^Picked up (JAVA_TOOL_OPTIONS|_JAVA_OPTIONS)",
    # java.util.logging (Lucene's notes): a header line `Dec 07, 2026 4:12:37 PM org.apache... <init>`, then
    # `INFO: ...`. Our own logs never pass through here (they go to Python's sys.stderr).
    r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d\d:\d\d [AP]M [\w.$]+ \S+",
    r"^(INFO|CONFIG|FINE|FINER|FINEST): ",
))
# Read once by the libraries at import: set (when the user has not) before they load.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar follows the hub's switch
    "GRPC_VERBOSITY": "ERROR",
}
_PARTIAL_LINE_WAIT_S = 0.3  # a native line without its newline yet is passed on after this long
_POLL_S = 0.05

_filter: Optional["_NativeStderrFilter"] = None


def is_noise(line: str) -> bool:
    """True for a line of native start-up chatter (NOISE)."""
    return any(p.search(line) for p in NOISE)


def quiet_environment() -> None:
    """The libraries' own quiet settings, where the user set none, and their progress bars off if loaded."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        hf_logging.disable_progress_bar()


class _NativeStderrFilter:
    """Descriptor 2 into a file; a thread passes its non-noise lines on to the real stderr (module docstring)."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.real_fd = os.dup(2)
        fd, path = tempfile.mkstemp(prefix="twolar-native-stderr-")
        os.close(fd)
        write_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.read_fd = os.open(path, os.O_RDONLY)
        os.unlink(path)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.python_stderr = open(self.real_fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None)
                                  or "utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = self.python_stderr
        self._pending = b""
        self._pending_since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twolar-native-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pass_on(self, data: bytes) -> None:
        kept = [line for line in data.splitlines(keepends=True)
                if not is_noise(line.decode("utf-8", "replace"))]
        if kept:
            try:
                os.write(self.real_fd, b"".join(kept))
            except OSError:  # the terminal is gone: nothing to tell anyone
                pass

    def _drain(self, final: bool = False) -> None:
        while True:
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                break
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending += chunk
        cut = self._pending.rfind(b"\n") + 1
        if cut:
            self._pass_on(self._pending[:cut])
            self._pending = self._pending[cut:]
            self._pending_since = time.monotonic()
        if self._pending and (final or time.monotonic() - self._pending_since > _PARTIAL_LINE_WAIT_S):
            self._pass_on(self._pending)
            self._pending = b""

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            self._drain()

    def close(self) -> None:
        """Pass on what is left (at exit). Descriptor 2 stays filtered: shutdown chatter is noise too."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        sys.stderr.flush()
        self._drain(final=True)


def install(log_level: Optional[str]) -> None:
    """Quiet the console for a process that a console entry point runs (idempotent); DEBUG: leave it all."""
    global _filter
    if str(log_level or "").upper() == "DEBUG":
        return
    quiet_environment()
    logging.captureWarnings(True)  # library warnings go through logging, shown at DEBUG (logging_setup)
    if _filter is None:
        try:
            _filter = _NativeStderrFilter()
        except OSError:  # no temp dir or no descriptor 2: the console stays as it is
            _filter = None


def installed() -> bool:
    return _filter is not None
