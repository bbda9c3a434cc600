"""Run the real build entry point and SIGKILL it at an exact point of its work, not at a moment in time.

    python tests/kill_at.py FILE N -- --gin_file=... --gin.OUTPUT_DIR="'...'"

kills this process (kill -9: no finally, no atexit, no flush) right after its N-th append to the
output file named FILE (candidates.jsonl, llm_cache.jsonl, teacher_log.jsonl or train.jsonl) has
returned. Because the point is counted in units of work, a loaded machine changes only which other
requests happen to be in flight at the kill, never where the build is killed:
  candidates.jsonl N    inside the candidate stage, after N queries' candidate lines
  llm_cache.jsonl N     the N-th teacher answer is durable, the window built from it is not yet sent
  teacher_log.jsonl N   between a query's teacher log line and its train.jsonl line
  train.jsonl N         after N labelled queries
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.set_builder import cli  # noqa: E402
from twolar_jax import durable_io  # noqa: E402


def kill_after(file_name: str, n: int) -> None:
    """Patch every AppendOnlyJsonl (the build's, the call cache's) to kill -9 this process after the n-th
    line appended to a file named `file_name`."""
    original = durable_io.AppendOnlyJsonl.append
    count = [0]

    def append(self: durable_io.AppendOnlyJsonl, obj: Mapping[str, Any] | str) -> None:
        original(self, obj)
        if self.path.name == file_name:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    durable_io.AppendOnlyJsonl.append = append  # type: ignore[method-assign]


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit("usage: kill_at.py FILE N -- BUILD_ARGS...")
    kill_after(sys.argv[1], int(sys.argv[2]))
    return cli.console_main(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
