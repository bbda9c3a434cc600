"""Dump the trainer's real seqio batches to .npz files, for tests/test_seqio_resume.py.

    python tests/seqio_resume_worker.py TRAIN_JSONL OUT_DIR --take N [--skip K] [--ref N --kill]

For each source in SOURCES, iterates data_pipeline.seqio_input.batches.seqio_batches over
DistillFiles(TRAIN_JSONL) with skip_batches=K and writes the next N batches to
OUT_DIR/<source>/<K + i>.npz. With --ref N it first writes N batches of an uninterrupted iterator to
OUT_DIR/ref/<source>/. With --kill it SIGKILLs itself once the files are written, with its iterators
(and their prefetch threads) still open: the resumed run must owe nothing to a clean shutdown.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.seqio_input.batches import seqio_batches  # noqa: E402
from data_pipeline.seqio_input.tasks import DistillFiles  # noqa: E402

SOURCES = ("twolar_distill", "twolar_distill_mix")
OPTIONS = dict(split="train", batch_size=4, group_size=4, max_length=32, shuffle=True, seed=7, repeat=True,
               shard_index=0, num_shards=1)


def batches(train_path: str, source: str, skip: int) -> Iterator[dict[str, np.ndarray]]:
    return seqio_batches(task_or_mixture=source, files=DistillFiles(train_path=train_path), skip_batches=skip,
                         **OPTIONS)


def dump(it: Iterator[dict[str, np.ndarray]], out: Path, first: int, n: int) -> None:
    """Batches first..first+n-1 of `it` as <index>.npz, each written whole before it is renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(itertools.islice(it, n), first):
        tmp = out / f".{i}.npz"
        with tmp.open("wb") as f:
            np.savez(f, **batch)
        tmp.rename(out / f"{i}.npz")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_path")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--take", type=int, required=True)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--ref", type=int, default=0)
    parser.add_argument("--kill", action="store_true")
    args = parser.parse_args()
    if args.ref:
        for source in SOURCES:
            dump(batches(args.train_path, source, 0), args.out_dir / "ref" / source, 0, args.ref)
    open_iterators = []
    for source in SOURCES:
        it = batches(args.train_path, source, args.skip)
        dump(it, args.out_dir / source, args.skip, args.take)
        open_iterators.append(it)
    if args.kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
