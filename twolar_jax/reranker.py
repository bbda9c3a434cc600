"""The public reranking API: `Reranker.from_pretrained(path).rank(query, docs)`.

Pairs are tokenized on the host, grouped into a few fixed length buckets and padded to the batch size
(a last partial batch to the next power of two), so jit compiles a handful of shapes however many
documents come in; each batch is split over all local
devices along a `data` mesh axis. Only the vocabulary entries a score head reads are computed.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twolar_jax.errors import CheckpointError, MissingFileError, OptionError, check_choice
from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5
from twolar_jax.scoring import check_head, head_vocab_ids, resolve_score_tokens, score_from_selected
from twolar_jax.tokenizer import T5Tokenizer, check_encoding_options, encode_query_document

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RankedDoc:
    doc_id: str
    score: float
    rank: int
    text: str


def default_length_buckets(max_length: int) -> tuple[int, ...]:
    """64, 96, 128, 192, 256, 384, ... up to max_length: at most ~1.5x padding, a handful of shapes."""
    buckets, size = [], 64
    while size < max_length:
        buckets.append(size)
        half_step = size * 3 // 2
        if half_step < max_length:
            buckets.append(half_step)
        size *= 2
    return tuple(buckets + [max_length])


@functools.partial(jax.jit, static_argnames=("config", "head", "vocab_ids"))
def _score_batch(params: Any, tokens: jax.Array, *, config: T5Config, head: str,
                 vocab_ids: tuple[int, ...]) -> jax.Array:
    selected = T5(config).apply({"params": params}, tokens, vocab_ids=vocab_ids, method=T5.first_step_logits)
    return score_from_selected(selected, head)


class Reranker:
    """A T5 cross-encoder scoring `Query: q Document: d Relevant:` on the first decoder step."""

    def __init__(self, config: T5Config, params: Any, *, tokenizer: T5Tokenizer | None = None,
                 score_head: str = "difference", dtype: str = "float32", batch_size: int = 32, max_length: int = 512,
                 truncation: str = "document", length_buckets: Sequence[int] | None = None,
                 devices: Sequence[jax.Device] | None = None) -> None:
        check_head(score_head)
        check_choice("dtype", dtype, DTYPES)
        check_encoding_options(max_length=max_length, truncation=truncation)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise OptionError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self.tokenizer = tokenizer or T5Tokenizer()
        if self.tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model only {config.vocab_size}")
        self.config = config.replace(dtype=dtype)
        self.score_head = score_head
        self.score_tokens = resolve_score_tokens(self.tokenizer)
        self.vocab_ids = head_vocab_ids(score_head, self.score_tokens)
        self.max_length = max_length
        self.truncation = truncation
        self.length_buckets = tuple(sorted(length_buckets or default_length_buckets(max_length)))
        if self.length_buckets[-1] < max_length:
            raise OptionError(f"length_buckets {self.length_buckets} must reach max_length={max_length}")
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        # Round the batch up so every device gets the same number of rows.
        n = len(self.devices)
        self.batch_size = -(-batch_size // n) * n
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data", None))
        cast = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x, cast), replicated), params)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, config: T5Config, params: Any, **kwargs: Any) -> "Reranker":
        return cls(config, params, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "Reranker":
        """An HF T5 directory (config.json + weights) or one of our training MODEL_DIRs (model_config.json)."""
        path = Path(path)
        if (path / "config.json").exists():
            from twolar_jax.hf_conversion import load_hf_checkpoint
            config, params = load_hf_checkpoint(path)
        elif (path / "model_config.json").exists():
            from twolar_jax.checkpointing import load_inference_params
            config, params = load_inference_params(path, step=kwargs.pop("step", None))
        elif not path.exists():
            raise MissingFileError(f"{path}: no such checkpoint directory")
        else:
            raise CheckpointError(f"{path}: neither an HF T5 dir (config.json) nor a TWOLAR-JAX model dir "
                                  "(model_config.json)")
        if "tokenizer" not in kwargs and (path / "spiece.model").exists():
            kwargs["tokenizer"] = T5Tokenizer(path / "spiece.model")
        return cls(config, params, **kwargs)

    # --- scoring ---------------------------------------------------------------------------------
    def encode_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[int]]:
        return [encode_query_document(self.tokenizer, q, d, max_length=self.max_length, truncation=self.truncation)
                for q, d in zip(queries, docs)]

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        """fp32 scores of (query, doc) pairs, in input order."""
        if len(queries) != len(docs):
            raise ValueError(f"score_pairs: {len(queries)} queries but {len(docs)} docs")
        for i, (q, d) in enumerate(zip(queries, docs)):
            if not isinstance(q, str) or not isinstance(d, str):
                raise TypeError(f"score_pairs: pair {i} is ({type(q).__name__}, {type(d).__name__}), expected strings")
        return self.score_token_ids(self.encode_pairs(queries, docs))

    def score_token_ids(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """fp32 scores of already-tokenized inputs (each ending in EOS), in input order."""
        scores = np.zeros(len(encoded), np.float32)
        if not encoded:
            return scores
        lengths = np.array([len(ids) for ids in encoded])
        if lengths.max() > self.length_buckets[-1]:
            raise ValueError(f"input {int(lengths.argmax())} has {lengths.max()} tokens, more than the longest "
                             f"length bucket {self.length_buckets[-1]}")
        for i, ids in enumerate(encoded):
            if ids and (min(ids) < 0 or max(ids) >= self.config.vocab_size):
                bad = max(ids) if max(ids) >= self.config.vocab_size else min(ids)
                raise ValueError(f"input {i}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        bucket_of = np.searchsorted(np.array(self.length_buckets), lengths)
        for b, bucket_len in enumerate(self.length_buckets):
            members = np.flatnonzero(bucket_of == b)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                tokens = np.zeros((self._rows_for(len(chunk)), bucket_len), np.int32)
                for row, idx in enumerate(chunk):
                    tokens[row, : lengths[idx]] = encoded[idx]
                batch = jax.device_put(tokens, self._batch_sharding)
                out = _score_batch(self.params, batch, config=self.config, head=self.score_head,
                                   vocab_ids=self.vocab_ids)
                scores[chunk] = np.asarray(out)[: len(chunk)]
        return scores

    def _rows_for(self, n: int) -> int:
        """Rows of a batch holding n pairs: the full batch, or for a last partial batch the next power of
        two (a multiple of the device count), so padding stays under 2x with a handful of shapes."""
        devices = len(self.devices)
        rows = devices
        while rows < n:
            rows *= 2
        return min(rows, self.batch_size)

    def rank(self, query: str, docs: Sequence[str], doc_ids: Sequence[str] | None = None,
             top_k: int | None = None) -> list[RankedDoc]:
        """Docs sorted by score, best first; ties keep input order (deterministic)."""
        if doc_ids is None:
            doc_ids = [str(i) for i in range(len(docs))]
        if len(doc_ids) != len(docs):
            raise ValueError(f"rank: {len(docs)} docs but {len(doc_ids)} doc_ids")
        if not docs:
            return []
        scores = self.score_pairs([query] * len(docs), docs)
        order = np.lexsort((np.arange(len(docs)), -scores.astype(np.float64)))
        if top_k is not None:
            order = order[:top_k]
        return [RankedDoc(str(doc_ids[i]), float(scores[i]), r + 1, docs[i]) for r, i in enumerate(order)]

    def describe(self) -> str:
        return json.dumps({"score": self.score_head, "dtype": self.config.dtype, "batch_size": self.batch_size,
                           "max_length": self.max_length, "devices": len(self.devices)})
