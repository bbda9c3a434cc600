"""The train state (step, params, optimizer state), its logical axes and its shardings.

Optimizer-state shardings are derived from the parameters' logical axes: an optimizer leaf whose
path ends with a parameter's path and has the parameter's shape (AdamW's mu/nu, gradient
accumulators) is sharded like the parameter; Adafactor's factored moments (the parameter's shape
with one dimension dropped) keep the remaining dimensions' axes; anything else (step counters,
placeholders) is replicated.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from twolar_jax import partitioning


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; one pytree, so jit can donate it whole."""

    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _path_keys(path: tuple) -> tuple[str, ...]:
    return tuple(partitioning.tree_path_str((k,)) for k in path)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def opt_state_logical_axes(opt_state_shapes: Any, params_shapes: Any, param_axes: Any) -> Any:
    """Logical axes for every optimizer-state leaf, matched to parameters by path suffix and shape."""
    by_path: dict[tuple[str, ...], tuple[tuple, tuple]] = {}
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params_shapes)
    a_leaves = jax.tree_util.tree_structure(params_shapes).flatten_up_to(param_axes)
    for (path, leaf), axes in zip(p_flat, a_leaves):
        by_path[_path_keys(path)] = (tuple(leaf.shape), tuple(axes))

    def axes_for(path: tuple, leaf: Any) -> PartitionSpec:
        keys = _path_keys(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(keys)):  # longest suffix first
            hit = by_path.get(keys[start:])
            if hit is None:
                continue
            p_shape, p_axes = hit
            if shape == p_shape:
                return PartitionSpec(*p_axes)
            if len(shape) == len(p_shape) - 1:  # factored second moment: one dimension dropped
                for drop in range(len(p_shape)):
                    if p_shape[:drop] + p_shape[drop + 1:] == shape:
                        return PartitionSpec(*(p_axes[:drop] + p_axes[drop + 1:]))
            break
        return PartitionSpec(*([None] * len(shape)))

    return jax.tree_util.tree_map_with_path(axes_for, opt_state_shapes)


def state_logical_axes(state_shapes: TrainState, param_axes: Any) -> TrainState:
    return TrainState(
        step=PartitionSpec(),
        params=param_axes,
        opt_state=opt_state_logical_axes(state_shapes.opt_state, state_shapes.params, param_axes),
    )


def abstract_state(
    init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Shapes and dtypes of the train state, without allocating it."""
    return jax.eval_shape(lambda r: TrainState.create(init_params(r), optimizer), rng)


def state_shardings(
    state_shapes: TrainState, param_axes: Any, mesh: Mesh, rules: partitioning.LogicalRules
) -> TrainState:
    """NamedShardings for the whole state on `mesh` under `rules`."""
    axes = state_logical_axes(state_shapes, param_axes)
    return partitioning.tree_shardings(axes, state_shapes, mesh, rules)


def with_shardings(state_shapes: Any, shardings: Any) -> Any:
    """Abstract arrays carrying their target shardings: what orbax restores onto."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shapes,
        shardings,
    )


def init_sharded_state(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    shardings: TrainState,
) -> TrainState:
    """Initialise the state directly in its sharded layout (no full copy on one device)."""
    init = jax.jit(lambda r: TrainState.create(init_params(r), optimizer), out_shardings=shardings)
    return init(rng)


def place_params(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A fresh state from given params (e.g. an HF checkpoint), laid out on the mesh."""
    params = jax.device_put(params, shardings.params)
    init = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=shardings)
    return init(params)
