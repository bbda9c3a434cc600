"""TPU slices by name (`v5e:4x4`), their devices as libtpu's compiler describes them, and each chip's HBM.

No TPU is needed: `jax.experimental.topologies.get_topology_desc` asks libtpu for the devices of a slice,
and a mesh over them compiles like a real one. v4 and v5p chips hold two TensorCores that run as one
device ("megacore", how JAX uses them), so `v4:2x2x4` is 16 devices: a v4-32 in Cloud TPU's core count.
The topology is one slice (no multi-slice / DCN axis) without wrap-around links.

HBM per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
/v6e, read 2025): v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from twolar_jax.errors import OptionError, TwolarError


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the AOT tool needs to know about a TPU generation."""

    name: str  # as users and libtpu write it: "v5e"
    dims: int  # torus dimensions of a slice name: 2 (v5e, v6e) or 3 (v4, v5p)
    chip_config: str  # libtpu's chip config: "megacore" (two cores as one device) or "default"
    hbm_gib: float  # HBM per chip (module docstring gives the source)
    accelerator_prefix: str  # TPU_ACCELERATOR_TYPE names: "v4-32", "v5litepod-16", ...
    cores_per_chip: int  # the accelerator type counts TensorCores: v4-32 is 16 chips


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 3, "megacore", 32.0, "v4", 2),
    "v5e": Generation("v5e", 2, "default", 16.0, "v5litepod", 1),
    "v5p": Generation("v5p", 3, "megacore", 95.0, "v5p", 2),
    "v6e": Generation("v6e", 2, "default", 32.0, "v6e", 1),
}
TOPOLOGY_FORM = ("GENERATION:AxB for v5e, v6e or GENERATION:AxBxC for v4, v5p "
                 "(e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4, v5e:16x16)")
_NAME = re.compile(r"^(v[0-9][a-z]?):([0-9]+(?:x[0-9]+)+)$")
_CHIPS_PER_HOST = (2, 2, 1)  # a 4-chip host, as Cloud TPU VMs of these generations have


@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice: a generation and its chip grid."""

    generation: Generation
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * 2**30)

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for the slice, e.g. v4-32 or v5litepod-16."""
        return f"{self.generation.accelerator_prefix}-{self.chips * self.generation.cores_per_chip}"


def parse_topology(name: str) -> Topology:
    """`v5e:4x4` -> Topology; anything else is an OptionError naming the accepted form."""
    match = _NAME.match(str(name).strip())
    generation = GENERATIONS.get(match.group(1)) if match else None
    shape = tuple(int(s) for s in match.group(2).split("x")) if match else ()
    if generation is None or len(shape) != generation.dims or min(shape) < 1:
        raise OptionError(f"--topology={name!r}: expected {TOPOLOGY_FORM}; generations: {', '.join(GENERATIONS)}")
    return Topology(generation, shape)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _set_libtpu_environment(topology: Topology) -> None:
    """Environment libtpu reads when it loads; only unset variables are filled (a TPU VM's own win).

    ALLOW_MULTIPLE_LIBTPU_LOAD: a compile-only process must not take the TPU lock file that a process using
    a real TPU (or another compile) holds. The others stop libtpu from asking a metadata server that a
    workstation does not have, and from warning that it could not."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)


def topology_devices(topology: Topology) -> list[Any]:
    """The slice's devices (one per chip) from libtpu's compiler; they can be compiled for, never run."""
    if not libtpu_available():
        raise TwolarError("ahead-of-time TPU compiles need libtpu: pip install 'twolar-jax[aot]' "
                          "(libtpu==0.0.42.1); no TPU is needed")
    _set_libtpu_environment(topology)
    from jax.experimental import topologies

    shape3 = topology.shape + (1,) * (3 - len(topology.shape))
    per_host = tuple(min(h, s) for h, s in zip(_CHIPS_PER_HOST, shape3))
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                            chip_config_name=topology.generation.chip_config,
                                            chips_per_host_bounds=per_host, num_slices=1)
    except Exception as e:  # libtpu refuses a grid it cannot build (e.g. v5e:3x5) with a runtime error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptionError(f"--topology={topology.name!r}: libtpu cannot build this slice ({first}); "
                          f"expected {TOPOLOGY_FORM}") from None
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise TwolarError(f"--topology={topology.name}: libtpu gave {len(devices)} devices for {topology.chips} chips")
    return devices
