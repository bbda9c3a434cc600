"""One partitioner for every program: the train step, the validation step, the Reranker's scoring program
and both `twolar compile` jobs.

It holds the mesh and the logical-axis rules, and turns a pure function into a jitted one with explicit
in/out shardings, donation and the compiler options of the mesh's platform, traced with the rules in scope
(so the model's logical constraints become sharding constraints). Batch shardings come from the model's
feature declaration (`FeatureSet.logical_axes`), parameter shardings from its logical axes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from twolar_jax import compiler_options, partitioning
from twolar_jax.ranking.features import FeatureSet


class PartitionedFunction:
    """A jitted function that runs, lowers and traces with the mesh and rules in scope; calls after the
    first reuse the compiled executable."""

    def __init__(self, fn: Callable, partitioner: "Partitioner", *, in_shardings: Any, out_shardings: Any,
                 donate_argnums: Sequence[int] = ()):
        self.partitioner = partitioner
        self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=tuple(donate_argnums),
                              compiler_options=compiler_options.for_mesh(partitioner.mesh))

    def __call__(self, *args: Any) -> Any:
        with self.partitioner.activation_context():
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with self.partitioner.activation_context():
            return self.jitted.lower(*args)

    def trace(self, *args: Any) -> Any:
        """The traced function (its jaxpr; `.lower()` continues), e.g. from abstract arguments (twolar_jax.aot)."""
        with self.partitioner.activation_context():
            return self.jitted.trace(*args)


class Partitioner:
    """A mesh (data, fsdp, model) and the rule table that maps logical axes onto it."""

    def __init__(self, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
        self.mesh, self.rules = mesh, tuple(rules)

    @classmethod
    def create(cls, mesh_shape: Sequence[int], *, devices: Sequence[jax.Device] | None = None,
               logical_axis_rules: Any = None, option: str = "logical_axis_rules") -> "Partitioner":
        """The mesh over `devices` (default: all devices of all processes) and the checked rules (default:
        gin/mesh/rules.gin); errors name `option` and `mesh_shape`."""
        rules = partitioning.check_rules(logical_axis_rules, option=option)
        return cls(partitioning.make_mesh(mesh_shape, devices=devices), rules)

    # --- layout -----------------------------------------------------------------------------------
    @property
    def batch_parallelism(self) -> int:
        """How many ways the batch dimension is split: a global batch must be a multiple of this."""
        return partitioning.batch_parallelism(self.mesh, self.rules)

    def replicated(self) -> NamedSharding:
        return partitioning.replicated(self.mesh)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, partitioning.logical_to_spec(logical_axes, self.rules, shape=shape,
                                                                     mesh=self.mesh if shape is not None else None))

    def param_shardings(self, logical_tree: Any, shapes: Any) -> Any:
        """NamedShardings of a parameter (or state) tree from its logical axes and its arrays' shapes."""
        return partitioning.tree_shardings(logical_tree, shapes, self.mesh, self.rules)

    def batch_shardings(self, batch: Mapping[str, Any], features: FeatureSet) -> dict[str, NamedSharding]:
        return {k: self.sharding(axes) for k, axes in features.logical_axes(batch).items()}

    def shard_batch(self, local_batch: Mapping[str, Any], features: FeatureSet) -> dict[str, jax.Array]:
        """Global arrays from each process's rows of the batch (its own data shard): the global batch is
        `process_count` times larger."""
        shardings = self.batch_shardings(local_batch, features)
        nproc, out = jax.process_count(), {}
        for name, value in local_batch.items():
            value = np.asarray(value)
            out[name] = jax.make_array_from_process_local_data(
                shardings[name], value, (value.shape[0] * nproc,) + value.shape[1:])
        return out

    # --- programs ---------------------------------------------------------------------------------
    def partition(self, fn: Callable, *, in_shardings: Any, out_shardings: Any,
                  donate_argnums: Sequence[int] = ()) -> PartitionedFunction:
        return PartitionedFunction(fn, self, in_shardings=in_shardings, out_shardings=out_shardings,
                                   donate_argnums=donate_argnums)

    def activation_context(self) -> partitioning.activation_context:
        return partitioning.activation_context(self.mesh, self.rules)

    def describe(self) -> str:
        return partitioning.mesh_shape_str(self.mesh)
