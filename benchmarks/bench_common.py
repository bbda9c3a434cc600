"""What the benchmarks share: device peaks for MFU, compile-time accounting and the cold/warm probe.

compile_s is the time jax spends tracing, lowering and compiling (or fetching from the persistent
compilation cache) during a first call, read from jax.monitoring's duration events, so execution time
does not blur it. A benchmark measures it twice: in its own fresh process against an empty cache
directory ("cold"), then in a subprocess of itself that repeats only the first call against the same,
now filled, directory ("warm": what a user's second run pays).
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# Dense peak throughput (FLOP/s) by device kind and compute dtype, for MFU. fp32 on Hopper/Ampere: XLA's
# default matmul precision runs fp32 dots as TF32 on tensor cores, so that is the peak it can reach.
PEAK_FLOPS = {
    ("h200", "bfloat16"): 989e12, ("h200", "float32"): 494e12,
    ("h100", "bfloat16"): 989e12, ("h100", "float32"): 494e12,
    ("a100", "bfloat16"): 312e12, ("a100", "float32"): 156e12,
}
# jax.monitoring events whose durations make up the compile cost of a first call.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PROBE_FLAG = "--compile_probe"
PROBE_PREFIX = "compile_probe_s="  # the probe's last line: compile_probe_s=<total> (<parts>)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype`, or None for a device without a known table entry (CPUs)."""
    kind = device_kind.lower()
    return next((v for (k, dt), v in PEAK_FLOPS.items() if k in kind and dt == dtype), None)


GEMM_SHAPE = (8192, 512, 1024)  # [m, k] @ [k, n]: a flan-t5-small MLP projection over 8192 tokens


def gemm_ceiling(dtype: str, *, with_torch: bool = True, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one GEMM_SHAPE matmul alone (best of `repeats`): XLA's (jax.jit) and, with_torch, torch's.

    On a CPU a model step is mostly matmuls, so each library's rate on a plain GEMM is the ceiling its
    step can reach: the benchmarks print it beside the model FLOP/s they achieve, so a ratio between the two
    sides reads as "library against library" or "everything around the GEMMs"."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32) * 0.02
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
    matmul = jax.jit(jnp.matmul)

    def best(fn) -> float:
        fn()  # compile / warm up
        return 2 * m * k * n / min(timed(fn) for _ in range(repeats)) / 1e9

    rates = {"xla": best(lambda: matmul(ja, jb).block_until_ready())}
    if with_torch:
        import torch

        tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        with torch.inference_mode():
            rates["torch"] = best(lambda: torch.matmul(ta, tb))
    return rates


def describe_ceiling(rates: dict[str, float], achieved: dict[str, float]) -> str:
    """One line: each side's model GFLOP/s against its library's GEMM alone."""
    m, k, n = GEMM_SHAPE
    sides = [f"{side} {achieved[side]:.0f} of {rates[lib]:.0f} ({achieved[side] / rates[lib]:.0%})"
             for side, lib in (("ours", "xla"), ("torch", "torch")) if side in achieved and lib in rates]
    return f"model GFLOP/s against the GEMM alone ([{m},{k}]@[{k},{n}], XLA's for ours): " + ", ".join(sides)


class CompileClock:
    """Sums jax's trace/lower/compile durations since construction: `seconds`, and `parts` per stage."""

    _totals = dict.fromkeys(COMPILE_EVENTS, 0.0)
    _registered = False

    def __init__(self) -> None:
        if not CompileClock._registered:
            import jax

            jax.monitoring.register_event_duration_secs_listener(CompileClock._listen)
            CompileClock._registered = True
        self._start = dict(CompileClock._totals)

    @staticmethod
    def _listen(event: str, duration: float, **_: object) -> None:
        if event in CompileClock._totals:
            CompileClock._totals[event] += duration

    @property
    def parts(self) -> dict[str, float]:
        """Seconds per stage: trace (Python to jaxpr), lower (to StableHLO), compile (XLA, or a cache fetch)."""
        names = dict(zip(COMPILE_EVENTS, ("trace", "lower", "compile")))
        return {names[e]: CompileClock._totals[e] - self._start[e] for e in COMPILE_EVENTS}

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items())


