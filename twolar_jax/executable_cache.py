"""Compiled programs kept on disk, so a new process skips tracing, lowering and compiling them.

The persistent compilation cache (`compile_cache`) only saves XLA's compile: a fresh process still traces
the model and lowers it to StableHLO before it can look the executable up, which for flan-t5-small costs
about a second per batch shape. This cache stores the executable itself (jax's `serialize_executable`)
under a key built from everything that determines the program (the caller's description of it, plus
jax/jaxlib/flax versions, backend, device kinds, host CPU flags, XLA flags and the source of the modules
that define the program), so a warm process goes straight to running.

Entries live in `<compilation cache dir>/twolar-executables/<sha256>.exe`, each a header (magic, the full
description as JSON, a SHA-256 of the payload) and the serialized executable. An entry that does not
match its description or checksum, or that jax cannot load, is reported with a warning and compiled
afresh; every write goes to a temporary file renamed over the entry, so readers never see half of one.
Loading an entry unpickles it: like the compilation cache, the directory must be the user's own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

log = logging.getLogger(__name__)

SUBDIR = "twolar-executables"
SUFFIX = ".exe"
MAGIC = b"TWOLAR-EXE\x01\n"
FORMAT = 1
# jax settings that change what a traced program compiles to (the rest of the program is in the key).
_JAX_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                "jax_use_shardy_partitioner", "jax_default_prng_impl")


@dataclass
class Stats:
    """What the cache did in this process: programs read from disk, compiled, refused, written."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    rejected: int = 0
    writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def for_compilation_cache(compilation_cache_dir: Optional[os.PathLike | str]) -> Optional["ExecutableCache"]:
    """The executable cache inside the compilation cache's directory; None when that cache is off
    (no directory, or TWOLAR_COMPILE_CACHE=off even where jax's directory was set some other way), and
    in a multi-process run, where each host would compile its own part and key it by global devices."""
    from twolar_jax.compile_cache import ENV, OFF

    if compilation_cache_dir is None or os.environ.get(ENV, "x").strip().lower() in OFF:
        return None
    if jax.process_count() > 1:
        return None
    return ExecutableCache.for_directory(Path(compilation_cache_dir) / SUBDIR)


