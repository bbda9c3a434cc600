"""The public reranking API: `Reranker.from_pretrained(path_or_hub_id).rank(query, docs)`.

Pairs are tokenized on a background thread, sorted into batches of similar length and padded to a
length bucket and the batch size (a partial batch to the next power of two), so jit compiles a bounded
set of shapes however many documents come in; the device scores one batch while the next is assembled,
and results are fetched a few batches behind dispatch (`scoring_runtime`). Parameters are laid out on a
(data, fsdp, model) mesh by the training rules: replicated by default, fsdp or tensor parallel for
models that do not fit one device. Only the vocabulary entries a score head reads are computed.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np

from twolar_jax import executable_cache, host_heap, partitioning, scoring_runtime
from twolar_jax.errors import CheckpointError, OptionError, check_choice
from twolar_jax.model.config import T5Config
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.ranking.pointwise_inputs import check_encoding_options, short_repr
from twolar_jax.scoring import check_head, resolve_score_tokens
from twolar_jax.tokenizer import T5Tokenizer

DTYPES = ("float32", "bfloat16")
Pair = tuple[str, str]


@dataclass(frozen=True)
class RankedDoc:
    doc_id: str
    score: float
    rank: int
    text: str


def default_length_buckets(max_length: int) -> tuple[int, ...]:
    """16, 32, ..., 128, then four steps per doubling (160, 192, 224, 256, 320, ...) up to max_length.

    An input pads at most 16 tokens below 128 and a quarter of its length above: fine enough that
    `plan_batches` pads DL19's BM25 top-100 pairs by 17% per query (the old 64, 96, 128, 192, ... buckets
    filled one by one padded 41%), coarse enough that a dataset compiles a dozen or two shapes."""
    buckets, size, step = [], 16, 16
    while size < max_length:
        buckets.append(size)
        if size >= 128 and size & (size - 1) == 0:  # from 128, each doubling in four steps
            step = size // 4
        size += step
    return tuple(buckets + [max_length])


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"{name}={value!r}: must be an integer >= 1")


def check_options(*, score_head: str = "difference", dtype: str = "float32", batch_size: int = 32,
                  max_length: int = 512, truncation: str = "document", length_buckets: Sequence[int] | None = None,
                  devices: Sequence[jax.Device] | None = None, mesh_shape: Sequence[int] = (-1, 1, 1),
                  logical_axis_rules: Any = None, compile_cache: bool = True, prefetch: int = 4,
                  scan_layers: bool | None = True, **_: Any) -> None:
    """Every constructor option, checked without touching weights (from_pretrained calls it first)."""
    check_head(score_head)
    check_choice("dtype", dtype, DTYPES)
    check_encoding_options(max_length=max_length, truncation=truncation)
    _positive_int("batch_size", batch_size)
    _positive_int("prefetch", prefetch)
    if length_buckets is not None:
        if isinstance(length_buckets, (str, bytes)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in length_buckets):
            raise OptionError(f"length_buckets={length_buckets!r}: expected positive integers")
        if not length_buckets or max(length_buckets) < max_length:
            raise OptionError(f"length_buckets {tuple(sorted(length_buckets))} must reach max_length={max_length}")
    if devices is not None and not list(devices):
        raise OptionError("devices=[]: need at least one device")
    scoring_runtime.check_mesh_shape(mesh_shape, len(list(devices or jax.local_devices())))
    partitioning.check_rules(logical_axis_rules)
    if not isinstance(compile_cache, bool):
        raise OptionError(f"compile_cache={compile_cache!r}: expected True or False")
    if scan_layers is not None and not isinstance(scan_layers, bool):
        raise OptionError(f"scan_layers={scan_layers!r}: expected True, False or None")


def _check_docs(name: str, docs: Any) -> None:
    """A str is a Sequence too: refuse it here rather than rank its characters."""
    if isinstance(docs, (str, bytes)) or not (hasattr(docs, "__len__") and hasattr(docs, "__getitem__")):
        raise TypeError(f"{name} must be a sequence of strings (a list), not {type(docs).__name__}")


def _check_top_k(top_k: Any) -> None:
    if top_k is not None:
        _positive_int("top_k", top_k)


class Reranker:
    """A scorer of (query, document) pairs for any ranking model; by default the T5 cross-encoder scoring
    `Query: q Document: d Relevant:` on the first decoder step.

    config: a T5Config (the pointwise cross-encoder with `score_head`) or any `RankingModel`, whose own text
    path (`pair_encoder`) and `scores` are used.

    mesh_shape: (data, fsdp, model) sizes over `devices` (default: all local devices), one may be -1;
    (-1, 1, 1) replicates the parameters, (1, -1, 1) shards them fsdp, (1, 2, 4) adds tensor parallelism.
    logical_axis_rules: the rule table mapping the model's logical axes onto those mesh axes (default:
    gin/mesh/rules.gin, the training table). compile_cache: use the persistent compilation cache, and keep
    the compiled scoring programs beside it (`executable_cache`: a fresh process skips tracing them).
    length_buckets: the lengths a batch may be padded to (default: `default_length_buckets(max_length)`);
    fewer buckets compile fewer shapes, more pad fewer tokens.
    prefetch: how many assembled batches the tokenizer thread may run ahead of the device.
    scan_layers: score with the layers under one scanned body (True, the default), unrolled (False) or as
    the config says (None); either parameter tree is converted. Scanned, a fresh process loads and first
    runs each stored program about 6x faster (warm start, flan-t5-small, 100 candidates: 0.31 s against
    1.79 s over the second call), for about 4% of steady CPU throughput (docs/training.md, "Warm starts").
    """

    def __init__(self, config: T5Config | RankingModel, params: Any, *, tokenizer: T5Tokenizer | None = None,
                 score_head: str = "difference", dtype: str = "float32", batch_size: int = 32, max_length: int = 512,
                 truncation: str = "document", length_buckets: Sequence[int] | None = None,
                 devices: Sequence[jax.Device] | None = None, mesh_shape: Sequence[int] = (-1, 1, 1),
                 logical_axis_rules: Sequence[tuple[str, Any]] | None = None, compile_cache: bool = True,
                 prefetch: int = 4, scan_layers: bool | None = True) -> None:
        check_options(score_head=score_head, dtype=dtype, batch_size=batch_size, max_length=max_length,
                      truncation=truncation, length_buckets=length_buckets, devices=devices, mesh_shape=mesh_shape,
                      logical_axis_rules=logical_axis_rules, compile_cache=compile_cache, prefetch=prefetch,
                      scan_layers=scan_layers)
        cache_dir = None
        if compile_cache:
            from twolar_jax.compile_cache import enable_compilation_cache
            cache_dir = enable_compilation_cache()
        self.tokenizer = tokenizer or T5Tokenizer()
        self.model = self._scoring_model(config, score_head, dtype=dtype, scan_layers=scan_layers)
        self.config = getattr(self.model, "config", None)
        if self.model.vocab_size is not None and self.tokenizer.vocab_size > self.model.vocab_size:
            raise CheckpointError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model only "
                                  f"{self.model.vocab_size}")
        self.score_head = getattr(self.model, "score_head", type(self.model).__name__)
        self.max_length, self.truncation, self.prefetch = max_length, truncation, prefetch
        self.length_buckets = tuple(sorted(set(length_buckets or default_length_buckets(max_length))))
        self._encode = self.model.pair_encoder(self.tokenizer, max_length=max_length, truncation=truncation)
        self.devices = list(devices or jax.local_devices())
        self.partitioner = scoring_runtime.build_partitioner(mesh_shape, self.devices, logical_axis_rules)
        self.mesh, self.rules = self.partitioner.mesh, self.partitioner.rules
        self.parallelism = self.partitioner.batch_parallelism
        # Round the batch up so every batch shard gets the same number of rows.
        self.batch_size = scoring_runtime.round_batch_size(batch_size, self.parallelism)
        self._batch_sharding = scoring_runtime.token_sharding(self.partitioner)
        self.params = scoring_runtime.place_params(self.model.prepare_params(params), self.model, self.partitioner)
        # Compiled scoring programs kept next to the compilation cache (off with it): a fresh process loads
        # them instead of tracing and lowering the model again (docs/training.md, "Warm starts").
        self.executable_cache = executable_cache.for_compilation_cache(cache_dir)
        self._program = scoring_runtime.ScoreProgram(self.params, model=self.model, partitioner=self.partitioner,
                                                     cache=self.executable_cache)
        self._dispatched_shapes: set[tuple[int, ...]] = set()

    def _scoring_model(self, model: T5Config | RankingModel, score_head: str, *, dtype: str,
                       scan_layers: bool | None) -> RankingModel:
        """A T5Config is the pointwise cross-encoder with `score_head`; any RankingModel scores as it is."""
        if isinstance(model, RankingModel):
            if score_head != "difference":
                raise OptionError(f"score_head={score_head!r}: the model {type(model).__name__} carries its own head")
            if model.score_features.names != ("encoder_input_tokens",) or model.score_features.features[0].rank != 2:
                raise OptionError(f"{type(model).__name__} scores {model.score_features.names}, not rows of pair "
                                  "tokens: the Reranker scores (query, document) pairs (a listwise model: "
                                  "ListwiseReranker)")
        else:
            model = PointwiseCrossEncoder(model, score_head=score_head, score_tokens=resolve_score_tokens(self.tokenizer))
        return model.for_scoring(dtype=dtype, scan_layers=scan_layers)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, config: T5Config, params: Any, **kwargs: Any) -> "Reranker":
        return cls(config, params, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, step: int | None = None,
                        **kwargs: Any) -> "Reranker":
        """An HF T5 directory (config.json + weights), one of our training MODEL_DIRs (model_config.json),
        or a Hugging Face hub id ("castorini/monot5-base-msmarco": the HF cache, downloaded unless
        HF_HUB_OFFLINE=1). Options are checked before any weights are read."""
        inspect.signature(cls).bind(None, None, **kwargs)  # an unknown option is a TypeError now, not later
        check_options(**kwargs)
        from twolar_jax.hub import load_pretrained
        config, params, tokenizer = load_pretrained(path, revision=revision, cache_dir=cache_dir, step=step)
        if "tokenizer" not in kwargs and tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        return cls(config, params, **kwargs)

    # --- tokenization ----------------------------------------------------------------------------
    def encode_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[int]]:
        return list(self._encode(zip(queries, docs)))

    # --- scoring ---------------------------------------------------------------------------------
    def score_pairs(self, queries: Sequence[str] | Sequence[Pair], docs: Sequence[str] | None = None, *,
                    show_progress: bool = False) -> np.ndarray:
        """fp32 scores of (query, doc) pairs, in input order: `score_pairs(queries, docs)` or
        `score_pairs([(query, doc), ...])`."""
        pairs = _as_pairs(queries, docs)
        (scores,) = self._stream(self._group_items(0, self._encode(pairs)), show_progress=show_progress)
        return scores

    def score_groups(self, groups: Iterable[Sequence[Pair]], *, show_progress: bool = False) -> Iterator[np.ndarray]:
        """Scores of each group of (query, doc) pairs, yielded in order as soon as a group is scored.

        One stream for many groups keeps the device busy across group boundaries: later groups are
        tokenized while earlier ones are scored, and each group's scores equal `score_pairs` on it alone.
        `groups` is read on a background thread; close the iterator (or exhaust it) to stop that thread.
        """
        def items():
            for g, group in enumerate(groups):
                try:
                    yield from self._group_items(g, self._encode(_as_pairs(group, None)))
                except (OptionError, TypeError) as e:
                    raise type(e)(f"score_groups: group {g}: {e}") from None

        return self._stream(items(), show_progress=show_progress)

    def score_token_ids(self, encoded: Sequence[Sequence[int]], *, show_progress: bool = False) -> np.ndarray:
        """fp32 scores of already-tokenized inputs (each ending in EOS), in input order."""
        if not encoded:
            return np.zeros(0, np.float32)
        lengths = np.array([len(ids) for ids in encoded])
        if lengths.max() > self.length_buckets[-1]:
            raise ValueError(f"input {int(lengths.argmax())} has {lengths.max()} tokens, more than the longest "
                             f"length bucket {self.length_buckets[-1]}")
        for i, ids in enumerate(encoded):
            vocab = self.model.vocab_size
            if len(ids) and vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
                bad = max(ids) if max(ids) >= vocab else min(ids)
                raise ValueError(f"input {i}: token id {bad} is outside the vocabulary [0, {vocab})")
        (scores,) = self._stream(self._group_items(0, encoded), show_progress=show_progress)
        return scores

    def _group_items(self, group: int, encoded: Iterable[Sequence[int]]):
        return scoring_runtime.group_batches(group, encoded, buckets=self.length_buckets, batch_size=self.batch_size,
                                             parallelism=self.parallelism, on_plan=self._program.prefetch)

    def _dispatch(self, tokens: np.ndarray) -> jax.Array:
        scores = self._program(jax.device_put(tokens, self._batch_sharding))
        if tokens.shape not in self._dispatched_shapes:
            # A new shape has just compiled: on a kept host heap (the CLIs on CPU) the compiler's freed memory
            # goes back to the system, else a run over many length buckets keeps every compile's garbage
            # (flan-t5-small, 24 shapes: 1.83 GB resident without this, 1.39 GB with it). A no-op otherwise.
            self._dispatched_shapes.add(tokens.shape)
            host_heap.trim()
        return scores

    def _stream(self, items: Iterable, *, show_progress: bool) -> Iterator[np.ndarray]:
        bar = None
        if show_progress:
            from tqdm import tqdm
            bar = tqdm(desc="score", unit="pair")
        try:
            yield from scoring_runtime.stream_scores(items, self._dispatch, prefetch=self.prefetch,
                                                     on_scored=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    def _rows_for(self, n: int) -> int:
        """Rows of a batch holding n pairs (see scoring_runtime.rows_for)."""
        return scoring_runtime.rows_for(n, batch_size=self.batch_size, parallelism=self.parallelism)

    def rank(self, query: str, docs: Sequence[str], doc_ids: Sequence[str] | None = None,
             top_k: int | None = None, *, show_progress: bool = False) -> list[RankedDoc]:
        """Docs sorted by score, best first; ties keep input order (deterministic)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, not {type(query).__name__}")
        _check_docs("docs", docs)
        _check_top_k(top_k)
        if doc_ids is None:
            doc_ids = [str(i) for i in range(len(docs))]
        _check_docs("doc_ids", doc_ids)
        if len(doc_ids) != len(docs):
            raise ValueError(f"rank: {len(docs)} docs but {len(doc_ids)} doc_ids")
        if not docs:
            return []
        scores = self.score_pairs([query] * len(docs), docs, show_progress=show_progress)
        order = np.lexsort((np.arange(len(docs)), -scores.astype(np.float64)))
        if top_k is not None:
            order = order[:top_k]
        return [RankedDoc(str(doc_ids[i]), float(scores[i]), r + 1, docs[i]) for r, i in enumerate(order)]

    def describe(self) -> str:
        return json.dumps({"score": self.score_head, "dtype": str(np.dtype(self.model.param_dtype)), "batch_size": self.batch_size,
                           "max_length": self.max_length, "devices": len(self.devices),
                           "mesh": partitioning.mesh_shape_str(self.mesh)})


def _as_pairs(queries: Any, docs: Any) -> list[Pair]:
    """(queries, docs) or a sequence of (query, doc) pairs, as checked pairs of strings."""
    if docs is None:
        _check_docs("pairs", queries)
        pairs = []
        for i, pair in enumerate(queries):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"score_pairs: pair {i} is {short_repr(pair)}, expected a (query, doc) tuple")
            pairs.append(tuple(pair))
    else:
        _check_docs("queries", queries)
        _check_docs("docs", docs)
        if len(queries) != len(docs):
            raise ValueError(f"score_pairs: {len(queries)} queries but {len(docs)} docs")
        pairs = list(zip(queries, docs))
    for i, (q, d) in enumerate(pairs):
        if not isinstance(q, str) or not isinstance(d, str):
            raise TypeError(f"score_pairs: pair {i} is ({type(q).__name__}, {type(d).__name__}), expected strings")
    return pairs
