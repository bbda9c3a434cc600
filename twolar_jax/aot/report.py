"""What one ahead-of-time compile costs on its target: bytes per chip, fit, FLOPs, collectives, time.

Bytes come from the compiled executable's `memory_analysis()` (per chip: the SPMD program is the same on
every chip). A chip needs arguments + outputs - aliased (donated state reused for outputs) + temporaries
+ generated code, MaxText's sum plus the program itself, which TPUs keep in HBM too. The compiler may
over-estimate a little. When the program does not fit, the TPU compiler itself refuses it
(RESOURCE_EXHAUSTED, as on a real TPU); `oom_report` keeps what that message says.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# The opcode follows the result shape: `... = f32[8]{0} all-gather(...)` or the async `all-gather-start(`;
# instruction names (%all-gather.3) are not preceded by a space, so they do not count.
_COLLECTIVE_OP = re.compile(r" (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# XLA:TPU writes a reduce-scatter as a fusion calling a computation named all-reduce-scatter.N (an all-reduce
# and a dynamic-slice inside): one reduce-scatter per call site, and the all-reduce inside is not another.
_SCATTER_COMPUTATION = re.compile(r"^(?:all-)?reduce-scatter\b")
_SCATTER_CALL = re.compile(r"calls=%((?:all-)?reduce-scatter[\w.-]*)")
# XLA:TPU's refusals: "Used 20.5G of 15.75G hbm" or "memory required for HLO temporaries (17.79G) exceeds".
_OOM_USED = (re.compile(r"Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm"),
             re.compile(r"required for [^(]*\(([0-9.]+)([KMGT])\) exceeds"))
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class MemoryBytes:
    """Per-chip bytes of a compiled program."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def per_chip(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled: Any) -> "MemoryBytes":
        stats = compiled.memory_analysis()
        return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                   int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                   int(stats.generated_code_size_in_bytes))


def _computations(hlo_text: str) -> dict[str, str]:
    """HLO module text -> {computation name: its body}; text without headers is one computation ('')."""
    bodies: dict[str, list[str]] = {"": []}
    name = ""
    for line in hlo_text.splitlines():
        if line[:1] in ("%", "E") and line.rstrip().endswith("{"):
            name = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
            bodies[name] = []
        elif line.startswith("}"):
            name = ""
        else:
            bodies[name].append(line)
    return {k: "\n".join(v) for k, v in bodies.items()}


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled (per-chip) HLO text holds; a loop body's count once.

    An async start/done pair counts once; a reduce-scatter fusion counts as one reduce-scatter."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name, body in _computations(hlo_text).items():
        if _SCATTER_COMPUTATION.match(name):
            continue
        for match in _COLLECTIVE_OP.finditer(body):
            counts[match.group(1)] += 1
        counts["reduce-scatter"] += len(_SCATTER_CALL.findall(body))
    return counts


def xla_flops(compiled: Any) -> float:
    """`cost_analysis()['flops']` of the per-chip program (each while-loop body counted once, see flops.py)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


@dataclasses.dataclass
class Report:
    """One job compiled for one topology; `lines()` is what the command prints."""

    job: str
    topology: str
    chips: int
    hbm_bytes: int
    mesh: str
    attention: str
    model: str
    shape: str
    lower_s: float
    compile_s: float
    flops: float  # the whole step, all chips, loop-aware matmul count (flops.py)
    memory: Optional[MemoryBytes] = None  # None when the compiler ran out of HBM
    oom_bytes: Optional[int] = None  # what the compiler said it needed when it ran out (a lower bound)
    xla_flops: float = 0.0
    collectives: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0))
    error: str = ""

    @property
    def per_chip_bytes(self) -> int:
        return self.memory.per_chip if self.memory is not None else int(self.oom_bytes or 0)

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.per_chip_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(per_chip_gib=round(self.per_chip_bytes / 2**30, 3), hbm_gib=self.hbm_bytes / 2**30, fits=self.fits)
        return out

    def lines(self) -> list[str]:
        mem = self.memory
        out = [f"job={self.job} topology={self.topology} chips={self.chips} model={self.model} {self.shape}",
               f"  mesh={self.mesh} attention={self.attention}"]
        if mem is not None:
            out.append(f"  bytes_per_chip arguments={mem.arguments} outputs={mem.outputs} aliased={mem.aliased} "
                       f"temporaries={mem.temporaries} generated_code={mem.generated_code}")
        else:
            out.append(f"  out_of_memory (per_chip_gib is what the compiler named, a lower bound): {self.error}")
        out += [f"  per_chip_gib={self.per_chip_bytes / 2**30:.2f} hbm_gib={self.hbm_bytes / 2**30:g} fits={self.fits}",
                f"  flops={self.flops:.4g} flops_per_chip={self.flops / self.chips:.4g} xla_flops={self.xla_flops:.4g}"]
        if mem is not None:
            out.append("  collectives " + " ".join(f"{k}={v}" for k, v in self.collectives.items()))
        out.append(f"  lower_s={self.lower_s:.1f} compile_s={self.compile_s:.1f}")
        return out


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def oom_report(error: BaseException) -> tuple[Optional[int], str]:
    """(bytes the compiler said a chip would use, or None; the message's first line) of an HBM refusal."""
    text = str(error)
    match = next((m for m in (p.search(text) for p in _OOM_USED) if m), None)
    used = int(float(match.group(1)) * _UNIT[match.group(2)]) if match else None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return used, first[:300]
