"""Keep every core busy while a test runs: issue 13's resume failure showed only on a loaded machine."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator


@contextlib.contextmanager
def busy_cpus(n: int | None = None) -> Iterator[list[subprocess.Popen]]:
    """`n` `while True: pass` processes, killed on exit. Default: one per core (at least 2), or
    $TWOLAR_BUSY_CPUS when set (0 when the caller keeps the cores busy itself, e.g. a repeat-under-load loop)."""
    env = os.environ.get("TWOLAR_BUSY_CPUS")
    count = n if n is not None else int(env) if env else max(2, os.cpu_count() or 2)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
