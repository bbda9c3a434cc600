"""Convert parameter trees between unrolled layers (`layers_0..layers_{n-1}`) and scanned ones (`layers`).

With `T5Config.scan_layers` the encoder and decoder keep one subtree `<stack>/layers` whose leaves carry a
leading axis of size n (logical axis 'layers'); unrolled, each layer has its own `<stack>/layers_<i>`.
Below the layer the names are the same, so the conversion is a stack or an index along axis 0: that is
what lets an orbax checkpoint, the HF name table (which knows only the unrolled names) and the sharding
dumps serve either form.

Pure functions over nested mappings. Leaves may be numpy arrays, jax arrays, jax.ShapeDtypeStruct or
logical-axis PartitionSpecs (a spec gains or loses its leading 'layers' entry), so the same calls convert
params, abstract shapes and `network.logical_axes` trees. Nothing else in the tree is touched.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from twolar_jax.model.config import T5Config

LAYERS_AXIS = "layers"  # the logical axis name of the stacked dimension (mapped to None in rules.gin)
SCANNED_NAME = "layers"  # the scanned stack's module name (t5x's)
STACKS = ("encoder", "decoder")


def _num_layers(config: T5Config, stack: str) -> int:
    return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def _layer_name(i: int) -> str:
    return f"layers_{i}"


def _map_leaves(fn, trees: Sequence[Any], path: str) -> Any:
    """fn(list of leaves, path) over structurally identical nested mappings; errors name the path."""
    first = trees[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for t in trees[1:]:
            if not isinstance(t, Mapping) or sorted(t) != sorted(keys):
                raise ValueError(f"{path}: the layers' parameter trees differ ({sorted(keys)} vs "
                                 f"{sorted(t) if isinstance(t, Mapping) else type(t).__name__})")
        return {k: _map_leaves(fn, [t[k] for t in trees], f"{path}/{k}") for k in keys}
    return fn(list(trees), path)


def _stack_leaf(leaves: list[Any], path: str) -> Any:
    first = leaves[0]
    if isinstance(first, PartitionSpec):
        if any(tuple(s) != tuple(first) for s in leaves):
            raise ValueError(f"{path}: the layers have different logical axes {[tuple(s) for s in leaves]}")
        return PartitionSpec(LAYERS_AXIS, *first)
    if isinstance(first, jax.ShapeDtypeStruct):
        if any(s.shape != first.shape or s.dtype != first.dtype for s in leaves):
            raise ValueError(f"{path}: the layers have different shapes or dtypes")
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    if any(np.shape(x) != np.shape(first) for x in leaves):
        raise ValueError(f"{path}: the layers have different shapes {[np.shape(x) for x in leaves]}")
    if isinstance(first, np.ndarray) or np.isscalar(first):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack_leaf(leaf: Any, n: int, path: str) -> list[Any]:
    if isinstance(leaf, PartitionSpec):
        if len(leaf) == 0 or leaf[0] not in (LAYERS_AXIS, None):
            raise ValueError(f"{path}: expected logical axes starting with {LAYERS_AXIS!r}, got {leaf}")
        return [PartitionSpec(*leaf[1:])] * n
    shape = tuple(np.shape(leaf)) if not isinstance(leaf, jax.ShapeDtypeStruct) else tuple(leaf.shape)
    if not shape or shape[0] != n:
        raise ValueError(f"{path}: expected a leading '{LAYERS_AXIS}' axis of size {n}, got shape {shape}")
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(shape[1:], leaf.dtype)] * n
    return [leaf[i] for i in range(n)]


def is_scanned(params: Mapping[str, Any]) -> bool:
    """Whether a tree holds scanned stacks (`encoder/layers`) rather than unrolled ones."""
    return any(SCANNED_NAME in params.get(stack, {}) for stack in STACKS)


def _per_stack(params: Mapping[str, Any], config: T5Config, convert) -> dict:
    """Apply convert(stack, tree, num_layers) -> new tree to each of the encoder/decoder stacks present."""
    out = dict(params)
    for stack in STACKS:
        if stack in params:
            out[stack] = convert(stack, dict(params[stack]), _num_layers(config, stack))
    return out


def stack_layers(params: Mapping[str, Any], config: T5Config) -> dict:
    """Unrolled tree (`<stack>/layers_<i>`) -> scanned tree (`<stack>/layers`, leaves stacked on axis 0)."""
    def convert(stack: str, tree: dict, n: int) -> dict:
        if SCANNED_NAME in tree:
            raise ValueError(f"{stack}: already scanned (has '{SCANNED_NAME}')")
        names = [_layer_name(i) for i in range(n)]
        missing = [name for name in names if name not in tree]
        extra = sorted(k for k in tree if k.startswith("layers_") and k not in names)
        if missing or extra:
            raise ValueError(f"{stack}: expected {names[0]}..{names[-1]} for {n} layers; missing {missing}, "
                             f"unexpected {extra}")
        layers = [tree.pop(name) for name in names]
        tree[SCANNED_NAME] = _map_leaves(_stack_leaf, layers, f"{stack}/{SCANNED_NAME}")
        return tree
    return _per_stack(params, config, convert)


def unstack_layers(params: Mapping[str, Any], config: T5Config) -> dict:
    """Scanned tree (`<stack>/layers`) -> unrolled tree (`<stack>/layers_<i>`); the inverse of stack_layers."""
    def convert(stack: str, tree: dict, n: int) -> dict:
        if SCANNED_NAME not in tree:
            raise ValueError(f"{stack}: not scanned (no '{SCANNED_NAME}' subtree)")
        scanned = tree.pop(SCANNED_NAME)
        per_leaf = _map_leaves(lambda leaves, path: _unstack_leaf(leaves[0], n, path), [scanned],
                               f"{stack}/{SCANNED_NAME}")
        for i in range(n):
            tree[_layer_name(i)] = _select(per_leaf, i)
        return tree
    return _per_stack(params, config, convert)


def _select(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _select(v, i) for k, v in tree.items()}
    return tree[i]


def match_layout(params: Mapping[str, Any], config: T5Config) -> dict:
    """params in the form config.scan_layers asks for, whichever form they come in (a no-op if it fits)."""
    scanned = is_scanned(params)
    if config.scan_layers and not scanned:
        return stack_layers(params, config)
    if not config.scan_layers and scanned:
        return unstack_layers(params, config)
    return dict(params)
