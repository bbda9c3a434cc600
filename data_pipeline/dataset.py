"""What the trainer iterates: numpy batches of listwise groups, from seqio (primary) or plain Python.

Batch (B = per-host batch, N = group_size, L = max_length):
    encoder_input_tokens int32 [B, N, L], decoder_input_tokens int32 [B, N, 1] (zeros),
    teacher_ranks int32 [B, N], passage_mask int32 [B, N] (1 = real passage), teacher_scores float32 [B, N].
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from data_pipeline.formats import DistillRecord, select_group

MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "teacher_ranks", "passage_mask", "teacher_scores")


def per_host_batch_size(batch_size: int, num_shards: int) -> int:
    """t5x's convention: batch_size is global, each of num_shards hosts reads batch_size // num_shards."""
    if batch_size < 1 or num_shards < 1 or batch_size % num_shards:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of num_shards={num_shards}")
    return batch_size // num_shards


def get_distill_batches(*, task_or_mixture: str, split: str, batch_size: int, group_size: int, max_length: int,
                        seed: Optional[int], shuffle: bool = True, shard_index: int = 0, num_shards: int = 1,
                        skip_batches: int = 0, repeat: bool = True,
                        drop_remainder: Optional[bool] = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a registered distillation task or mixture (see data_pipeline.tasks).

    batch_size is global (t5x): this host (shard_index of num_shards, via seqio.ShardInfo) yields
    batch_size // num_shards groups per batch. The order is a pure function of (seed, shard), so
    `skip_batches=k` continues exactly where a run that consumed k batches stopped (the skipped batches
    are recomputed, not stored). drop_remainder defaults to `repeat` (static shapes while training; a
    final short batch for a single evaluation pass).
    """
    if skip_batches < 0:
        raise ValueError(f"skip_batches={skip_batches} must be >= 0")
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed: an unseeded order cannot be resumed")
    import seqio

    from data_pipeline.feature_converters import DistillFeatureConverter
    from data_pipeline.preprocessors import feature_lengths
    from data_pipeline.tf_env import tf

    host_batch = per_host_batch_size(batch_size, num_shards)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} not in [0, {num_shards})")
    ds = seqio.get_dataset(
        task_or_mixture,
        task_feature_lengths=feature_lengths(group_size, max_length),
        feature_converter=DistillFeatureConverter(pack=False),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=None if repeat else 1,
        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None,
        seed=seed,
        verbose=False,
    )
    ds = ds.batch(host_batch, drop_remainder=repeat if drop_remainder is None else drop_remainder)
    if skip_batches:
        ds = ds.skip(skip_batches)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


# ------------------------------------------------------------------------------------------------------
# Pure numpy path (no TensorFlow): the same batches from in-memory records, for tests of other modules
# and small runs. Same tokenization (twolar_jax.tokenizer) and padding rules as the seqio path.


def encode_group(record: DistillRecord, *, tokenizer: Any, group_size: int, max_length: int,
                 truncation: str = "document", padding: str = "mask") -> dict[str, np.ndarray]:
    """One query's model features, unbatched ([N, L], [N, 1], [N], [N], [N])."""
    from twolar_jax.tokenizer import encode_query_document

    texts = select_group(record, group_size, padding=padding)
    n = len(texts)
    tokens = np.zeros((group_size, max_length), np.int32)
    for i, text in enumerate(texts):
        ids = encode_query_document(tokenizer, record.query, text, max_length=max_length, truncation=truncation)
        tokens[i, : len(ids)] = ids
    scores = np.zeros((group_size,), np.float32)
    if record.teacher_scores is not None:
        real = np.asarray(record.teacher_scores[:group_size], np.float32)
        scores[: len(real)] = real
        if padding == "twolar":
            scores[len(real):n] = real.min() - 1.0
    return {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": np.zeros((group_size, 1), np.int32),
        "teacher_ranks": np.arange(group_size, dtype=np.int32),
        "passage_mask": (np.arange(group_size) < n).astype(np.int32),
        "teacher_scores": scores,
    }


def batches_from_records(records: Sequence[DistillRecord] | Iterable[DistillRecord], *, tokenizer: Any,
                         batch_size: int, group_size: int, max_length: int, truncation: str = "document",
                         padding: str = "mask", shuffle: bool = False, seed: Optional[int] = None,
                         repeat: bool = False, drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of model features from records (tokenizer: twolar_jax.tokenizer.T5Tokenizer).

    shuffle draws a new seeded permutation of the records each epoch (random.Random(seed + epoch)).
    """
    records = list(records)
    if not records:
        raise ValueError("batches_from_records: no records")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    epoch = 0
    while True:
        order = list(range(len(records)))
        if shuffle:
            random.Random((0 if seed is None else seed) * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            if len(chunk) < batch_size and drop_remainder:
                break
            groups = [encode_group(records[i], tokenizer=tokenizer, group_size=group_size, max_length=max_length,
                                   truncation=truncation, padding=padding) for i in chunk]
            yield {k: np.stack([g[k] for g in groups]) for k in MODEL_FEATURES}
        epoch += 1
        if not repeat:
            return
