"""Training summaries: TensorBoard scalars (tensorboardX) plus an append-only JSONL of the same numbers.

The JSONL (`MODEL_DIR/metrics/<split>.jsonl`, one `{"step": k, ...}` line per logged step, flushed
and fsynced) is what scripts and tests read; TensorBoard is for people. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax


class SummaryWriter:
    """Scalars for one split ('train', 'validation'), under MODEL_DIR/tb/<split> and MODEL_DIR/metrics."""

    def __init__(self, model_dir: str | os.PathLike, split: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.split = split
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        model_dir = Path(model_dir)
        (model_dir / "metrics").mkdir(parents=True, exist_ok=True)
        self._jsonl = open(model_dir / "metrics" / f"{split}.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter as TBWriter

            self._tb = TBWriter(str(model_dir / "tb" / split))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in values.items()}
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(f"{self.split}/{name}", value, step)
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


def _to_float(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def read_metrics(model_dir: str | os.PathLike, split: str = "train") -> list[dict[str, float]]:
    """The JSONL records of a run, in file order (a resumed run may repeat steps after a crash)."""
    path = Path(model_dir) / "metrics" / f"{split}.jsonl"
    return list(_iter_jsonl(path)) if path.exists() else []


def _iter_jsonl(path: Path) -> Iterator[dict[str, float]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def metrics_by_step(model_dir: str | os.PathLike, split: str = "train") -> dict[int, dict[str, float]]:
    """Last record per step (a step re-run after resuming replaces the earlier one)."""
    return {int(r["step"]): r for r in read_metrics(model_dir, split)}
