"""Matmul FLOPs of a traced program, counted from its jaxpr with loop trip counts.

Why not only XLA's `cost_analysis()`: it counts the body of a while loop once, whatever the trip count, so
a step with 32 accumulated micro-batches or 24 scanned layers reports a fraction of its work (1/32 of the
micro-batch loop, 1/24 of each scanned stack). The jaxpr still has every `scan` with its `length`, so this
count multiplies each body by it. Only dot products are counted (2 * output size * contracted size); the
elementwise rest of a T5 step is a few percent of it. The count is for the whole program (all chips, the
global batch) and includes what remat recomputes, i.e. what the hardware runs.
"""
from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jax_core


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def jaxpr_matmul_flops(jaxpr: Any) -> float:
    """FLOPs of every dot_general in `jaxpr` (a Jaxpr or ClosedJaxpr), scans times their length.

    A `cond` counts its most expensive branch; a `while` its body once (its trip count is not in the jaxpr;
    the T5 step has none: its loops are scans)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        inner = [jaxpr_matmul_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
        if not inner:
            continue
        if name == "cond":
            total += max(inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total
