"""Optax optimizers and learning-rate schedules for distillation.

TWOLAR's recipe is AdamW (lr 5e-5 constant, weight decay 0.01, torch defaults b1 0.9, b2 0.999,
eps 1e-8) after a global-norm clip of 1.0; t5x fine-tunes with Adafactor (lr 1e-3 constant,
decay 0.8, parameter scaling). Gradient accumulation is not an optimizer wrapper here: the train step
scans over micro-batches and applies one update (see trainer.py), so "32 queries per update" is a
global batch of 32 split into `num_microbatches` pieces, and a step is always one update.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from twolar_jax.errors import OptionError, check_choice

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor")
DECAY_MASKS = ("all", "matrices")


def make_schedule(
    *,
    learning_rate: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_learning_rate_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then constant / linear / cosine / rsqrt decay.

    rsqrt is t5x's pre-training schedule: lr * sqrt(warmup / max(step, warmup)) after warmup.
    """
    check_choice("schedule", schedule, SCHEDULES)
    if warmup_steps < 0:
        raise OptionError(f"warmup_steps must be >= 0, got {warmup_steps}")
    end = learning_rate * end_learning_rate_ratio
    if schedule in ("linear", "cosine"):
        if total_steps is None or total_steps <= warmup_steps:
            raise OptionError(f"schedule {schedule!r} needs total_steps > warmup_steps ({total_steps} <= {warmup_steps})")
        decay_steps = total_steps - warmup_steps
        if schedule == "linear":
            decay = optax.linear_schedule(learning_rate, end, decay_steps)
        else:
            decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_learning_rate_ratio)
    elif schedule == "rsqrt":
        start = max(warmup_steps, 1)

        def decay(count):
            return learning_rate * jnp.sqrt(start / jnp.maximum(count + start, start))
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _is_matrix(path: tuple, param: Any) -> bool:
    """At least 2-D per layer: under a scanned stack (`<stack>/layers`, T5Config.scan_layers) every leaf
    carries one extra leading axis, which must not turn a layer-norm scale into a "matrix"."""
    from twolar_jax.model.scan import SCANNED_NAME

    stacked = any(getattr(key, "key", None) == SCANNED_NAME for key in path)
    return param.ndim - int(stacked) >= 2


def _decay_mask(kind: str) -> Callable[[Any], Any] | None:
    if kind == "all":
        return None  # TWOLAR (torch AdamW over model.parameters()) decays every parameter
    if kind == "matrices":
        return lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
    raise OptionError(f"weight_decay_mask={kind!r}: expected one of {DECAY_MASKS}")


def make_optimizer(
    *,
    name: str = "adamw",
    learning_rate: float = 5e-5,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_learning_rate_ratio: float = 0.0,
    weight_decay: float = 0.01,
    weight_decay_mask: str = "all",
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    adafactor_decay_rate: float = 0.8,
    adafactor_factored: bool = True,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). The schedule is returned too so the trainer can log the step's lr."""
    check_choice("optimizer", name, OPTIMIZERS)
    lr = make_schedule(
        learning_rate=learning_rate,
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_learning_rate_ratio=end_learning_rate_ratio,
    )
    if name == "adamw":
        inner = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask(weight_decay_mask))
    else:
        inner = optax.adafactor(
            lr,
            decay_rate=adafactor_decay_rate,
            multiply_by_parameter_scale=True,
            clipping_threshold=1.0,
            factored=adafactor_factored,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=_decay_mask(weight_decay_mask),
        )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, inner), lr


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of a run as one gin-built object (`train.optimizer = @OptimizerConfig()`).

    Defaults are TWOLAR's recipe: AdamW, lr 5e-5 constant, weight decay 0.01 on every parameter, clip 1.0.
    """

    name: str = "adamw"
    learning_rate: float = 5e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.01
    weight_decay_mask: str = "all"
    clip_norm: Optional[float] = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    adafactor_decay_rate: float = 0.8
    adafactor_factored: bool = True

    def __post_init__(self) -> None:
        check_choice("OptimizerConfig.name", self.name, OPTIMIZERS)
        check_choice("OptimizerConfig.schedule", self.schedule, SCHEDULES)
        check_choice("OptimizerConfig.weight_decay_mask", self.weight_decay_mask, DECAY_MASKS)
        if not self.learning_rate > 0:
            raise OptionError(f"OptimizerConfig.learning_rate={self.learning_rate}: must be > 0")

    def build(self, total_steps: Optional[int]) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """(optimizer, schedule) for a run of `total_steps` updates."""
        return make_optimizer(total_steps=total_steps, **dataclasses.asdict(self))
