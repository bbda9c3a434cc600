r"""`twolar compile` / `python -m twolar_jax.aot`: compile a train step or the scorer for a TPU slice, never run it.

    python -m twolar_jax.aot --topology=v5e:4x4 --job=train \
        --gin_file=experiments/twolar_flan_t5_xl_rank_net.gin --gin.NUM_MICROBATCHES=2
    python -m twolar_jax.aot --topology=v5e:2x4 --job=score --gin_file=models/flan_t5_xxl.gin \
        --gin_file=mesh/fsdp.gin --batch_size=64 --max_length=512 --dtype=bfloat16

Per job it prints the mesh, bytes per chip (arguments, outputs, aliased, temporaries, generated code),
per_chip_gib against the chip's HBM and fits=True/False, FLOPs, the collectives in the compiled HLO, the
attention path, and lower_s / compile_s. See docs/aot.md. JAX_PLATFORMS defaults to cpu here: the
compile targets the topology's devices, and nothing needs a local accelerator.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax loads (twolar_jax.aot's __init__ imports nothing)

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, Optional, Sequence  # noqa: E402

from twolar_jax import entry, gin_utils, user_paths  # noqa: E402
from twolar_jax.aot import gin_jobs, topology  # noqa: E402
from twolar_jax.aot.report import Report  # noqa: E402
from twolar_jax.model.config import COMPUTE_DTYPES  # noqa: E402

JOBS = ("train", "score", "all")


def compile_jobs(*, topology_name: str, jobs: Sequence[str], gin_files: Sequence[str],
                 gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (), batch_size: int = 32,
                 max_length: int = 512, dtype: Optional[str] = None,
                 dump_dir: Optional[str] = None) -> Iterator[Report]:
    """Compile each job ("train", "score") of the gin files for `topology_name`, yielding a Report as each ends."""
    from twolar_jax.aot import programs

    target = topology.parse_topology(topology_name)
    # Every gin binding is read (and a bad or missing one reported) before libtpu builds the slice.
    gin_jobs.parse_job_gin(gin_files, gin_bindings, search_paths, run_defaults="train" in jobs)
    specs = {job: gin_jobs.train_job() if job == "train" else
             gin_jobs.score_job(batch_size=batch_size, max_length=max_length, dtype=dtype) for job in jobs}
    devices = topology.topology_devices(target)
    for job in jobs:
        if job == "train":
            program = programs.train_program(specs[job], devices)
        else:
            program = programs.score_program(specs[job], devices)
        report = programs.compile_program(program, target, dump_dir=dump_dir)
        if dump_dir:
            Path(dump_dir, f"{job}.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        yield report


def _flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = entry.parser_with_gin_help(
        "twolar compile", __doc__.split("\n")[0], "models/", "mesh/", "experiments/",
        note="A train compile reads runs/distill_train.gin before the given files (a model file alone gets the "
             "run's defaults). MODEL_DIR and DISTILL_JSONL get placeholders: a compile reads no data and writes no "
             "checkpoint.")
    parser.add_argument("--topology", required=True, help=f"the TPU slice: {topology.TOPOLOGY_FORM}")
    parser.add_argument("--job", choices=JOBS, default="train", help="what to compile (all: train, then score)")
    parser.add_argument("--batch_size", type=entry.positive_int, default=32, help="score job: rows of token ids per call")
    parser.add_argument("--max_length", type=entry.positive_int, default=512, help="score job: tokens per row")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                        help="score job: compute and parameter dtype (default: the model's COMPUTE_DTYPE)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per job instead")
    parser.add_argument("--dump_dir", default=None, help="write <job>.hlo.txt (compiled HLO) and <job>.json here")
    # No persistent compilation cache: a cached executable would report compile_s of a cache read.
    entry.add_common_flags(parser, log_level="WARNING", compile_cache=False)
    return parser.parse_args(list(argv))


def _main(argv: list[str]) -> int:
    files, bindings, paths, rest = gin_utils.split_gin_args(argv)
    flags = _flags(rest)
    entry.start(flags)
    jobs = ("train", "score") if flags.job == "all" else (flags.job,)
    if flags.dump_dir:
        user_paths.check_output("--dump_dir", flags.dump_dir, kind="dir")
        Path(flags.dump_dir).mkdir(parents=True, exist_ok=True)
    for report in compile_jobs(topology_name=flags.topology, jobs=jobs, gin_files=files, gin_bindings=bindings,
                               search_paths=paths, batch_size=flags.batch_size, max_length=flags.max_length,
                               dtype=flags.dtype, dump_dir=flags.dump_dir):
        print(json.dumps(report.to_dict()) if flags.json else "\n".join(report.lines()), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0, or 2 with one line on stderr for an option, topology or gin file a user can fix (--debug: traceback)."""
    return entry.run_console("twolar compile", _main, argv)


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """`twolar compile` and `python -m twolar_jax.aot`."""
    return main(argv)
