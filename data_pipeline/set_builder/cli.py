"""`twolar-build` / `python -m data_pipeline.set_builder`: build (or resume) a distillation set from gin.

    twolar-build --gin_file=runs/build_scifact_offline.gin --gin.OUTPUT_DIR="'/tmp/distill'"
    twolar-build --gin_file=runs/build_msmarco_openai.gin --gin.OUTPUT_DIR="'runs/distill'" ...
    twolar-build --gin_file=... --dry_run --price_per_million_input=0.5 --price_per_million_output=1.5

--dry_run runs the local stages and prints one line pricing the teacher stage (data_pipeline/set_builder/
pricing.py), with no LLM call.

Exit codes: 0 when every query is labelled, 1 when some are left (re-run to retry them), 2 when the
teacher aborted (bad key, unknown model) or the configuration is wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from data_pipeline.set_builder.build import MANIFEST
from data_pipeline.set_builder.configurables import register_build
from data_pipeline.set_builder.pricing import parse_price
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
    parser.add_argument("--dry_run", action="store_true",
                        help="run the local stages (queries, candidates), make no LLM call, print one line: the "
                             "teacher windows, prompt and completion tokens and their cost")
    for side in ("input", "output"):
        parser.add_argument(f"--price_per_million_{side}", type=_price, default=None, metavar="USD",
                            help=f"USD per million {side} tokens (gin: build.price_per_million_{side}; default: "
                                 f"the teacher's per-1K price x 1000)")
    entry.add_common_flags(parser)
    return parser.parse_args(list(argv))


def _price(text: str) -> float:
    """An argparse type: a price >= 0, else argparse's one-line error naming the flag."""
    try:
        return parse_price(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


@contextlib.contextmanager
def _no_key_needed(dry_run: bool) -> Iterator[None]:
    """A dry run makes no call, so it needs no API key: a placeholder stands in when none is set."""
    if not dry_run or os.environ.get("OPENAI_API_KEY"):
        yield
        return
    os.environ["OPENAI_API_KEY"] = "dry-run-makes-no-call"
    try:
        yield
    finally:
        os.environ.pop("OPENAI_API_KEY", None)


def _overrides(flags: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as build() arguments (unset ones leave gin's bindings alone)."""
    given = {"dry_run": True if flags.dry_run else None, "price_per_million_input": flags.price_per_million_input,
             "price_per_million_output": flags.price_per_million_output}
    return {name: value for name, value in given.items() if value is not None}


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
    with _no_key_needed(flags.dry_run):
        manifest = configured(write_gin_config=True, **_overrides(flags))
    if "dry_run" in manifest:
        print(manifest["line"], flush=True)
        return 0
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
