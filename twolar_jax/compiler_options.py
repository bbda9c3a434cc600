"""XLA compiler options per backend for the programs that hold many activations (the train step).

XLA:CPU's default scheduler orders independent ops for concurrency and keeps more activations alive at
once: the flan-t5-small step (1 x 30 x 512 tokens) needs 7.24 GiB of temporaries under it and 4.60 GiB
under the memory-optimised scheduler. On CPU that memory is not pooled: each execution maps a fresh temp
buffer and the kernel zeroes every page as the step first touches it, so bytes of temp are seconds of
system time (about 1.9M page faults and 7-30 s of sys time per step on a 2-core VM, against 1.3M and
2-7 s), while the two cores leave little concurrency to win. Other backends keep their defaults: TPU and
GPU allocate from a pooled device heap and schedule for overlap on purpose.
"""
from __future__ import annotations

from typing import Mapping

CPU_MEMORY_SCHEDULER: Mapping[str, str] = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def for_platform(platform: str) -> dict[str, str]:
    """The compiler options `jax.jit(..., compiler_options=...)` gets for a program compiled for
    `platform` (a jax platform name: "cpu", "gpu", "tpu"); empty where the defaults are right."""
    return dict(CPU_MEMORY_SCHEDULER) if platform.lower() == "cpu" else {}


def for_mesh(mesh) -> dict[str, str]:
    """`for_platform` of the devices a mesh spans (an AOT mesh over TPU topology devices gets TPU's)."""
    return for_platform(mesh.devices.flat[0].platform)
