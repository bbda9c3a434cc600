"""Keep freed host memory in the process, so XLA:CPU's per-step temporaries are not faulted in afresh.

Why: XLA:CPU allocates each execution's temp buffer with `posix_memalign` (4.0 GiB for the flan-t5-small
train step, 1 x 30 x 512 tokens) from a worker thread. glibc serves a request that large with a fresh
`mmap` and gives it back with `munmap` when the step ends, so the next step faults every page in again
and the kernel zeroes it: about 1.1M page faults and 12-20 s of system time per step on a 2-core VM,
next to 26-29 s of user time. Three `mallopt` settings make glibc keep that memory instead:

- `M_ARENA_MAX = 1`: every thread allocates from the main arena (a worker's own arena can only `mmap`
  requests larger than its 64 MiB heap);
- `M_MMAP_MAX = 0`: the main arena grows its heap instead of mapping large requests;
- `M_TRIM_THRESHOLD = -1` (no limit): freed memory at the top of the heap is never returned.

From the second step on the buffer is reused: no page faults, system time near zero. The price is that
the process holds its peak heap until it exits, and that all threads share one arena's lock, which is why
`auto` keeps the heap only for CPU runs; the trainer hands free pages back once after its first step
(`trim`). `release` leaves glibc as it is. The settings must be made before JAX starts its backend: threads
keep the arena of their first allocation. glibc only (Linux); elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import platform
from typing import Iterable, Optional

from twolar_jax.errors import OptionError

log = logging.getLogger(__name__)

ENV = "TWOLAR_HOST_HEAP"
MODES = ("auto", "keep", "release")
# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Device nodes of accelerators JAX would run on: NVIDIA GPUs, TPU VMs (accel on v4+, vfio on v5e/v6e).
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
_kept = False  # whether keep_freed_memory took effect in this process


def resolve_mode(mode: Optional[str] = None) -> str:
    """The mode a run asked for: `mode`, else $TWOLAR_HOST_HEAP, else `auto`; a bad value is an error."""
    value = (mode or os.environ.get(ENV) or "auto").strip().lower()
    if value not in MODES:
        raise OptionError(f"host heap mode {value!r} (from {'--host_heap' if mode else ENV}) is not one of {MODES}")
    return value


def runs_on_cpu(jax_platforms: Optional[str], accelerator_nodes: Iterable[str]) -> bool:
    """Whether JAX will compute on the CPU, told without starting a backend: the first platform of
    `jax_platforms` when set, else the absence of accelerator device nodes."""
    if jax_platforms:
        return jax_platforms.split(",")[0].strip().lower() == "cpu"
    return not any(True for _ in accelerator_nodes)


def should_keep(mode: str, jax_platforms: Optional[str], accelerator_nodes: Iterable[str]) -> bool:
    """`keep` and `release` say it; `auto` keeps the heap for CPU runs only."""
    if mode == "auto":
        return runs_on_cpu(jax_platforms, accelerator_nodes)
    return mode == "keep"


@functools.cache
def _glibc():
    """glibc (its soname is fixed on Linux), or None on another C library or OS."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (the three settings above); True when glibc took them.

    There is no way back within the process: setting M_TRIM_THRESHOLD also ends glibc's sliding mmap
    threshold, so "its defaults" could not be restored by setting them again."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    _kept = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _kept


def trim() -> bool:
    """Hand the kept heap's free pages back once (`malloc_trim(0)`), e.g. after the first step, when the
    compiler's garbage is free and the step's own buffers are what stays; a no-op unless kept.

    Why: the compile's freed memory can leave holes the step's multi-GiB temp buffer does not fit, and the
    heap then grows past the step's peak (seen: 10.2 GB instead of 6.2 GB for flan-t5-small)."""
    return _kept and bool(_glibc().malloc_trim(0))


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - a jax without the probe
        return False


def configure(mode: Optional[str] = None) -> bool:
    """Apply `mode` (see `resolve_mode`) before JAX starts; returns whether the heap is kept.

    Console entry points call it from `entry.start`; a library user who trains or scores on CPU can call
    `configure("keep")` first thing."""
    mode = resolve_mode(mode)
    import jax

    nodes = (path for pattern in ACCELERATOR_NODES for path in glob.iglob(pattern))
    keep = should_keep(mode, jax.config.jax_platforms, nodes)
    if not keep:
        return False  # release: glibc as it is
    if _backend_started():
        if mode == "auto":
            log.debug("host heap: left as it is (JAX's backend already started)")
            return False
        log.warning("host heap: JAX's backend already started; its threads keep their own malloc arenas, "
                    "so XLA's temporaries are still mapped afresh each step")
    kept = keep_freed_memory()
    log.debug("host heap: %s (mode %s)", "kept" if kept else "not glibc, left as it is", mode)
    return kept
