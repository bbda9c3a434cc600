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


def _stack_of(path: tuple) -> str | None:
    """The scanned stack (`<stack>/layers`, T5Config.scan_layers) a leaf lives under, whose leaves carry one
    extra leading axis, the layers; None for any other leaf."""
    from twolar_jax.model.scan import SCANNED_NAME

    names = [str(getattr(key, "key", key)) for key in path]
    return "_".join(names[:names.index(SCANNED_NAME) + 1]) if SCANNED_NAME in names else None


def _is_stacked(path: tuple) -> bool:
    return _stack_of(path) is not None


def _is_matrix(path: tuple, param: Any) -> bool:
    """At least 2-D per layer: a stacked leaf's layer axis must not turn a layer-norm scale into a "matrix"."""
    return param.ndim - int(_is_stacked(path)) >= 2


def _decay_mask(kind: str, *, per_layer: bool = False) -> Callable[[Any], Any] | None:
    """Which leaves weight decay touches. per_layer: the optimizer sees one layer at a time (`layerwise`),
    so a leaf's own rank decides and no layer axis is discounted."""
    if kind == "all":
        return None  # TWOLAR (torch AdamW over model.parameters()) decays every parameter
    if kind == "matrices":
        if per_layer:
            return lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
        return lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
    raise OptionError(f"weight_decay_mask={kind!r}: expected one of {DECAY_MASKS}")


UNSTACKED = "unstacked"  # `layerwise`'s label for leaves outside scanned stacks (these are "encoder_layers", ...)


def layerwise(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with every layer of a scanned stack treated as its own parameter, as in the unrolled model.

    Adafactor reads whole leaves: its parameter scaling and update clipping take a leaf's RMS and its
    factored moments average over a leaf's rows and columns. On a stacked [layers, ...] leaf all layers
    would share one scale and one clip (t5x's Adafactor treats its scanned axis as a batch dimension for
    this reason). Here `inner` runs under jax.vmap over the layer axis of stacked leaves and as it is on
    the rest, so a scanned run takes the same steps as an unrolled one. A tree with no stacked leaf gets
    `inner` itself: the optimizer state of unrolled runs is unchanged."""
    per_layer = optax.GradientTransformation(
        jax.vmap(inner.init),
        lambda updates, state, params=None: jax.vmap(inner.update)(updates, state, params))

    def split(tree: Any) -> optax.GradientTransformation:
        """`inner` on unstacked leaves, `per_layer` on each stack's (stacks differ in depth); `inner` alone
        for a tree without stacks."""
        labels = jax.tree_util.tree_map_with_path(lambda path, _: _stack_of(path) or UNSTACKED, tree)
        stacks = sorted(set(jax.tree_util.tree_leaves(labels)) - {UNSTACKED})
        if not stacks:
            return inner
        return optax.multi_transform({UNSTACKED: inner, **{stack: per_layer for stack in stacks}}, labels)

    def init(params: Any) -> Any:
        return split(params).init(params)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return split(updates).update(updates, state, params)

    return optax.GradientTransformation(init, update)


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
        inner = layerwise(optax.adafactor(
            lr,
            decay_rate=adafactor_decay_rate,
            multiply_by_parameter_scale=True,
            clipping_threshold=1.0,
            factored=adafactor_factored,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=_decay_mask(weight_decay_mask, per_layer=True),
        ))
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
