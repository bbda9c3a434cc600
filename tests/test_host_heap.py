"""The host heap setting (twolar_jax.host_heap): when it keeps glibc's freed memory, and that kept memory
really spares the page faults of XLA:CPU's per-execution temporaries (measured in fresh processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from twolar_jax import host_heap

REPO = Path(__file__).resolve().parent.parent
GLIBC = host_heap._glibc() is not None


@pytest.mark.parametrize("mode, platforms, nodes, expected", [
    ("auto", None, [], True),                       # nothing but the CPU
    ("auto", None, ["/dev/nvidia0"], False),        # a GPU host
    ("auto", None, ["/dev/accel0"], False),         # a TPU VM
    ("auto", "cpu", ["/dev/nvidia0"], True),        # JAX_PLATFORMS=cpu on a GPU host
    ("auto", "cuda,cpu", [], False),
    ("auto", " CPU ", [], True),
    ("keep", "tpu", ["/dev/accel0"], True),
    ("release", None, [], False),
])
def test_host_heap_policy(mode, platforms, nodes, expected):
    assert host_heap.should_keep(mode, platforms, iter(nodes)) is expected


def test_host_heap_mode_from_flag_env_or_default(monkeypatch):
    monkeypatch.delenv(host_heap.ENV, raising=False)
    assert host_heap.resolve_mode() == "auto"
    monkeypatch.setenv(host_heap.ENV, "Release")
    assert host_heap.resolve_mode() == "release"
    assert host_heap.resolve_mode("keep") == "keep"  # the flag wins over the environment
    monkeypatch.setenv(host_heap.ENV, "pooled")
    with pytest.raises(ValueError, match=r"'pooled' \(from TWOLAR_HOST_HEAP\) is not one of"):
        host_heap.resolve_mode()
    with pytest.raises(ValueError, match=r"'big' \(from --host_heap\)"):
        host_heap.resolve_mode("big")


def _faults_in_fresh_process(body: str, mode: str) -> dict:
    """Run `body` in a fresh interpreter, the heap kept first when mode is 'keep'; it prints JSON."""
    script = textwrap.dedent("""
        import json, resource, sys
        sys.path.insert(0, {repo!r})
        from twolar_jax import host_heap
        applied = host_heap.keep_freed_memory() if {keep} else None
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    """).format(repo=str(REPO), keep=mode == "keep") + textwrap.dedent(body)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("mode", ["keep", "release"])
def test_host_heap_worker_thread_reuses_large_blocks_only_when_kept(mode):
    """XLA allocates its temp buffer with posix_memalign from a worker thread: the same here, 64 MiB twice.
    Kept: the second block is the first one's pages (no faults). Released: all 16384 pages fault again."""
    result = _faults_in_fresh_process("""
        import ctypes, threading
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = (ctypes.c_void_p,)
        size, seen = 64 << 20, []
        def work():
            for _ in range(3):
                before = faults()
                block = libc.malloc(size)
                ctypes.memset(block, 1, size)
                libc.free(block)
                seen.append(faults() - before)
        thread = threading.Thread(target=work)
        thread.start(); thread.join()
        print(json.dumps({"applied": applied, "faults": seen}))
    """, mode)
    assert result["applied"] is (True if mode == "keep" else None)
    pages = (64 << 20) // 4096
    assert result["faults"][0] >= pages * 0.9  # the first touch always faults
    if mode == "keep":
        assert max(result["faults"][1:]) < pages * 0.05, result
    else:
        assert min(result["faults"][1:]) >= pages * 0.9, result


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("mode", ["keep", "release"])
def test_host_heap_xla_cpu_temporaries_fault_once_when_kept(mode):
    """A jitted program whose temporaries (two 36 MiB products, the dots' scratch) dwarf its scalar result,
    as the train step's do. Kept: from the second execution on nothing faults. Released: every execution
    faults at least its 36 MiB intermediate in again."""
    result = _faults_in_fresh_process("""
        import jax, jax.numpy as jnp
        f = jax.jit(lambda x: jnp.tanh((x @ x) @ x).sum())
        x = jnp.ones((3072, 3072), jnp.float32) / 3072
        f(x).block_until_ready()
        seen = []
        for _ in range(4):
            before = faults()
            f(x).block_until_ready()
            seen.append(faults() - before)
        print(json.dumps({"applied": applied, "faults": seen}))
    """, mode)
    intermediate_pages = 3072 * 3072 * 4 // 4096
    if mode == "keep":
        assert max(result["faults"]) < intermediate_pages * 0.1, result
    else:
        assert min(result["faults"]) >= intermediate_pages, result


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_host_heap_trim_hands_kept_pages_back():
    """A freed 256 MiB block stays resident in a kept heap until `trim`; trim is a no-op when not kept."""
    result = _faults_in_fresh_process("""
        import ctypes
        def resident_mib():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
        not_kept_trim = host_heap.trim()
        host_heap.keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = (ctypes.c_void_p,)
        start = resident_mib()
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)
        libc.free(block)
        kept = resident_mib() - start
        trimmed = host_heap.trim()
        after = resident_mib() - start
        print(json.dumps({"not_kept_trim": not_kept_trim, "kept": kept, "trimmed": trimmed, "after": after}))
    """, "release")
    assert result["not_kept_trim"] is False
    assert result["kept"] >= 250 and result["trimmed"] is True and result["after"] < 16, result


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_host_heap_configure_before_and_after_the_backend_starts():
    """auto on a CPU run keeps the heap when called before JAX starts; called after, auto leaves glibc
    alone (the worker threads have their arenas) and keep says so in a warning."""
    result = _faults_in_fresh_process("""
        import logging
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
        before = host_heap.configure("auto")
        import jax
        jax.devices()
        late_auto = host_heap.configure("auto")
        late_keep = host_heap.configure("keep")
        release = host_heap.configure("release")
        print(json.dumps({"before": before, "late_auto": late_auto, "late_keep": late_keep, "release": release}))
    """, "release")
    assert result == {"before": True, "late_auto": False, "late_keep": True, "release": False}


def test_host_heap_bad_mode_is_one_line_exit_2(capsys, monkeypatch):
    """`twolar train` with a bad $TWOLAR_HOST_HEAP or --host_heap: exit 2 and one line naming the source."""
    from twolar_jax import train

    monkeypatch.delenv("TWOLAR_DEBUG", raising=False)
    monkeypatch.setenv(host_heap.ENV, "pooled")
    assert train.console_main(["--gin_file=models/tiny.gin", "--no_compile_cache"]) == 2
    err = capsys.readouterr().err
    assert err == ("twolar-train: error: host heap mode 'pooled' (from TWOLAR_HOST_HEAP) is not one of "
                   "('auto', 'keep', 'release')\n")
    monkeypatch.delenv(host_heap.ENV)
    assert train.console_main(["--gin_file=models/tiny.gin", "--host_heap=big"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("twolar-train: error: argument --host_heap: invalid choice: 'big'")