def use_cache(directory: str) -> None:
    """Point jax's persistent compilation cache at `directory`, with the package's own settings (what a
    user's run gets: programs that compile in under half a second are not cached)."""
    from twolar_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(directory=directory)


def warm_compile_seconds(script: str, argv: Sequence[str], cache_dir: str, timeout: float = 900) -> tuple[float, str]:
    """Run `script argv --compile_probe DIR` in a fresh process; the compile seconds it reports, and parts."""
    cmd = [sys.executable, script, *argv, PROBE_FLAG, cache_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    found = re.findall(rf"^{PROBE_PREFIX}([0-9.]+) \((.*)\)$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"compile probe failed (rc={done.returncode}): {done.stderr[-2000:]}")
    return float(found[-1][0]), found[-1][1]


def report_probe(clock: CompileClock) -> None:
    print(f"{PROBE_PREFIX}{clock.seconds:.3f} ({clock.describe()})", flush=True)


def strip_probe(argv: Sequence[str]) -> list[str]:
    """argv without a `--compile_probe DIR` pair, to pass on to the probe subprocess."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == PROBE_FLAG:
            skip = True
        elif not arg.startswith(PROBE_FLAG + "="):
            out.append(arg)
    return out


class OsCost:
    """CPU seconds (user, system) and minor page faults of the process while inside `with` blocks.

    On CPU both sides allocate each step's activations afresh; the kernel zeroes every new page on first
    touch, so page faults and system time are part of the step's cost (and vary with the host)."""

    def __init__(self) -> None:
        self.user = self.system = 0.0
        self.faults = 0

    def __enter__(self) -> "OsCost":
        self._start = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.user += end.ru_utime - self._start.ru_utime
        self.system += end.ru_stime - self._start.ru_stime
        self.faults += end.ru_minflt - self._start.ru_minflt

    def describe(self, steps: int) -> str:
        return (f"user_s={self.user / steps:.1f} sys_s={self.system / steps:.1f} "
                f"page_faults={self.faults / steps / 1e6:.2f}M")


def add_model_flags(parser) -> None:
    """--attention and --scan_layers, the T5Config fields both model benchmarks let a run override, and
    --host_heap, the process's allocator."""
    from twolar_jax import host_heap
    from twolar_jax.model.config import ATTENTION_KINDS

    parser.add_argument("--attention", default="auto", choices=ATTENTION_KINDS,
                        help="T5Config.attention (auto: rows on CPU, dot_product on GPU, einsum on TPU)")
    parser.add_argument("--scan_layers", action="store_true",
                        help="T5Config.scan_layers: layers under nn.scan (big presets compile in seconds)")
    parser.add_argument("--host_heap", default="auto", choices=host_heap.MODES,
                        help="twolar_jax.host_heap for the whole process, both sides alike (auto, as the "
                             "console entry points: kept on CPU; release: glibc's defaults)")


def apply_host_heap(args) -> str:
    """Set the process's host heap as `args.host_heap` says, before JAX starts; a phrase for the header."""
    from twolar_jax import host_heap

    mode = getattr(args, "host_heap", None)
    if mode is None:
        return "glibc default"
    kept = host_heap.configure(mode)
    return f"{'kept' if kept else 'glibc default'} ({mode})"


def attention_path(config, dtype: str) -> str:
    """The attention path this backend compiles, with the kernel a dot_product path runs (long sequences)."""
    from twolar_jax.model import network

    path = network.resolve_attention(config)
    if path != "dot_product":
        return path
    return f"{path} ({network.dot_product_implementation(dtype, 512, 512, config.d_kv)} kernel)"


def load_average() -> str:
    """`uptime`'s 1/5/15-minute load, printed with every figure: the CPU may be shared."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_main(argv: Sequence[str] | None, parse_args: Callable, run_probe: Callable, run: Callable) -> None:
    """A benchmark's main: the warm-cache probe when asked for, else `run(args, argv, cache_dir)` against
    a fresh, empty persistent compilation cache (so the run's first compile is the cold one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.host_heap_state = apply_host_heap(args)  # both sides share the process and so its allocator
    if args.compile_probe:
        return run_probe(args)
    with tempfile.TemporaryDirectory(prefix="twolar_bench_cache_") as cache_dir:
        use_cache(cache_dir)
        run(args, argv, cache_dir)
