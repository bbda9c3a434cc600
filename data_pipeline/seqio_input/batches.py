"""What the trainer iterates: numpy batches of listwise groups, from seqio (primary) or plain Python.

Batch (B = per-host batch, N = group_size, L = max_length), declared in
twolar_jax.ranking.features.LISTWISE_GROUP_BATCH:
    encoder_input_tokens int32 [B, N, L], teacher_ranks int32 [B, N], passage_mask int32 [B, N]
    (1 = real passage), teacher_scores float32 [B, N].
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from data_pipeline.distill_format import DistillRecord
from twolar_jax.errors import OptionError
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.ranking.pointwise_inputs import group_features

if TYPE_CHECKING:
    from data_pipeline.seqio_input.tasks import DistillFiles


def per_host_batch_size(batch_size: int, num_shards: int) -> int:
    """t5x's convention: batch_size is global, each of num_shards hosts reads batch_size // num_shards."""
    if batch_size < 1 or num_shards < 1 or batch_size % num_shards:
        raise OptionError(f"batch_size={batch_size} must be a positive multiple of num_shards={num_shards}")
    return batch_size // num_shards


def get_distill_batches(*, task_or_mixture: str, split: str, batch_size: int, group_size: int, max_length: int,
                        seed: Optional[int], shuffle: bool = True, shard_index: int = 0, num_shards: int = 1,
                        skip_batches: int = 0, repeat: bool = True,
                        drop_remainder: Optional[bool] = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a registered distillation task or mixture (see data_pipeline.seqio_input.tasks).

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

    from data_pipeline.seqio_input.feature_converters import DistillFeatureConverter
    from data_pipeline.seqio_input.preprocessors import feature_lengths
    from data_pipeline.seqio_input.tf_env import tf

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


def seqio_batches(*, task_or_mixture: str, split: str, batch_size: int, group_size: int, max_length: int,
                  shuffle: bool = True, seed: Optional[int] = 0, repeat: bool = True,
                  files: "Optional[DistillFiles]" = None, shard_index: int, num_shards: int,
                  skip_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The trainer's BatchSource (gin: `train.train_batches = @train/seqio_batches`): registers the tasks
    over `files` first (idempotent), then yields the batches of `task_or_mixture`."""
    if files is not None:
        files.register()
    return get_distill_batches(task_or_mixture=task_or_mixture, split=split, batch_size=batch_size,
                               group_size=group_size, max_length=max_length, seed=seed, shuffle=shuffle,
                               shard_index=shard_index, num_shards=num_shards, skip_batches=skip_batches,
                               repeat=repeat)


# ------------------------------------------------------------------------------------------------------
# Pure numpy path (no TensorFlow): the same batches from in-memory records, for tests of other modules
# and small runs. Same tokenization and group rule (twolar_jax.ranking.pointwise_inputs) as the seqio path.


def batches_from_records(records: Sequence[DistillRecord] | Iterable[DistillRecord], *, tokenizer: Any,
                         batch_size: int, group_size: int, max_length: int, truncation: str = "document",
                         padding: str = "mask", shuffle: bool = False, seed: Optional[int] = None,
                         repeat: bool = False, drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of model features (LISTWISE_GROUP_BATCH) from records (tokenizer: twolar_jax.tokenizer.T5Tokenizer).

    shuffle draws a new seeded permutation of the records each epoch (random.Random(seed + epoch)).
    """
    records = list(records)
    if not records:
        raise OptionError("batches_from_records: no records")
    if batch_size < 1:
        raise OptionError(f"batch_size={batch_size} must be >= 1")
    epoch = 0
    while True:
        order = list(range(len(records)))
        if shuffle:
            random.Random((0 if seed is None else seed) * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            if len(chunk) < batch_size and drop_remainder:
                break
            groups = [group_features(records[i].query, [c.text for c in records[i].candidates],
                                     records[i].teacher_scores, tokenizer=tokenizer, group_size=group_size,
                                     max_length=max_length, truncation=truncation, padding=padding) for i in chunk]
            yield {k: np.stack([g[k] for g in groups]) for k in LISTWISE_GROUP_BATCH.names}
        epoch += 1
        if not repeat:
            return
