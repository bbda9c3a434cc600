"""Listwise reranking with a Fusion-in-Decoder T5 (LiT5 / FIRST): `ListwiseReranker.from_pretrained(p).rank(q, docs)`.

A query's candidates are reordered by sliding windows, back to front (`listwise_inputs.sliding_windows`:
window 20, stride 10 over a top-100 is 9 windows), each window reordered either by the first generated
identifier's logits (`method="first"`, FIRST: one decoder step) or by the permutation the decoder writes
(`method="generate"`, LiT5: greedy decoding, parsed as rank_llm parses it). Window k of a query depends on
window k-1 of the same query, but not on other queries: `rank_many` steps through the window positions
and sends the windows of ALL queries at one position through the device together, in full batches of
`batch_size` windows, as LiT5 batches them. Both programs are jitted with the project's `Partitioner`
(windows split over the batch axes, parameters laid out by the model's logical axes), so a mesh of several
devices scores the same windows as one device.

The score convention: a listwise model orders, it does not score, so `RankedDoc.score` is 1 / rank (1.0,
0.5, 0.333, ...), strictly decreasing with the final rank, positive, and written as is to TREC runs.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twolar_jax import partitioning, scoring_runtime
from twolar_jax.errors import CheckpointError, OptionError, check_choice
from twolar_jax.model.config import T5Config
from twolar_jax.partitioner import PartitionedFunction
from twolar_jax.ranking import listwise_inputs as li
from twolar_jax.ranking.listwise import FiDRanker
from twolar_jax.reranker import DTYPES, RankedDoc, _check_docs, _check_top_k, _positive_int
from twolar_jax.tokenizer import T5Tokenizer

METHODS = ("first", "generate")
TOKENS_PER_IDENTIFIER = 4  # `▁[`, the identifier, `]`, `▁>`: the decoder's budget per passage
QueryDocs = tuple  # (query, docs) or (query, docs, doc_ids)


def check_options(*, method: str = "first", window: int = li.DEFAULT_WINDOW, stride: int = li.DEFAULT_STRIDE,
                  passage_length: int = li.DEFAULT_PASSAGE_LENGTH, dtype: str = "float32", batch_size: int = 8,
                  devices: Sequence[jax.Device] | None = None, mesh_shape: Sequence[int] = (-1, 1, 1),
                  logical_axis_rules: Any = None, **_: Any) -> None:
    """Every constructor option, checked before any weights are read (from_pretrained calls it first)."""
    check_choice("method", method, METHODS)
    li.check_window(window, stride)
    _positive_int("passage_length", passage_length)
    if passage_length < 2:
        raise OptionError(f"passage_length={passage_length}: must be >= 2 (one token and EOS)")
    check_choice("dtype", dtype, DTYPES)
    _positive_int("batch_size", batch_size)
    if devices is not None and not list(devices):
        raise OptionError("devices=[]: need at least one device")
    scoring_runtime.check_mesh_shape(mesh_shape, len(list(devices or jax.local_devices())))
    partitioning.check_rules(logical_axis_rules)


def rank_score(rank: int) -> float:
    """The score of the doc at 1-based `rank`: 1 / rank, strictly decreasing (docs/listwise.md)."""
    return 1.0 / rank


class ListwiseReranker:
    """Ranks each query's candidates with a FiD T5 over sliding windows.

    config: a T5Config (read as `FiDRanker(config, window=window)`) or a `FiDRanker`.
    method: "first" (reorder a window by the first identifier's logits, stable on ties) or "generate"
    (greedy-decode `[a] > [b] > ...`, parsed by `parse_permutation`: always a permutation).
    window / stride: the sliding windows (window >= the list's length ranks it in one pass).
    passage_length: tokens per templated passage (LiT5: 150). batch_size: windows per device call,
    rounded up to a multiple of the mesh's batch parallelism. mesh_shape, devices, logical_axis_rules:
    as the `Reranker`'s ((data, fsdp, model); default replicated over all local devices).
    """

    def __init__(self, config: T5Config | FiDRanker, params: Any, *, tokenizer: T5Tokenizer | None = None,
                 method: str = "first", window: int = li.DEFAULT_WINDOW, stride: int = li.DEFAULT_STRIDE,
                 passage_length: int = li.DEFAULT_PASSAGE_LENGTH, dtype: str = "float32", batch_size: int = 8,
                 devices: Sequence[jax.Device] | None = None, mesh_shape: Sequence[int] = (-1, 1, 1),
                 logical_axis_rules: Sequence[tuple[str, Any]] | None = None) -> None:
        check_options(method=method, window=window, stride=stride, passage_length=passage_length, dtype=dtype,
                      batch_size=batch_size, devices=devices, mesh_shape=mesh_shape,
                      logical_axis_rules=logical_axis_rules)
        self.tokenizer = tokenizer or T5Tokenizer()
        self.model = self._model(config, window).for_scoring(dtype=dtype, scan_layers=None)
        self.config = self.model.config
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model only "
                                  f"{self.config.vocab_size}")
        self.method, self.window, self.stride, self.passage_length = method, window, stride, passage_length
        self.max_decode_length = TOKENS_PER_IDENTIFIER * window
        self.devices = list(devices or jax.local_devices())
        self.partitioner = scoring_runtime.build_partitioner(mesh_shape, self.devices, logical_axis_rules)
        self.parallelism = self.partitioner.batch_parallelism
        self.batch_size = scoring_runtime.round_batch_size(batch_size, self.parallelism)
        self.params = scoring_runtime.place_params(self.model.prepare_params(params), self.model, self.partitioner)
        self._program = self._partition()

    def _model(self, config: T5Config | FiDRanker, window: int) -> FiDRanker:
        """A T5Config becomes FiDRanker over `window` slots with this tokenizer's identifier pieces."""
        if isinstance(config, FiDRanker):
            if config.window < window:
                raise OptionError(f"window={window}: the model {type(config).__name__} has only {config.window} slots")
            return config
        if not isinstance(config, T5Config):
            raise TypeError(f"config must be a T5Config or a FiDRanker, not {type(config).__name__}")
        ids = tuple(int(i) for i in li.identifier_ids(self.tokenizer, window))
        return FiDRanker(config, identifier_ids=ids, window=window)

    def _partition(self) -> PartitionedFunction:
        """The window program, jitted with shardings: windows split on the batch axes, params by their axes."""
        p = self.partitioner
        param_shardings = p.param_shardings(self.model.param_logical_axes(), self.params)
        windows, rows = p.sharding(("batch", None, None)), p.sharding(("batch", None))
        if self.method == "first":
            def first(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
                return self.model.scores(params, {"encoder_input_tokens": tokens, "passage_mask": mask})
            return p.partition(first, in_shardings=(param_shardings, windows, rows), out_shardings=rows)

        from twolar_jax.generation import _generate  # the one greedy decoder (KV cache, FiD for [B, n, L])
        decode = functools.partial(_generate, config=self.config, top_k=0, sample=False)

        def generate(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            del mask  # empty slots are all-padding passages: masked by their tokens
            out = decode(params, tokens, jax.random.PRNGKey(0), jnp.float32(1.0),
                         max_decode_length=TOKENS_PER_IDENTIFIER * tokens.shape[1])
            return jnp.pad(out, ((0, 0), (0, self.max_decode_length - out.shape[1])))
        return p.partition(generate, in_shardings=(param_shardings, windows, rows), out_shardings=rows)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, step: int | None = None,
                        **kwargs: Any) -> "ListwiseReranker":
        """An HF T5 directory (LiT5-Distill, a FIRST T5), a TWOLAR-JAX MODEL_DIR or a hub id, as
        `Reranker.from_pretrained`; options are checked before any weights are read."""
        inspect.signature(cls).bind(None, None, **kwargs)  # an unknown option is a TypeError now
        check_options(**kwargs)
        from twolar_jax.hub import load_pretrained
        config, params, tokenizer = load_pretrained(path, revision=revision, cache_dir=cache_dir, step=step)
        if "tokenizer" not in kwargs and tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        return cls(config, params, **kwargs)

    # --- ranking ---------------------------------------------------------------------------------
    def rank(self, query: str, docs: Sequence[str], doc_ids: Sequence[str] | None = None,
             top_k: int | None = None) -> list[RankedDoc]:
        """Docs best first after the sliding windows; score = 1 / rank."""
        return self.rank_many([(query, docs, doc_ids)], top_k=top_k)[0]

    def rank_many(self, queries_with_docs: Sequence[QueryDocs], top_k: int | None = None) -> list[list[RankedDoc]]:
        """Each (query, docs[, doc_ids]) ranked as `rank` ranks it alone; window position k of every query
        goes through the device together, so batches stay full across queries."""
        _check_top_k(top_k)
        items = [_check_item(i, item) for i, item in enumerate(queries_with_docs)]
        orders = [list(range(len(docs))) for _, docs, _ in items]
        plans = [li.sliding_windows(len(docs), window=self.window, stride=self.stride) for _, docs, _ in items]
        for position in range(max((len(p) for p in plans), default=0)):
            jobs = [(q, plans[q][position]) for q in range(len(items)) if position < len(plans[q])]
            windows = [[items[q][1][d] for d in orders[q][start:end]] for q, (start, end) in jobs]
            perms = self.reorder_windows([items[q][0] for q, _ in jobs], windows)
            for (q, (start, end)), perm in zip(jobs, perms):
                orders[q] = li.apply_window(orders[q], start, end, perm)
        return [_ranked(order, docs, ids, top_k) for order, (_, docs, ids) in zip(orders, items)]

    def reorder_windows(self, queries: Sequence[str], windows: Sequence[Sequence[str]]) -> list[list[int]]:
        """Each window's permutation (slot indices best first), windows in batches of `batch_size`; the
        host encodes batch i+1 while the device runs batch i, and results are fetched at the end."""
        pending = []
        for lo in range(0, len(windows), self.batch_size):
            chunk = range(lo, min(lo + self.batch_size, len(windows)))
            tokens, mask = self._encode_batch([queries[i] for i in chunk], [windows[i] for i in chunk])
            pending.append((chunk, self._program(self.params, tokens, mask)))
        perms: list[list[int]] = []
        for chunk, out in pending:
            out = np.asarray(out)
            perms.extend(self._permutation(out[r], len(windows[i])) for r, i in enumerate(chunk))
        return perms

    def _encode_batch(self, queries: Sequence[str], windows: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [rows, slots, passage_length], mask [rows, slots]: slots = the batch's longest window (a
        list shorter than `window` pays for its own length only; empty slots are masked either way), rows
        padded with empty windows to a multiple of the batch parallelism (`rows_for`: a handful of shapes)."""
        rows = scoring_runtime.rows_for(len(windows), batch_size=self.batch_size, parallelism=self.parallelism)
        slots = max(1, max(len(w) for w in windows))
        tokens = np.zeros((rows, slots, self.passage_length), np.int32)
        mask = np.zeros((rows, slots), np.int32)
        for r, (query, passages) in enumerate(zip(queries, windows)):
            tokens[r], mask[r] = li.encode_window(self.tokenizer, query, passages, window=slots,
                                                  passage_length=self.passage_length)
        return tokens, mask

    def _permutation(self, row: np.ndarray, n: int) -> list[int]:
        """One window's order from its program output: scores sorted (descending, stable) or decoded text."""
        if self.method == "first":
            return [int(i) for i in np.argsort(-row[:n].astype(np.float64), kind="stable")]
        ids = row.tolist()
        for stop in (self.config.eos_token_id, 0):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return li.parse_permutation(self.tokenizer.decode(ids), n)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "window": self.window, "stride": self.stride,
                "passage_length": self.passage_length, "dtype": self.config.dtype, "batch_size": self.batch_size,
                "devices": len(self.devices), "mesh": partitioning.mesh_shape_str(self.partitioner.mesh)}


def _check_item(i: int, item: Any) -> tuple[str, Sequence[str], Sequence[str]]:
    """(query, docs[, doc_ids]) checked, doc_ids defaulting to "0", "1", ..."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(f"rank_many: item {i} must be (query, docs) or (query, docs, doc_ids)")
    query, docs, doc_ids = (*item, None) if len(item) == 2 else item
    if not isinstance(query, str):
        raise TypeError(f"rank_many: item {i}: query must be a str, not {type(query).__name__}")
    _check_docs("docs", docs)
    if not all(isinstance(d, str) for d in docs):
        raise TypeError(f"rank_many: item {i}: docs must be strings")
    doc_ids = [str(j) for j in range(len(docs))] if doc_ids is None else doc_ids
    _check_docs("doc_ids", doc_ids)
    if len(doc_ids) != len(docs):
        raise ValueError(f"rank_many: item {i}: {len(docs)} docs but {len(doc_ids)} doc_ids")
    return query, docs, doc_ids


def _ranked(order: list[int], docs: Sequence[str], doc_ids: Sequence[str], top_k: int | None) -> list[RankedDoc]:
    order = order if top_k is None else order[:top_k]
    return [RankedDoc(str(doc_ids[d]), rank_score(r + 1), r + 1, docs[d]) for r, d in enumerate(order)]
