"""Re-run the first stages of eval/reference_scores.yaml and diff against the recorded scores (2CR style).

    python -m eval.reference [--datasets trec_dl/dl19 beir/scifact] [--cache_dir DIR]

Exits 1 when a score moved; prints one line per dataset and measure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from twolar_jax import entry, user_paths
from twolar_jax.errors import OptionError

REFERENCE_FILE = Path(__file__).with_name("reference_scores.yaml")


def load_reference(path: str | Path = REFERENCE_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def reproduce(name: str, *, data_dir: str | None = None, cache_dir: str | None = None,
              output_dir: str | None = None) -> dict[str, float]:
    """The bm25-mode scores of one reference dataset, computed now."""
    from eval.run import FirstStage, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        return evaluate(output_dir=output_dir or tmp, datasets=[name], data_dir=data_dir, mode="bm25",
                        first_stage=FirstStage(cache_dir=cache_dir))[name]


def compare(name: str, entry: dict, got: dict[str, float]) -> list[str]:
    """Problems (empty when all good): recorded scores at 4 decimals, published within tolerance."""
    problems = []
    for measure, expected in entry["scores"].items():
        if round(got[measure], 4) != round(float(expected), 4):
            problems.append(f"{name} {measure}: got {got[measure]:.4f}, recorded {expected:.4f}")
    for measure, published in entry.get("published", {}).items():
        if abs(got[measure] - float(published)) > float(entry["tolerance"]):
            problems.append(f"{name} {measure}: got {got[measure]:.4f}, published {published} "
                            f"(tolerance {entry['tolerance']})")
    return problems


def _main(argv: list[str]) -> int:
    parser = entry.ArgumentParser(prog="python -m eval.reference", description=__doc__.split("\n")[0],
                                     epilog="gin files: none (plain flags; the datasets come from "
                                            f"{REFERENCE_FILE.name}).")
    parser.add_argument("--datasets", nargs="*", help="subset of the reference file's datasets")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--cache_dir", default=None)
    entry.add_common_flags(parser, log_level="WARNING", compile_cache=False)
    args = parser.parse_args(argv)
    entry.start(args)
    reference = load_reference()
    names = args.datasets or list(reference)
    unknown = [n for n in names if n not in reference]
    if unknown:
        raise OptionError(f"--datasets: {unknown} not in {REFERENCE_FILE} (known: {sorted(reference)})")
    if args.data_dir:
        user_paths.check_input("--data_dir", args.data_dir, kind="dir")
    if args.cache_dir:
        user_paths.check_output("--cache_dir", args.cache_dir, kind="dir")
    failed = False
    for name in names:
        got = reproduce(name, data_dir=args.data_dir, cache_dir=args.cache_dir)
        problems = compare(name, reference[name], got)
        failed |= bool(problems)
        for measure, expected in reference[name]["scores"].items():
            print(f"{name:16s} {measure:8s} expected {expected:.4f} got {got[measure]:.4f}")
        for p in problems:
            print("FAIL", p)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 (all reproduced), 1 (a score moved), or 2 with one line on stderr for a user error."""
    return entry.run_console("python -m eval.reference", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
