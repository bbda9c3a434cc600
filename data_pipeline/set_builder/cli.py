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
from twolar_jax import entry, gin_utils, user_paths
from twolar_jax.secrets import redact

log = logging.getLogger("data_pipeline.build")
EXIT_CODES = {"complete": 0, "incomplete": 1, "aborted": 2}


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: finished lines are already on disk, the manifest is rewritten."""
    raise KeyboardInterrupt(f"signal {signum}")


def _flags(argv: Sequence[str]):
    parser = entry.parser_with_gin_help(
        "twolar-build", "Build (or resume) a distillation set: query sources, retrievers, teacher (gin configures it).",
        "runs/build_", note="Exit codes: 0 every query labelled, 1 some left (re-run to retry them), 2 the teacher "
                            "aborted (bad key, unknown model) or the configuration is wrong. The API key: "
                            "$OPENAI_API_KEY, llm_client.ChatClient.api_key, or http://user:KEY@host/v1 as "
                            "llm_client.ChatClient.base_url; it is never written anywhere.")
    entry.add_common_flags(parser)
    return parser.parse_args(list(argv))


def _bound(name: str) -> Optional[str]:
    """A bound path (str), or None (unbound, or a %gin.REQUIRED macro the build will name)."""
    value = gin_utils.query(name) if gin_utils.is_bound(name) else None
    return value if isinstance(value, str) and value else None


def _check_paths() -> None:
    """Before anything is read or written: the output folder can be made, the corpus is there."""
    output_dir = _bound("build.output_dir")
    if output_dir:
        user_paths.check_output("OUTPUT_DIR" if gin_utils.is_bound("OUTPUT_DIR") else "build.output_dir",
                                output_dir, kind="dir")
        entry.on_interrupt(f"every finished query is in {output_dir}")
    corpus = _bound("build.corpus_path")
    if corpus:
        user_paths.check_input("build.corpus_path", corpus)


def _main(argv: list[str]) -> int:
    files, bindings, paths, rest = gin_utils.split_gin_args(argv)
    flags = _flags(rest)
    entry.start(flags)
    configured = register_build()
    gin_utils.parse_gin_flags(files, bindings, paths)
    _check_paths()
    manifest = configured(write_gin_config=True)
    status = manifest["runs"][-1]["status"]
    labels = manifest["labelled"]
    log.info("build %s: %d queries labelled (%s); manifest at %s", status, labels["queries"],
             labels["by_query_type"], Path(manifest["build"]["output_dir"]) / MANIFEST)
    if status == "aborted":
        print(redact(f"twolar-build: error: the teacher aborted: {manifest['runs'][-1].get('aborted', '?')}"),
              file=sys.stderr)
    return EXIT_CODES.get(status, 1)


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """`twolar-build`: the exit codes above; a user error is one line on stderr (--debug: the traceback)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return entry.run_console("twolar-build", _main, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(console_main())
