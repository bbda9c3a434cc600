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

from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, BatchError, FeatureSet

NUMPY_DTYPES = {"int32": np.int32, "float32": np.float32, "bool": np.bool_}


def _signature_names(features: FeatureSet) -> tuple[str, ...]:
    """has_batch, rows, each non-batch dimension's size (by its option name), each optional feature's presence."""
    dims = dict.fromkeys(d for f in features for d in f.dims if d != "batch")
    return ("has_batch", "rows", *dims, *(f.name for f in features if not f.required))


def padded_rows(rows: int, *, parallelism: int, process_count: int) -> int:
    """The fewest rows, at least `rows` (and one), whose global batch (rows x process_count) the batch
    sharding's `parallelism` divides."""
    step = parallelism // math.gcd(parallelism, process_count)
    return max(1, -(-rows // step)) * step


def pad_batch(batch: Mapping[str, Any], rows: int, features: FeatureSet = LISTWISE_GROUP_BATCH) -> dict[str, np.ndarray]:
    """`batch` with rows of zeros added up to `rows` (for the pointwise batch: no tokens, no real passage,
    so no pair); one dtype per feature, so padded, empty and read batches compile to one program."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value, NUMPY_DTYPES[features[name].dtype])
        out[name] = np.concatenate([value, np.zeros((rows - value.shape[0],) + value.shape[1:], value.dtype)])
    return out


def empty_batch(rows: int, group_size: int, max_length: int, teacher_scores: bool) -> dict[str, np.ndarray]:
    """A pointwise batch of `rows` queries without a real passage, for a host whose shard has run out."""
    sizes = {"batch": rows, "group_size": group_size, "max_length": max_length}
    return _empty(LISTWISE_GROUP_BATCH, sizes, {"teacher_scores"} if teacher_scores else set())


def _empty(features: FeatureSet, sizes: Mapping[str, int], optional: set) -> dict[str, np.ndarray]:
    return {f.name: np.zeros(tuple(sizes[d] for d in f.dims), NUMPY_DTYPES[f.dtype])
            for f in features if f.required or f.name in optional}


def signature(batch: Optional[Mapping[str, Any]], features: FeatureSet = LISTWISE_GROUP_BATCH) -> np.ndarray:
    """What a host tells the others about its next batch (None: it has none), as int32 (`_signature_names`)."""
    names = _signature_names(features)
    if batch is None:
        return np.zeros(len(names), np.int32)
    sizes = features.sizes(batch)
    values = [1, sizes["batch"]] + [sizes[d] for d in names[2:] if d in sizes]
    values += [int(f.name in batch) for f in features if not f.required]
    return np.array(values, np.int32)


def allgather(process_count: int) -> Callable[[np.ndarray], np.ndarray]:
    """Every process's signature, [process_count, len(_SIGNATURE)]; in one process no collective runs."""
    if process_count == 1:
        return lambda sig: sig[None]
    from jax.experimental import multihost_utils

    return lambda sig: np.asarray(multihost_utils.process_allgather(sig))


def lockstep_batches(source: Iterable[Mapping[str, Any]], *, parallelism: int, process_count: int,
                     gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     where: str = "validation",
                     features: FeatureSet = LISTWISE_GROUP_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `source` (its shard; checked against the feature declaration), padded so that every
    host yields the same number of batches of the same shape: rows are raised to the most any host has had
    so far (rounded up for the batch sharding: one compiled shape, normally the full batch's), and a host
    whose shard is done yields empty batches until every host's is. `gather` exchanges the signatures
    (default: `allgather(process_count)`)."""
    gather = gather or allgather(process_count)
    batches, rows = iter(source), 0
    for index in itertools.count():
        batch = next(batches, None)
        if batch is not None:
            batch = features.select(batch)
            features.validate(batch, where=f"{where} batch {index}")
        names = _signature_names(features)
        hosts = np.asarray(gather(signature(batch, features))).reshape(process_count, len(names))
        present = hosts[hosts[:, 0] == 1]
        if not len(present):
            return
        shapes = {tuple(int(x) for x in sig[2:]) for sig in present}
        if len(shapes) > 1:
            described = ", ".join(f"host {i}: {dict(zip(names[1:], map(int, sig[1:])))}"
                                  for i, sig in enumerate(hosts) if sig[0])
            raise BatchError(f"{where} batch {index}: hosts read batches of different shapes ({described}); "
                             "every host must read with the same group_size, max_length and features")
        shape = dict(zip(names[2:], shapes.pop()))
        rows = padded_rows(max(rows, int(present[:, 1].max())), parallelism=parallelism, process_count=process_count)
        optional = {f.name for f in features if not f.required and shape.get(f.name)}
        yield pad_batch(batch, rows, features) if batch is not None else _empty(features, {**shape, "batch": rows},
                                                                                 optional)
