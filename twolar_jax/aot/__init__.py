"""Ahead-of-time compiles for TPU topologies on a machine without a TPU (`twolar compile`, `python -m twolar_jax.aot`).

libtpu's compiler describes a TPU slice by name (`v5e:4x4`); a mesh over those devices takes abstract
arguments with shardings, and `jit(...).lower(...).compile()` returns per-chip memory and cost figures,
never running anything. Modules: `topology` (names, devices, HBM per chip), `gin_jobs` (what the gin files
say a job is), `programs` (the real train step and scoring function, traced on the topology), `flops`
(loop-aware matmul FLOPs from the jaxpr), `report` (what a compile costs), `main` (the command line).

This package imports no jax at import time, so `main` can default JAX_PLATFORMS to cpu before jax loads.
"""
