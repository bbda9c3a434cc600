"""One host of a multi-host eval job, for tests/test_multihost_eval.py, recording what it writes.

    python tests/multihost_eval_worker.py WRITTEN_JSON MODULE [ARGS...]

Runs `python -m MODULE ARGS...` in this process, and at exit writes WRITTEN_JSON: the path of every file
the process renamed into place (twolar_jax.durable_io writes every output file to a temporary sibling and
os.replace-s it over the target). So the test sees which host wrote the run, metrics and tables, although
all hosts write into one output directory.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    record, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    written: list[str] = []
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        written.append(os.path.realpath(os.fspath(dst)))
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    atexit.register(lambda: Path(record).write_text(json.dumps(written)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
