"""Resolve a checkpoint argument: a local directory, or a Hugging Face hub id found through huggingface_hub.

`Reranker.from_pretrained("castorini/monot5-base-msmarco")` should work like transformers': a directory
that exists wins, otherwise an `owner/name` id is looked up in the HF cache and, when the network is
allowed (HF_HUB_OFFLINE unset), downloaded. Only the files a T5 reranker reads are fetched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from twolar_jax.errors import MissingFileError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CONFIG_FILES = ["config.json", "spiece.model"]
_SAFETENSORS = ["model.safetensors", "model*.safetensors", "model.safetensors.index.json"]
_TORCH_BIN = ["pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
_TRUE = ("1", "on", "yes", "true")


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub uses (HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_checkpoint(path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory as is; a hub id as its snapshot folder (cache first; downloads unless offline)."""
    local = Path(path).expanduser()
    if local.exists() or not isinstance(path, str) or not looks_like_repo_id(path):
        if not local.exists():
            raise MissingFileError(f"{path}: no such checkpoint directory")
        return local
    return _snapshot(path, revision=revision, cache_dir=Path(cache_dir) if cache_dir else hf_cache_dir())


def load_pretrained(path: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, step: int | None = None) -> tuple[Any, Any, Any]:
    """(T5Config, params, T5Tokenizer or None) of an HF T5 directory (config.json + weights), a TWOLAR-JAX
    MODEL_DIR (model_config.json; `step` picks a checkpoint) or a hub id: what both rerankers'
    `from_pretrained` read. The tokenizer is the directory's spiece.model when it has one."""
    from twolar_jax.errors import CheckpointError
    from twolar_jax.tokenizer import T5Tokenizer

    path = resolve_checkpoint(path, revision=revision, cache_dir=cache_dir)
    if (path / "config.json").exists():
        from twolar_jax.hf_conversion import load_hf_checkpoint
        config, params = load_hf_checkpoint(path)
    elif (path / "model_config.json").exists():
        from twolar_jax.checkpointing import load_inference_params
        config, params = load_inference_params(path, step=step)
    else:
        raise CheckpointError(f"{path}: neither an HF T5 dir (config.json) nor a TWOLAR-JAX model dir "
                              "(model_config.json)")
    tokenizer = T5Tokenizer(path / "spiece.model") if (path / "spiece.model").exists() else None
    return config, params, tokenizer


def _snapshot(repo_id: str, *, revision: str | None, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = is_offline()

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir), local_files_only=offline,
                                      allow_patterns=patterns))

    try:
        folder = download(_CONFIG_FILES + _SAFETENSORS)
        if not offline and not any(folder.glob("*.safetensors")):  # an older repo with torch weights only
            folder = download(_CONFIG_FILES + _TORCH_BIN)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = cache_dir / ("models--" + repo_id.replace("/", "--"))
        how = "HF_HUB_OFFLINE is set, so only the local cache was searched" if offline else \
            "and the Hugging Face hub did not provide it"
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingFileError(f"{repo_id}: no such checkpoint directory, and no Hugging Face snapshot of "
                               f"'{repo_id}' (revision {revision or 'main'}) in the cache {where}; {how} "
                               f"({type(e).__name__}: {detail})") from None
    return folder
