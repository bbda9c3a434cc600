"""The seqio Tasks and Mixtures of the distillation set, registered in this one module.

A training gin file imports this module (t5x style: `import data_pipeline.seqio_input.tasks`), which
registers the gin configurables `DistillFiles` and `seqio_batches`. Data paths are not known at import
time, so the tasks themselves are registered by `DistillFiles.register()` (idempotent), which every data
source of a run calls before reading: whichever source runs first (training, or validation before
training, or validation of a run that resumes finished) registers the same tasks. The keyword-only
`register_distill_tasks(train_path=..., ...)` validates the files and (re)registers:
    twolar_distill                  every record of the file
    twolar_distill_<type>           one query type each: crop, doct5query, msmarco (names are stable
                                    even when a type is absent; reading an empty one raises)
    twolar_distill_mix              a seqio Mixture of the per-type tasks by `mixture_rates`
                                    (default crop:doct5query = 1:1, the paper's 10K + 10K, over the
                                    types the file has; not registered if it has neither)
`register_distill_tfds_tasks(data_dir=...)` registers the same family over the prepared TFDS form
(data_pipeline/seqio_input/tfds_builder.py) as twolar_distill_tfds[_<type>].

Source: a FunctionDataSource over the JSONL. The whole file is validated once (distill_format.DistillIndex);
each epoch draws a seeded permutation of all the file's queries, sliced from in-memory tensors (no
Python inside tf.data), so shuffling is global and deterministic given the seed (exact resume by
skipping batches).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import seqio

from data_pipeline.distill_format import DistillIndex
from data_pipeline.seqio_input import preprocessors as prep
from data_pipeline.seqio_input.tf_env import tf
from data_pipeline.seqio_input.vocab import get_vocabulary
from twolar_jax import gin_utils
from twolar_jax.errors import FormatError, MissingFileError
from twolar_jax.ranking.features import DISTILL_RECORD
from twolar_jax.ranking.pointwise_inputs import (DEFAULT_GROUP_SIZE, DEFAULT_MAX_LENGTH, check_encoding_options,
                                                 check_group_options)

TASK_PREFIX = "twolar_distill"
QUERY_TYPES = ("crop", "doct5query", "msmarco")
DEFAULT_MIXTURE_RATES = {"crop": 1.0, "doct5query": 1.0}

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


def output_features(vocabulary_path: Optional[PathLike] = None) -> dict[str, seqio.Feature]:
    """inputs: rank-2 token ids [n, L]; teacher_ranks / teacher_scores: per-passage [n]."""
    vocab = get_vocabulary(vocabulary_path)
    passthrough = seqio.PassThroughVocabulary(size=0)
    return {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32, rank=2),
        "teacher_ranks": seqio.Feature(vocabulary=passthrough, add_eos=False, dtype=tf.int32, rank=1),
        "teacher_scores": seqio.Feature(vocabulary=passthrough, add_eos=False, dtype=tf.float32, rank=1),
    }


def _columns(index: DistillIndex, entries) -> dict[str, tf.Tensor]:
    """Every selected record as in-memory tensors: ragged per-passage fields as (values, row_splits)."""
    qids, queries, types, has_scores, lengths = [], [], [], [], []
    docids, texts, scores = [], [], []
    for entry in entries:
        record = index.read(entry.offset, entry.lineno)
        qids.append(record.qid)
        queries.append(record.query)
        types.append(record.query_type)
        has_scores.append(record.teacher_scores is not None)
        lengths.append(len(record.candidates))
        docids.extend(c.docid for c in record.candidates)
        texts.extend(c.text for c in record.candidates)
        scores.extend(record.teacher_scores if record.teacher_scores is not None else [0.0] * len(record.candidates))
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {"qid": tf.constant(qids, tf.string), "query": tf.constant(queries, tf.string),
            "query_type": tf.constant(types, tf.string), "has_teacher_scores": tf.constant(has_scores, tf.bool),
            "docids": tf.constant(docids, tf.string), "texts": tf.constant(texts, tf.string),
            "teacher_scores": tf.constant(np.asarray(scores, np.float32)), "row_splits": tf.constant(splits)}


def jsonl_dataset(index: DistillIndex, *, query_type: Optional[str] = None, shuffle: bool = False,
                  seed: Optional[int] = None, name: str = "") -> tf.data.Dataset:
    """Raw examples (prep.RAW_SIGNATURE) of the index's records, optionally one query type, optionally
    in a seeded per-epoch permutation (reshuffled on every repeat, identically on every host).

    The records are held as tensors and sliced by graph ops: no Python runs inside tf.data, because a
    `numpy_function` in a parallel map deadlocks when the iterator is destroyed while its workers wait
    for the GIL (seen at the end of training). Memory: the file's text once (about 0.3 GB for TWOLAR's
    20K queries x 30 passages); larger sets use the prepared TFDS form.
    """
    entries = index.select(query_type)
    if not entries:
        found = ", ".join(f"{k}={v}" for k, v in sorted(index.query_types().items())) or "none"
        raise ValueError(f"{name or 'distillation source'}: no records"
                         f"{f' with query_type {query_type!r}' if query_type else ''} in {index.path} "
                         f"(query types found: {found})")
    cols = _columns(index, entries)
    ds = tf.data.Dataset.range(len(entries))
    if shuffle:
        ds = ds.shuffle(len(entries), seed=seed, reshuffle_each_iteration=True)

    def to_example(i):
        lo, hi = cols["row_splits"][i], cols["row_splits"][i + 1]
        # DISTILL_RECORD: a scalar per record, or one value per candidate (sliced by the row splits).
        example = {f.name: cols[f.name][i] if f.rank == 0 else cols[f.name][lo:hi] for f in DISTILL_RECORD}
        return {k: tf.ensure_shape(v, prep.RAW_SIGNATURE[k].shape) for k, v in example.items()}

    return ds.map(to_example, num_parallel_calls=prep.AUTOTUNE, deterministic=True)


class JsonlDataSource(seqio.FunctionDataSource):
    """A FunctionDataSource that shuffles internally: `jsonl_dataset` permutes all queries of the file,
    per epoch, from the seed. So the Task needs no shuffle buffer (each epoch is exactly a permutation),
    and seqio's "uncached source shuffles poorly" warning does not apply."""

    def __init__(self, dataset_fn, splits: Sequence[str]):
        super().__init__(dataset_fn, splits=splits, caching_permitted=False)
        self._performs_internal_shuffling = True

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached: bool = False,
                    num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # unused, as in the parent
        if shard_info and shard_info.num_shards > 1:
            raise ValueError("JsonlDataSource shards at the example level (the Task does it)")
        return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


