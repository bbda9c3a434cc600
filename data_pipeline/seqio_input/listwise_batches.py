"""Batches of listwise (Fusion-in-Decoder) training windows without TensorFlow: the pure-Python twin of the
seqio tasks in data_pipeline/seqio_input/listwise.py, for tests, small runs and the trainer's BatchSource.

Batch (B windows, n = window slots, L = passage_length, T = target_length), declared in
twolar_jax.ranking.features.FID_WINDOW_BATCH:
    encoder_input_tokens int32 [B, n, L], decoder_target_tokens int32 [B, T],
    teacher_ranks int32 [B, n], passage_mask int32 [B, n].
Each record gives its windows in order (twolar_jax.ranking.listwise_inputs.window_examples); a batch takes
the next B windows, across records, as the seqio path batches them.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline.distill_format import DistillRecord
from twolar_jax.errors import OptionError
from twolar_jax.ranking.features import FID_WINDOW_BATCH
from twolar_jax.ranking.listwise_inputs import (DEFAULT_PASSAGE_LENGTH, DEFAULT_TARGET_LENGTH, check_target_length,
                                                training_windows, window_examples)


def _record_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The records of one epoch: file order, or batches_from_records' seeded permutation per epoch."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def listwise_batches_from_records(records: Sequence[DistillRecord] | Iterable[DistillRecord], *, tokenizer: Any,
                                  batch_size: int, window: int, passage_length: int = DEFAULT_PASSAGE_LENGTH,
                                  target_length: int = DEFAULT_TARGET_LENGTH, seed: int = 0,
                                  shuffle: bool = False, repeat: bool = False,
                                  drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of FID_WINDOW_BATCH. `seed` keys every window's passage shuffle (listwise_inputs.window_key)
    and, with shuffle=True, the record order of each epoch; the passage shuffle is the same every epoch,
    as the seqio twin's (no stage of its pipeline knows the epoch)."""
    records = list(records)
    if not records:
        raise OptionError("listwise_batches_from_records: no records")
    if batch_size < 1:
        raise OptionError(f"batch_size={batch_size} must be >= 1")
    check_target_length(tokenizer, window=window, target_length=target_length)
    if not window_count(records, window):
        raise OptionError(f"listwise_batches_from_records: no record has 2 candidates for a window of {window}")
    pending: list[dict[str, np.ndarray]] = []
    for epoch in itertools.count():
        for i in _record_order(len(records), shuffle=shuffle, seed=seed, epoch=epoch):
            r = records[i]
            pending += window_examples(r.query, [c.text for c in r.candidates], tokenizer=tokenizer, window=window,
                                       passage_length=passage_length, target_length=target_length, seed=seed,
                                       qid=r.qid)
            while len(pending) >= batch_size:
                chunk, pending = pending[:batch_size], pending[batch_size:]
                yield {k: np.stack([w[k] for w in chunk]) for k in FID_WINDOW_BATCH.names}
        if not repeat:
            break
    if pending and not drop_remainder:
        yield {k: np.stack([w[k] for w in pending]) for k in FID_WINDOW_BATCH.names}


class ListwiseRecordSource:
    """A trainer BatchSource over in-memory records: this host's records (every num_shards-th), and
    `skip_batches` recomputed and dropped, so a resumed run sees exactly the batches it would have."""

    def __init__(self, records: Sequence[DistillRecord], *, tokenizer: Any, batch_size: int, window: int,
                 passage_length: int = DEFAULT_PASSAGE_LENGTH, target_length: int = DEFAULT_TARGET_LENGTH,
                 seed: int = 0, shuffle: bool = True, repeat: bool = True) -> None:
        self.records = list(records)
        self.kw = dict(tokenizer=tokenizer, batch_size=batch_size, window=window, passage_length=passage_length,
                       target_length=target_length, seed=seed, shuffle=shuffle, repeat=repeat,
                       drop_remainder=repeat)

    def __call__(self, *, shard_index: int, num_shards: int, skip_batches: int) -> Iterator[dict[str, np.ndarray]]:
        batches = listwise_batches_from_records(self.records[shard_index::num_shards], **self.kw)
        return itertools.islice(batches, skip_batches, None)


def window_count(records: Iterable[DistillRecord], window: int) -> int:
    """How many training windows the records give (batches per epoch = this // batch size)."""
    return sum(len(training_windows(len(r.candidates), window)) for r in records)
