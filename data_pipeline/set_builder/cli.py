"""`twolar-build` / `python -m data_pipeline.set_builder`: build (or resume) a distillation set from gin.

    twolar-build --gin_file=runs/build_scifact_offline.gin --gin.OUTPUT_DIR="'/tmp/distill'"
    twolar-build --gin_file=runs/build_msmarco_openai.gin --gin.OUTPUT_DIR="'runs/distill'" ...

Exit codes: 0 when every query is labelled, 1 when some are left (re-run to retry them), 2 when the
teacher aborted (bad key, unknown model) or the configuration is wrong.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from data_pipeline.set_builder.build import MANIFEST
from data_pipeline.set_builder.configurables import register_build
from twolar_jax import gin_utils
from twolar_jax.logging_setup import setup_logging

log = logging.getLogger("data_pipeline.build")
EXIT_CODES = {"complete": 0, "incomplete": 1, "aborted": 2}


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: finished lines are already on disk, the manifest is rewritten."""
    raise KeyboardInterrupt(f"signal {signum}")


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging("INFO")
    configured = register_build()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    code = [0]

    def main(rest: list[str]) -> None:
        if rest:
            raise SystemExit(f"unknown arguments: {rest}")
        manifest = configured(write_gin_config=True)
        status = manifest["runs"][-1]["status"]
        labels = manifest["labelled"]
        log.info("build %s: %d queries labelled (%s); manifest at %s", status, labels["queries"],
                 labels["by_query_type"], Path(manifest["build"]["output_dir"]) / MANIFEST)
        code[0] = EXIT_CODES.get(status, 1)

    try:
        gin_utils.run(main, list(sys.argv[1:] if argv is None else argv))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code[0]


if __name__ == "__main__":
    sys.exit(console_main())
