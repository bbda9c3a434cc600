"""The LLM call cache: every answered window on disk, keyed by sha256(model + request).

Why: a distillation build runs for days against a paid API. The cache is an append-only JSONL
(twolar_jax.durable_io), so a re-run answers every window it has seen without a call, and a kill -9
loses at most the line being written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from twolar_jax.durable_io import AppendOnlyJsonl, read_jsonl


def request_key(model: str, request: Mapping[str, Any]) -> str:
    """sha256 over the model name and the canonical JSON of the request (messages + sampling params).

    The API key and base URL are deliberately not part of it: the same prompt to the same model is the
    same answer whichever endpoint served it, and the key must never reach a file.
    """
    canonical = json.dumps({"model": model, "request": request}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CallCache:
    """On-disk cache of chat completions: {key, model, text, prompt_tokens, completion_tokens} per line.

    Loaded whole into memory at start (40K windows is a few tens of MB); new entries are appended and
    flushed at once (kill -9 safe) and fsynced in groups (a power cut may cost the last second of
    answers, i.e. a few repeated calls, never a wrong label). Two runs sharing one cache file must not run at the same time.
    """

    def __init__(self, path: str | os.PathLike | None, *, fsync_interval_s: float = 1.0):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self._file: AppendOnlyJsonl | None = None
        if self.path is not None:
            self._file = AppendOnlyJsonl(self.path, fsync_interval_s=fsync_interval_s)
            for _, obj in read_jsonl(self.path):
                if isinstance(obj.get("key"), str) and isinstance(obj.get("text"), str):
                    self._entries[obj["key"]] = obj

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def keys(self) -> set[str]:
        return set(self._entries)

    def put(self, key: str, *, model: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        entry = {"key": key, "model": model, "text": text, "prompt_tokens": int(prompt_tokens),
                 "completion_tokens": int(completion_tokens)}
        self._entries[key] = entry
        if self._file is not None:
            self._file.append(entry)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