@functools.lru_cache(maxsize=16)
def _index(path: str, mtime_ns: int, size: int, skip_invalid: bool) -> DistillIndex:
    del mtime_ns, size  # cache key only: a rewritten file is validated again
    return DistillIndex(path, skip_invalid=skip_invalid)


def load_index(path: PathLike, *, skip_invalid: bool = False) -> DistillIndex:
    """Validated index of a distillation file (cached per path, mtime and size)."""
    st = os.stat(path)
    return _index(os.path.abspath(path), st.st_mtime_ns, st.st_size, skip_invalid)


def _remove(name: str) -> None:
    seqio.TaskRegistry.remove(name)
    seqio.MixtureRegistry.remove(name)


def _task_preprocessors(*, group_size: int, max_length: int, truncation: str, padding: str,
                        query_type: Optional[str] = None) -> list:
    steps = []
    if query_type is not None:
        steps.append(functools.partial(prep.filter_query_type, query_type=query_type))
    steps += [
        functools.partial(prep.select_group, group_size=group_size, padding=padding),
        functools.partial(prep.tokenize_groups, max_length=max_length, truncation=truncation),
    ]
    return steps


def _check_options(group_size: int, max_length: int, truncation: str, padding: str) -> None:
    check_group_options(group_size=group_size, padding=padding)
    check_encoding_options(max_length=max_length, truncation=truncation)


