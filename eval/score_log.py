"""What a scores log was written for, so a resumed job reuses only scores of the same model on the same input.

A log (scores.jsonl) sits beside a meta file holding its key: the checkpoint's identity (an HF dir: the
names, sizes and mtimes of the files the Reranker reads; a training MODEL_DIR: the step loaded, plus the
same stat of that step's files and model_config.json), the score head, dtype, max length, truncation,
and a hash of the candidate lists scored (query ids and texts, doc ids and texts, top_k deep). Any other
key means a fresh log, said in one log line that names what changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from retrieval.readers import RankRequest
from twolar_jax.durable_io import write_json_atomic
from twolar_jax.errors import MissingFileError

log = logging.getLogger("eval")
# Files of an HF dir that change what Reranker.from_pretrained computes (weights: *.safetensors, *.bin, indexes).
_HF_FILES = ("config.json", "spiece.model")
_HF_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _stat_digest(paths: Iterable[Path], root: Path) -> str:
    """sha256 of each file's relative name, size and mtime (ns): rewriting the weights changes it."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def latest_step(model_dir: Path) -> int:
    """The step Reranker.from_pretrained would load from a training MODEL_DIR (orbax's latest)."""
    from twolar_jax import checkpointing

    steps = checkpointing.all_steps(model_dir)
    if not steps:
        raise MissingFileError(f"{model_dir}: no checkpoint saved yet")
    return max(steps)


def checkpoint_identity(checkpoint: str | Path, step: Optional[int] = None) -> dict[str, Any]:
    """What gets loaded from a local checkpoint dir (twolar_jax.hub.resolve_checkpoint gives one for a hub
    id): {"path", "step" (MODEL_DIR only), "files": stat digest}; `step` None = the latest."""
    path = Path(checkpoint).resolve()
    if (path / "config.json").is_file():  # the same test Reranker.from_pretrained makes first
        files = [p for p in path.iterdir() if p.is_file() and (p.name in _HF_FILES or p.name.endswith(_HF_SUFFIXES))]
        return {"path": str(path), "files": _stat_digest(files, path)}
    if (path / "model_config.json").is_file():
        step = latest_step(path) if step is None else int(step)
        step_dir = path / "checkpoints" / str(step)
        files = [p for p in step_dir.rglob("*") if p.is_file()] + [path / "model_config.json"]
        return {"path": str(path), "step": step, "files": _stat_digest(files, path)}
    return {"path": str(path)}  # not a checkpoint the Reranker knows: its loader says so


def candidates_digest(requests: Sequence[RankRequest], top_k: int) -> str:
    """sha256 of what gets scored: query ids and texts, and the top_k doc ids and texts of each."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps([r.qid, r.query, [[c.docid, c.text] for c in r.candidates[:top_k]]]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def score_key(identity: dict[str, Any], *, score_head: str, dtype: str, max_length: int, truncation: str) -> dict:
    """The model half of a log key (the candidates are added per dataset)."""
    return {"checkpoint": identity, "score_head": score_head, "dtype": dtype, "max_length": max_length,
            "truncation": truncation}


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    names = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            names.append(f"{prefix}{k}")
    return names


def _read_meta(meta_path: Path) -> Optional[dict]:
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def open_score_log(log_path: Path, meta_path: Path, key: Optional[dict]) -> Path:
    """log_path, emptied unless its meta records exactly `key` (None: an in-memory scorer, never resumed)."""
    old = _read_meta(meta_path) if meta_path.is_file() else None
    if key is not None and old == key:
        if log_path.exists():
            log.info("%s: resuming (same checkpoint, settings and candidates)", log_path)
        return log_path
    if log_path.exists():
        if key is None:
            why = "the scorer is an in-memory object"
        elif old is None:
            why = f"no record of what wrote it ({meta_path.name} missing)"
        else:
            why = ", ".join(_changed(old, key)) + " changed"
        # An in-memory scorer is never resumed, by design: not worth a warning on every run.
        log.log(logging.INFO if key is None else logging.WARNING, "%s: not resuming, scoring afresh: %s",
                log_path, why)
        log_path.unlink()
    if key is not None:
        write_json_atomic(meta_path, key, sort_keys=False)
    elif meta_path.exists():
        meta_path.unlink()
    return log_path
