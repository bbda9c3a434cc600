"""Evaluation batches that every host steps through together, all of one shape.

Why: a validation set is read once, not repeated, so its last batch is short, and on a pod each host reads
its own shard, whose size differs from host to host. A short batch whose rows the mesh's batch sharding
does not divide fails to be placed (9 queries in batches of 8 over 8 devices: a batch of 1), and a host
that runs out of batches before the others would leave them waiting at the next collective for ever.
So before each batch the hosts tell one another whether they have one and of which shape (a few integers,
`multihost_utils.process_allgather`); they stop together when none has, and fill their rows (or a whole
batch) with queries that have no real passage, which weigh nothing in the metrics (`num_queries`).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from twolar_jax.trainer import BATCH_FEATURES, BatchError, select_features, validate_batch

# One dtype per feature, so that padded, empty and read batches (and every host's) compile to one program.
FEATURE_DTYPES = {name: np.float32 if kind == "float" else np.int32 for name, (_, kind, _) in BATCH_FEATURES.items()}
_SIGNATURE = ("has_batch", "rows", "group_size", "max_length", "teacher_scores")


def padded_rows(rows: int, *, parallelism: int, process_count: int) -> int:
    """The fewest rows, at least `rows` (and one), whose global batch (rows x process_count) the batch
    sharding's `parallelism` divides."""
    step = parallelism // math.gcd(parallelism, process_count)
    return max(1, -(-rows // step)) * step


def pad_batch(batch: Mapping[str, Any], rows: int) -> dict[str, np.ndarray]:
    """`batch` with rows added up to `rows`: no tokens, no real passage (passage_mask 0), so no pair."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value, FEATURE_DTYPES[name])
        out[name] = np.concatenate([value, np.zeros((rows - value.shape[0],) + value.shape[1:], value.dtype)])
    return out


def empty_batch(rows: int, group_size: int, max_length: int, teacher_scores: bool) -> dict[str, np.ndarray]:
    """A batch of `rows` queries without a real passage, for a host whose shard has run out."""
    names = [n for n, (_, _, required) in BATCH_FEATURES.items() if required or (teacher_scores and n == "teacher_scores")]
    return {n: np.zeros((rows, group_size, max_length) if n == "encoder_input_tokens" else (rows, group_size),
                        FEATURE_DTYPES[n]) for n in names}


def signature(batch: Optional[Mapping[str, Any]]) -> np.ndarray:
    """What a host tells the others about its next batch (None: it has none): `_SIGNATURE` as int32."""
    if batch is None:
        return np.zeros(len(_SIGNATURE), np.int32)
    b, n, length = np.shape(batch["encoder_input_tokens"])
    return np.array([1, b, n, length, int("teacher_scores" in batch)], np.int32)


def allgather(process_count: int) -> Callable[[np.ndarray], np.ndarray]:
    """Every process's signature, [process_count, len(_SIGNATURE)]; in one process no collective runs."""
    if process_count == 1:
        return lambda sig: sig[None]
    from jax.experimental import multihost_utils

    return lambda sig: np.asarray(multihost_utils.process_allgather(sig))


def lockstep_batches(source: Iterable[Mapping[str, Any]], *, parallelism: int, process_count: int,
                     gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     where: str = "validation") -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `source` (its shard; checked with `validate_batch`), padded so that every
    host yields the same number of batches of the same shape: rows are raised to the most any host has had
    so far (rounded up for the batch sharding: one compiled shape, normally the full batch's), and a host
    whose shard is done yields empty batches until every host's is. `gather` exchanges the signatures
    (default: `allgather(process_count)`)."""
    gather = gather or allgather(process_count)
    batches, rows = iter(source), 0
    for index in itertools.count():
        batch = next(batches, None)
        if batch is not None:
            batch = select_features(batch)
            validate_batch(batch, where=f"{where} batch {index}")
        hosts = np.asarray(gather(signature(batch))).reshape(process_count, len(_SIGNATURE))
        present = hosts[hosts[:, 0] == 1]
        if not len(present):
            return
        shapes = {tuple(int(x) for x in sig[2:]) for sig in present}
        if len(shapes) > 1:
            described = ", ".join(f"host {i}: {dict(zip(_SIGNATURE[1:], map(int, sig[1:])))}"
                                  for i, sig in enumerate(hosts) if sig[0])
            raise BatchError(f"{where} batch {index}: hosts read batches of different shapes ({described}); "
                             "every host must read with the same group_size, max_length and features")
        group_size, max_length, teacher_scores = shapes.pop()
        rows = padded_rows(max(rows, int(present[:, 1].max())), parallelism=parallelism, process_count=process_count)
        yield pad_batch(batch, rows) if batch is not None else empty_batch(rows, group_size, max_length,
                                                                           bool(teacher_scores))