@functools.lru_cache(maxsize=None)
def _sources_digest(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        try:
            h.update(Path(p).read_bytes())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    """The host CPU's feature flags: an executable compiled for AVX-512 must not load on an AVX2 host."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices: Sequence[jax.Device], sources: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """What outside the program's own description decides the executable: versions, backend, host, flags."""
    import flax
    import jaxlib

    client = devices[0].client
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "python": list(sys.version_info[:2]),
        "platform": client.platform, "platform_version": client.platform_version,
        "device_kinds": sorted({d.device_kind for d in devices}),
        "process_count": jax.process_count(),
        "machine": platform.machine(), "cpu_flags": _cpu_flags(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
        "jax_options": {name: str(getattr(jax.config, name, None)) for name in _JAX_OPTIONS},
        "sources": _sources_digest(tuple(sorted(str(Path(s).resolve()) for s in sources))),
    }


# --------------------------------------------------------------------------------- fresh compiles
# jax 0.10.2 on CPU: an executable that jax read from its persistent compilation cache serializes to a blob
# that loads but fails to run ("NOT_FOUND: Function wrapped_log not found"). So a program this cache stores
# must come from XLA itself: it is compiled with a no-op option (xla_dump_large_constants at its default,
# off), which gives it a persistent-cache key of its own, and with jax's cache writes off for this thread,
# so that key never gets an entry to be read back. A cache hit seen anyway (jax.monitoring) keeps the program unstored.
_FRESH_OPTIONS = {"xla_dump_large_constants": False}
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread = threading.local()
_listening = False
_listening_lock = threading.Lock()


def _count_hits(event: str, **_: Any) -> None:
    if event == _HIT_EVENT:
        _thread.hits = getattr(_thread, "hits", 0) + 1


def compile_fresh(lowered: Any) -> tuple[Any, bool]:
    """(compiled, storable): `lowered` compiled by XLA rather than read from jax's persistent cache."""
    global _listening
    with _listening_lock:
        if not _listening:
            jax.monitoring.register_event_listener(_count_hits)
            _listening = True
    before = getattr(_thread, "hits", 0)
    try:
        from jax._src import config as jax_config
        no_writes = jax_config.persistent_cache_min_compile_time_secs(float("inf"))
    except (ImportError, AttributeError, TypeError):  # another jax: the hit check below still guards
        import contextlib
        no_writes = contextlib.nullcontext()
    with no_writes:
        compiled = lowered.compile(compiler_options=dict(_FRESH_OPTIONS))
    storable = getattr(_thread, "hits", 0) == before
    if not storable:
        log.debug("compiled program came from jax's persistent cache: not stored")
    return compiled, storable


def describe(description: Mapping[str, Any]) -> tuple[str, bytes]:
    """(key, canonical JSON bytes) of a description: the key is the JSON's SHA-256."""
    text = json.dumps(description, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(text).hexdigest(), text


class ExecutableCache:
    """Serialized executables in one directory, and those already loaded in this process.

    One instance per directory (`for_directory`), shared by every Reranker of the process, so a second
    Reranker of the same model reuses loaded programs as jit would reuse its traces."""

    _instances: dict[Path, "ExecutableCache"] = {}
    _instances_lock = threading.Lock()

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.stats = Stats()
        self._loaded: dict[str, Any] = {}
        self._refused: set[str] = set()  # entries found unusable in this process, until rewritten
        self._lock = threading.Lock()

    @classmethod
    def for_directory(cls, directory: os.PathLike | str) -> "ExecutableCache":
        path = Path(directory)
        with cls._instances_lock:
            if path not in cls._instances:
                cls._instances[path] = cls(path)
            return cls._instances[path]

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    # --- one program ------------------------------------------------------------------------------
    def load(self, description: Mapping[str, Any], *, in_tree: Any, out_tree: Any,
             devices: Sequence[jax.Device]) -> Any:
        """The program from memory or disk, or None (nothing compiles here: safe to call ahead, on any thread).

        `in_tree`/`out_tree` are the pytree structures of ((args...), {}) and of the output (jax does not
        serialize them); `devices` are the program's devices, in the mesh's order."""
        key, text = describe(description)
        with self._lock:
            compiled = self._loaded.get(key)
            if compiled is not None:
                self.stats.memory_hits += 1
                return compiled
        compiled = self._read(key, text, in_tree, out_tree, devices)
        if compiled is None:
            return None
        with self._lock:
            self.stats.disk_hits += 1
            return self._loaded.setdefault(key, compiled)

    def get_or_compile(self, description: Mapping[str, Any], compile_fn: Callable[[], Any], *,
                       in_tree: Any, out_tree: Any, devices: Sequence[jax.Device]) -> tuple[Any, bool]:
        """(the program, whether it was compiled now): `load`, else `compile_fn()` -> (compiled, storable),
        written for the next process when storable (see `compile_fresh`).

        Two threads wanting the same new program both compile it (as jit would); the file is replaced whole."""
        compiled = self.load(description, in_tree=in_tree, out_tree=out_tree, devices=devices)
        if compiled is not None:
            return compiled, False
        key, text = describe(description)
        compiled, storable = compile_fn()
        if storable:
            self._write(key, text, compiled)
        with self._lock:
            self.stats.misses += 1
            return self._loaded.setdefault(key, compiled), True

    def reject(self, description: Mapping[str, Any], reason: str) -> None:
        """A loaded entry that turned out unusable: warn, forget it, and remove it so it is rewritten."""
        key, _ = describe(description)
        log.warning("compiled program %s is unusable (%s): compiling it again", self.path_for(key), reason)
        with self._lock:
            self.stats.rejected += 1
            self._loaded.pop(key, None)
        try:
            self.path_for(key).unlink()
        except OSError:
            pass

    # --- files ------------------------------------------------------------------------------------
    def _read(self, key: str, text: bytes, in_tree: Any, out_tree: Any, devices: Sequence[jax.Device]) -> Any:
        if key in self._refused:  # warned once already; compiled and rewritten by whoever asks next
            return None
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read compiled program %s (%s): compiling it again", path, e)
            self.stats.rejected += 1
            self._refused.add(key)
            return None
        try:
            payload = _unpack(data, text)
            from jax.experimental import serialize_executable

            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 backend=devices[0].client,
                                                                 execution_devices=list(devices))
        except Exception as e:  # noqa: BLE001 - any unreadable entry: compile as if it were absent
            log.warning("compiled program %s is unusable (%s: %s): compiling it again and rewriting it",
                        path, type(e).__name__, e)
            self.stats.rejected += 1
            self._refused.add(key)
            return None
        log.debug("loaded compiled program %s", path)
        return compiled

    def _write(self, key: str, text: bytes, compiled: Any) -> None:
        from jax.experimental import serialize_executable

        try:
            payload, _, _ = serialize_executable.serialize(compiled)
        except Exception as e:  # noqa: BLE001 - a backend that cannot serialize: run uncached
            log.debug("compiled program not cached: %s", e)
            return
        path = self.path_for(key)
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            import tempfile

            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(_pack(payload, text))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            self._refused.discard(key)
            self.stats.writes += 1
            log.debug("wrote compiled program %s (%d bytes)", path, len(payload))
        except OSError as e:  # a full or read-only disk must not stop scoring
            log.warning("cannot write compiled program %s: %s", path, e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def _pack(payload: bytes, text: bytes) -> bytes:
    return MAGIC + struct.pack("<Q", len(text)) + text + hashlib.sha256(payload).digest() + payload


def _unpack(data: bytes, text: bytes) -> bytes:
    """The payload of an entry, after checking its magic, its description and its checksum."""
    if not data.startswith(MAGIC):
        raise ValueError("not a TWOLAR executable entry")
    at = len(MAGIC)
    if len(data) < at + 8:
        raise ValueError("truncated header")
    (n,) = struct.unpack_from("<Q", data, at)
    at += 8
    if data[at:at + n] != text:
        raise ValueError("written for another program or environment (jax version, devices, source)")
    at += n
    digest, payload = data[at:at + 32], data[at + 32:]
    if len(digest) != 32 or hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    return payload