def _add_mixture(prefix: str, rates: Mapping[str, float], available: Mapping[str, int],
                 suffix: str = "_mix") -> str:
    name = f"{prefix}{suffix}"
    _remove(name)
    members = []
    for query_type, rate in rates.items():
        if rate < 0:
            raise ValueError(f"mixture_rates[{query_type!r}]={rate}: rates must be >= 0")
        if rate == 0:
            continue
        if available.get(query_type, 0) == 0:
            raise ValueError(f"mixture_rates names query_type {query_type!r}, but the training file has no such "
                             f"records (found: {dict(available)})")
        members.append((f"{prefix}_{query_type}", float(rate)))
    if not members:
        raise ValueError(f"mixture_rates {dict(rates)} select no task")
    seqio.MixtureRegistry.add(name, members)
    return name


def register_distill_tasks(*, train_path: PathLike, validation_path: Optional[PathLike] = None,
                           group_size: int = DEFAULT_GROUP_SIZE, max_length: int = DEFAULT_MAX_LENGTH,
                           truncation: str = "document", padding: str = "mask",
                           query_types: Sequence[str] = QUERY_TYPES,
                           mixture_rates: Optional[Mapping[str, float]] = None,
                           skip_invalid: bool = False, vocabulary_path: Optional[PathLike] = None,
                           shuffle_buffer_size: Optional[int] = None,
                           prefix: str = TASK_PREFIX) -> list[str]:
    """(Re)register the JSONL-backed tasks and the mixture; returns the registered names.

    Validates the files now (FormatError names file, line and field; skip_invalid counts and logs
    instead). group_size / max_length are the defaults when a caller gives no task_feature_lengths;
    get_distill_batches always passes its own. Query types outside `query_types` are still in
    `twolar_distill`. shuffle_buffer_size=None: no buffer after preprocessing (the source already
    permutes all queries each epoch); an int adds seqio's usual buffer on top.
    """
    _check_options(group_size, max_length, truncation, padding)
    splits = {"train": load_index(train_path, skip_invalid=skip_invalid)}
    if validation_path is not None:
        splits["validation"] = load_index(validation_path, skip_invalid=skip_invalid)
    for split, index in splits.items():
        if not len(index):
            what = "every line was invalid (skip_invalid)" if skip_invalid and os.path.getsize(index.path) else \
                "no records: the file is empty"
            raise FormatError(index.path, None, None, f"{what}; the {split} split needs at least one query")
    features = output_features(vocabulary_path)
    names = []
    variants = [(prefix, None)] + [(f"{prefix}_{qt}", qt) for qt in query_types]
    for name, query_type in variants:
        def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *, _qt=query_type, _name=name):
            if split not in splits:
                raise ValueError(f"{_name}: no {split!r} split (registered: {sorted(splits)}); "
                                 f"pass validation_path= to register_distill_tasks for 'validation'")
            return jsonl_dataset(splits[split], query_type=_qt, shuffle=shuffle_files, seed=seed, name=_name)

        _remove(name)
        seqio.TaskRegistry.add(
            name,
            source=JsonlDataSource(dataset_fn, splits=list(splits)),
            preprocessors=_task_preprocessors(group_size=group_size, max_length=max_length,
                                              truncation=truncation, padding=padding),
            output_features=features,
            shuffle_buffer_size=shuffle_buffer_size,
        )
        names.append(name)
    available = splits["train"].query_types()
    _remove(f"{prefix}_mix")  # never leave a previous registration's mixture behind
    if mixture_rates is None:
        # The paper's 1:1 crop/doct5query, over the types this file has (a set of one type still trains).
        rates = {qt: r for qt, r in DEFAULT_MIXTURE_RATES.items() if available.get(qt) and qt in query_types}
        if not rates:
            logger.debug("%s_mix not registered: %s has none of the default mixture's query types %s (found %s)",
                        prefix, train_path, sorted(DEFAULT_MIXTURE_RATES), available)
            return names
    else:
        rates = dict(mixture_rates)
        unknown = set(rates) - set(query_types)
        if unknown:
            raise ValueError(f"mixture_rates names {sorted(unknown)}, not among query_types {list(query_types)}")
    names.append(_add_mixture(prefix, rates, available))
    return names


