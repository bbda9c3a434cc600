"""Training summaries: TensorBoard scalars (tensorboardX) plus an append-only JSONL of the same numbers.

The JSONL (`MODEL_DIR/metrics/<split>.jsonl`, one `{"step": k, ...}` line per logged step, flushed
and fsynced) is what scripts and tests read; TensorBoard is for people. Only process 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax

from twolar_jax.durable_io import read_jsonl, truncate_jsonl


class SummaryWriter:
    """Scalars for one split ('train', 'validation'), under MODEL_DIR/tb/<split> and MODEL_DIR/metrics.

    `truncate_after=k` drops JSONL records of steps after k first: a run resumed from step k's checkpoint
    logs those steps again, and the file must not hold them twice. A step already in the file is not
    written again (a finished run that is started again re-validates its last step to the same numbers).
    """

    def __init__(self, model_dir: str | os.PathLike, split: str, *, tensorboard: bool = True,
                 truncate_after: int | None = None):
        self.enabled = jax.process_index() == 0
        self.split = split
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        model_dir = Path(model_dir)
        path = model_dir / "metrics" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None:
            dropped = truncate_jsonl(path, lambda r: int(r.get("step", 0)) <= truncate_after)
            if dropped:
                logging.getLogger("twolar_jax.train").info(
                    "%s: dropped %d records logged after step %d (the run resumes from there)", path, dropped,
                    truncate_after)
        self._steps = {int(r.get("step", -1)) for _, r in read_jsonl(path)}
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter as TBWriter

            self._tb = TBWriter(str(model_dir / "tb" / split))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled or int(step) in self._steps:
            return
        self._steps.add(int(step))
        clean = {k: _to_float(v) for k, v in values.items()}
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(tensorboard_tag(self.split, name), value, step)
        self._jsonl.write(json.dumps({"step": int(step), **clean}, sort_keys=True) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

    def text(self, step: int, name: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


# The characters a TensorBoard tag may hold (tensorboardX replaces the others, logging each time it does).
_TAG_ILLEGAL = re.compile(r"[^-/\w.]")


def tensorboard_tag(split: str, name: str) -> str:
    """`split/name` with characters TensorBoard does not allow as `_` ("ndcg@10" -> "ndcg_10"): the tag
    tensorboardX would write anyway, without its log line for every scalar of every step."""
    return _TAG_ILLEGAL.sub("_", f"{split}/{name}").lstrip("/")


def _to_float(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def read_metrics(model_dir: str | os.PathLike, split: str = "train") -> list[dict[str, float]]:
    """The JSONL records of a run, in file order."""
    path = Path(model_dir) / "metrics" / f"{split}.jsonl"
    return [record for _, record in read_jsonl(path)]


def metrics_by_step(model_dir: str | os.PathLike, split: str = "train") -> dict[int, dict[str, float]]:
    """Last record per step."""
    return {int(r["step"]): r for r in read_metrics(model_dir, split)}
