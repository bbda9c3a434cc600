"""A persistent JAX compilation cache, so a new process does not compile the same programs again.

On by default in the console entry points and the Reranker: compiled executables go to a user cache
directory ($TWOLAR_COMPILE_CACHE, else $XDG_CACHE_HOME/twolar/jax or ~/.cache/twolar/jax). Turn it off
with TWOLAR_COMPILE_CACHE=off (or `enable_compilation_cache(False)`); a directory the user already set
with `jax.config.update("jax_compilation_cache_dir", ...)` is left alone.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
ENV = "TWOLAR_COMPILE_CACHE"
OFF = ("0", "off", "false", "no", "none", "")


def default_cache_dir() -> Optional[Path]:
    """Where executables are cached, or None when the user turned the cache off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twolar" / "jax"


def enable_compilation_cache(enabled: bool = True, directory: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """Point jax at the persistent cache (idempotent); returns the directory in use, or None when off."""
    import jax

    if not enabled:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and directory is None:
        return Path(current)
    path = Path(directory) if directory is not None else default_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home must not stop scoring: compile as before
        log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