def register_distill_tfds_tasks(*, data_dir: PathLike, tfds_name: str = "twolar_distill:1.0.0",
                                group_size: int = DEFAULT_GROUP_SIZE, max_length: int = DEFAULT_MAX_LENGTH,
                                truncation: str = "document", padding: str = "mask",
                                query_types: Sequence[str] = QUERY_TYPES,
                                vocabulary_path: Optional[PathLike] = None,
                                shuffle_buffer_size: int = 1024,
                                prefix: str = f"{TASK_PREFIX}_tfds") -> list[str]:
    """(Re)register tasks over the prepared TFDS dataset (built by data_pipeline.tfds_builder).

    The TFDS source shards by file and shuffles files and a buffer of examples, as any seqio TFDS task.
    """
    from data_pipeline.seqio_input import tfds_builder  # noqa: F401  (registers the builder class with TFDS)

    _check_options(group_size, max_length, truncation, padding)
    features = output_features(vocabulary_path)
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=str(data_dir))
    names = []
    for name, query_type in [(prefix, None)] + [(f"{prefix}_{qt}", qt) for qt in query_types]:
        _remove(name)
        seqio.TaskRegistry.add(
            name, source=source,
            preprocessors=[tfds_builder.to_raw_example] + _task_preprocessors(
                group_size=group_size, max_length=max_length, truncation=truncation, padding=padding,
                query_type=query_type),
            output_features=features, shuffle_buffer_size=shuffle_buffer_size)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------ gin
def check_files_exist(train_path: str, validation_path: Optional[str]) -> None:
    """A missing distillation file fails when gin builds the files object, naming the gin macro it came from."""
    for option, path in (("DISTILL_JSONL", train_path), ("VALIDATION_JSONL", validation_path)):
        if path and not os.path.isfile(path):
            raise MissingFileError(f"{path}: no such distillation file ({option})")


def files_key(*paths: Optional[str]) -> tuple:
    """Path, mtime and size of each file: a rewritten file registers its tasks (and is validated) again."""
    return tuple((os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size)
                 for p in paths if p and os.path.exists(p))


@dataclasses.dataclass(frozen=True)
class DistillFiles:
    """The distillation JSONL files of a run and how their tasks read them (gin: `@DistillFiles()`).

    `register()` (re)registers the twolar_distill tasks over these files, once per process for the same
    files and options (a rewritten file, seen by its size and mtime, is validated again).
    """

    train_path: str
    validation_path: Optional[str] = None
    truncation: str = "document"
    padding: str = "mask"
    skip_invalid: bool = False
    mixture_rates: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        """Validate the files when gin builds this, before train() writes anything: a missing, empty or
        malformed file fails here, naming the file (and line), not after the model directory exists."""
        check_files_exist(self.train_path, self.validation_path)
        self.register()

    def _key(self) -> tuple:
        rates = tuple(sorted((self.mixture_rates or {}).items()))
        return (self.train_path, self.validation_path, files_key(self.train_path, self.validation_path),
                self.truncation, self.padding, self.skip_invalid, rates)

    def register(self) -> list[str]:
        global _REGISTERED_KEY, _REGISTERED_NAMES
        key = self._key()
        if key != _REGISTERED_KEY:
            _REGISTERED_NAMES = register_distill_tasks(
                train_path=self.train_path, validation_path=self.validation_path or None,
                truncation=self.truncation, padding=self.padding, skip_invalid=self.skip_invalid,
                mixture_rates=self.mixture_rates)
            _REGISTERED_KEY = key
        return list(_REGISTERED_NAMES)


_REGISTERED_KEY: Optional[tuple] = None
_REGISTERED_NAMES: list[str] = []


def _register_gin() -> None:
    from data_pipeline.seqio_input.batches import seqio_batches

    gin_utils.register(DistillFiles, module="data_pipeline.seqio_input")
    gin_utils.register(seqio_batches, module="data_pipeline.seqio_input")


_register_gin()
