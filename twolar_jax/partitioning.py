"""Meshes, logical-axis rules and shardings: the one place where parallelism is decided.

The model only names axes (t5x style: 'batch', 'embed', 'heads', ...); the table of logical-axis
rules (held in gin, `gin/mesh/rules.gin`) maps those names onto the mesh axes ('data', 'fsdp',
'model'). Changing a run from one CPU to a pod slice changes only the mesh shape and, if wanted, the
rules; no model or trainer code.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twolar_jax import resources
from twolar_jax.errors import OptionError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
RULES_FILE = "mesh/rules.gin"  # under the shipped gin folder
RULES_MACRO = "LOGICAL_AXIS_RULES"

LogicalRules = Sequence[tuple[str, Any]]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- mesh
def fill_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace the one -1 in `shape` by what the device count leaves (MaxText's auto-fill)."""
    shape = tuple(int(s) for s in shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1:
        raise OptionError(f"mesh shape {shape}: at most one -1 is allowed")
    if any(s == 0 or s < -1 for s in shape):
        raise OptionError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise OptionError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise OptionError(f"mesh shape {shape} needs {math.prod(shape)} devices, but {num_devices} are in use")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with one -1 auto-filled.

    Axis types are Auto on purpose: jax >= 0.7 `make_mesh` defaults to Explicit axes, where the
    sharding is part of every array's type and each op must agree with it. The t5x style we follow
    instead gives jit in/out shardings plus logical constraints as hints and lets the compiler
    propagate the rest; that is what Auto axes mean.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise OptionError(f"mesh shape {tuple(shape)} does not match axis names {tuple(axis_names)}")
    filled = fill_mesh_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(axis_names)
    return jax.make_mesh(filled, tuple(axis_names), axis_types=auto, devices=devices)


def mesh_shape_str(mesh: Mesh) -> str:
    """'data=2,fsdp=1,model=4' for logs and summaries."""
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


# ---------------------------------------------------------------------------------------- rules
def load_logical_axis_rules(path: str | os.PathLike | None = None, macro: str = RULES_MACRO) -> tuple:
    """Read the rule table from its gin file without touching gin's global config.

    Training binds the same macro through gin; tests and tools that run outside gin read it here, so
    the table exists once.
    """
    from gin import config as gin_config
    from gin import config_parser

    path = path or resources.gin_dir() / RULES_FILE
    text = Path(path).read_text()
    delegate = gin_config.ParserDelegate(skip_unknown=True)
    for statement in config_parser.ConfigParser(text, delegate):
        if isinstance(statement, config_parser.BindingStatement) and statement.selector == macro:
            return normalize_rules(statement.value)
    raise ValueError(f"{path}: no {macro} = [...] table found")


def normalize_rules(rules: LogicalRules) -> tuple[tuple[str, Any], ...]:
    """Check the rule table's shape early, with a message that names the bad entry."""
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise OptionError(f"logical axis rule #{i} {rule!r}: expected (logical_name, mesh_axes)")
        name, target = rule
        if isinstance(target, list):
            target = tuple(target)
        if not (target is None or isinstance(target, str) or
                (isinstance(target, tuple) and all(isinstance(t, str) for t in target))):
            raise OptionError(f"logical axis rule #{i} {rule!r}: mesh axes must be None, a name or a tuple of names")
        out.append((name, target))
    return tuple(out)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_rules(rules: Any, *, option: str = "logical_axis_rules") -> tuple[tuple[str, Any], ...]:
    """The rule table (None: gin/mesh/rules.gin) normalized, and checked to name only this project's mesh
    axes; errors name `option` and the bad rule. The one public check for any caller that takes rules."""
    if rules is None:
        return load_logical_axis_rules()
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise OptionError(f"{option}={rules!r}: expected a sequence of (logical_name, mesh_axes)")
    try:
        rules = normalize_rules(rules)
    except OptionError as e:
        raise OptionError(f"{option}: {e}") from None
    for name, target in rules:
        unknown = [a for a in _mesh_axes_of(target) if a not in MESH_AXES]
        if unknown:
            raise OptionError(f"{option}: rule ({name!r}, {target!r}) names mesh axes {unknown}; "
                              f"the mesh has {MESH_AXES}")
    return rules


def logical_to_spec(
    logical_axes: PartitionSpec | Sequence[str | None],
    rules: LogicalRules,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Logical names -> mesh PartitionSpec (flax's priority rules: a mesh axis is used at most once).

    With `shape` and `mesh`, a dimension that the assigned mesh axes do not divide is replicated
    instead (for example 4 heads on an 8-way model axis): jit would refuse the uneven split, and a
    partly-sharded layout still trains correctly. The golden sharding dumps show where this happens.
    """
    names = tuple(logical_axes)
    spec = list(nn.logical_to_mesh_axes(names, list(rules)))
    if shape is not None and mesh is not None:
        if len(shape) != len(spec):
            raise ValueError(f"logical axes {names} do not match an array of shape {tuple(shape)}")
        for i, (dim, entry) in enumerate(zip(shape, spec)):
            kept = []
            for axis in _mesh_axes_of(entry):
                size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
                if dim % size == 0:
                    kept.append(axis)
            if tuple(kept) != _mesh_axes_of(entry):
                log.debug("dim %d (%s) of size %d: mesh axes %s -> %s", i, names[i], dim, entry, kept)
            spec[i] = None if not kept else (kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def tree_shardings(logical_tree: Any, shapes: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a pytree, from its logical axes and its (abstract) arrays' shapes."""
    leaves, treedef = jax.tree_util.tree_flatten(logical_tree, is_leaf=_is_spec)
    shape_leaves = treedef.flatten_up_to(shapes)
    out = [
        NamedSharding(mesh, logical_to_spec(axes, rules, shape=np.shape(arr), mesh=mesh))
        for axes, arr in zip(leaves, shape_leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------- batch
def batch_spec(ndim: int, rules: LogicalRules) -> PartitionSpec:
    """The leading (batch) dimension follows the 'batch' rule; the others are not split."""
    return PartitionSpec(*nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), list(rules)))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, batch_spec(np.ndim(v), rules)) for k, v in batch.items()}


def batch_parallelism(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways the batch dimension is split: a global batch must be a multiple of this."""
    spec = batch_spec(1, rules)
    return math.prod(mesh.shape[a] for a in _mesh_axes_of(spec[0]))


def shard_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: LogicalRules
) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's slice of the batch (its own data shard).

    Every process passes the rows it read itself; the global batch is `process_count` times larger.
    """
    out = {}
    nproc = jax.process_count()
    for name, value in local_batch.items():
        value = np.asarray(value)
        sharding = NamedSharding(mesh, batch_spec(value.ndim, rules))
        global_shape = (value.shape[0] * nproc,) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ------------------------------------------------------------------------------------- contexts
class activation_context:
    """Mesh + rules in scope while tracing, so the model's logical constraints take effect."""

    def __init__(self, mesh: Mesh, rules: LogicalRules):
        self._mesh_ctx = jax.set_mesh(mesh)
        self._rules_ctx = nn.logical_axis_rules(list(rules))

    def __enter__(self):
        self._mesh_ctx.__enter__()
        self._rules_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------ multihost
def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    process_count: int | None = None,
    process_index: int | None = None,
    multiprocess: bool = False,
) -> None:
    """Call jax.distributed.initialize when asked to (t5x's --multiprocess_gpu flags).

    On TPU pods and managed clusters jax finds the values itself; pass them for bare GPU hosts.
    """
    if not (multiprocess or coordinator_address):
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=process_count,
        process_id=process_index,
    )


# ------------------------------------------------------------------------------- sharding dumps
def spec_to_json(spec: PartitionSpec) -> list:
    """A PartitionSpec as JSON: one entry per dimension, None, a name, or a list of names."""
    return [list(e) if isinstance(e, tuple) else e for e in tuple(spec)]


def tree_path_str(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def sharding_dump(shardings: Any) -> dict[str, list]:
    """{'encoder/layers_0/attention/query/kernel': ['fsdp', 'model', None], ...} for golden files."""
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {tree_path_str(path): spec_to_json(s.spec) for path, s in flat}


def sharded_fraction(shardings: Any, shapes: Any) -> float:
    """Fraction of parameter elements that are split over at least one mesh axis (MaxText's tolerance)."""
    s_leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    a_leaves = jax.tree_util.tree_leaves(shapes)
    total = sum(math.prod(np.shape(a)) for a in a_leaves) or 1
    split = sum(
        math.prod(np.shape(a))
        for s, a in zip(s_leaves, a_leaves)
        if any(e is not None and s.mesh.shape[ax] > 1 for e in s.spec for ax in _mesh_axes_of(e))
    )
    return split / total
