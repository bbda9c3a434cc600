"""The listwise (LiT5 / FIRST Fusion-in-Decoder) students' seqio side: the TF twin of
twolar_jax.ranking.listwise_inputs (training windows), its feature converter, tasks and the gin batch source.

Every record of the distillation JSONL (DISTILL_RECORD, the same source as the pointwise tasks) becomes
its training windows:
    split_windows     non-overlapping chunks of n = window candidates in teacher order; a last chunk of
                      fewer than 2 is dropped (listwise_inputs.training_windows)
    shuffle_windows   each window's passages shown in the order of a hash of (seed, qid, window index):
                      listwise_inputs.window_permutation in int64 graph ops (products stay below 2**63),
                      so TF and Python give the same permutation; teacher_ranks = each slot's teacher place
    tokenize_windows  inputs [k, <=L]: TEMPLATE with identifiers 1..k given to the shuffled slots, cut from
                      the right, EOS last; targets [<=T]: `[a] > [b] > ...` by teacher rank + EOS
FiDWindowFeatureConverter pads to FID_WINDOW_BATCH (its MODEL_FEATURES are built from the declaration).
Task names: twolar_listwise, twolar_listwise_<query type>, twolar_listwise_mix (as the pointwise family's).
The passage shuffle is the same every epoch: seqio repeats the source before these preprocessors and no
stage knows the epoch; a new SEED gives new permutations.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Optional, Sequence

import seqio

from data_pipeline.seqio_input import tasks
from data_pipeline.seqio_input.batches import per_host_batch_size
from data_pipeline.seqio_input.feature_converters import model_feature_specs
from data_pipeline.seqio_input.preprocessors import AUTOTUNE, EOS_ID, LengthSpec
from data_pipeline.seqio_input.tf_env import tf
from data_pipeline.seqio_input.vocab import get_vocabulary
from twolar_jax import gin_utils
from twolar_jax.errors import FormatError, OptionError
from twolar_jax.ranking import listwise_inputs as li
from twolar_jax.ranking.features import FID_WINDOW_BATCH
from twolar_jax.tokenizer import T5Tokenizer

TASK_PREFIX = "twolar_listwise"
Spec = seqio.FeatureConverter.FeatureSpec


def feature_lengths(window: int, passage_length: int, target_length: int) -> dict[str, LengthSpec]:
    """task_feature_lengths of the listwise tasks: inputs [n, L], targets T, teacher_ranks n."""
    li.check_window(window, 1)
    for name, value in (("passage_length", passage_length), ("target_length", target_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise OptionError(f"{name}={value!r}: must be an integer >= 2")
    return {"inputs": [window, passage_length], "targets": target_length, "teacher_ranks": window}


def window_lengths(sequence_length: Optional[Mapping[str, LengthSpec]], *, window: int = li.DEFAULT_WINDOW,
                   passage_length: int = li.DEFAULT_PASSAGE_LENGTH,
                   target_length: int = li.DEFAULT_TARGET_LENGTH) -> tuple[int, int, int]:
    """(n, L, T) from sequence_length (feature_lengths' form), else the given defaults."""
    if sequence_length and sequence_length.get("inputs") is not None:
        spec = sequence_length["inputs"]
        if isinstance(spec, int) or len(spec) != 2:
            raise ValueError(f"sequence_length['inputs'] must be [window, passage_length], got {spec!r}")
        window, passage_length = int(spec[0]), int(spec[1])
    if sequence_length and sequence_length.get("targets") is not None:
        target_length = int(sequence_length["targets"])
    feature_lengths(window, passage_length, target_length)  # validates
    return window, passage_length, target_length


# ------------------------------------------------------------------------------ the hash, in TF
def _mix32(x: tf.Tensor) -> tf.Tensor:
    """listwise_inputs.mix32 on int64 tensors (x < 2**32, multipliers < 2**31: no overflow)."""
    mask = tf.constant(li.MASK32, tf.int64)
    x = tf.bitwise.bitwise_and(x, mask)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(li.MIX_SHIFTS[0], tf.int64)))
    x = tf.bitwise.bitwise_and(x * li.MIX_MULTIPLIERS[0], mask)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(li.MIX_SHIFTS[1], tf.int64)))
    x = tf.bitwise.bitwise_and(x * li.MIX_MULTIPLIERS[1], mask)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(li.MIX_SHIFTS[2], tf.int64)))


def _fnv1a32(text: tf.Tensor) -> tf.Tensor:
    """listwise_inputs.fnv1a32 of a scalar string's UTF-8 bytes."""
    data = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int64)
    step = lambda h, b: tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(h, b) * li.FNV_PRIME, li.MASK32)  # noqa: E731
    return tf.foldl(step, data, initializer=tf.constant(li.FNV_OFFSET, tf.int64))


def window_permutation_tf(k: tf.Tensor, *, seed: int, qid: tf.Tensor, window_index: tf.Tensor) -> tf.Tensor:
    """listwise_inputs.window_permutation: int32 [k], perm[slot] = teacher place of the passage shown there."""
    h = _mix32(_fnv1a32(qid))
    h = _mix32(tf.bitwise.bitwise_xor(h, tf.constant(seed & li.MASK32, tf.int64)))
    key = _mix32(tf.bitwise.bitwise_xor(h, tf.cast(window_index, tf.int64)))
    keys = _mix32(tf.bitwise.bitwise_xor(key, tf.range(tf.cast(k, tf.int64), dtype=tf.int64)))
    return tf.cast(tf.argsort(keys, stable=True), tf.int32)


# ------------------------------------------------------------------------------ preprocessors
def split_windows(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, LengthSpec]] = None, *,
                  window: int = li.DEFAULT_WINDOW) -> tf.data.Dataset:
    """One example per training window, in record order then window order (training_windows' spans)."""
    n, _, _ = window_lengths(sequence_length, window=window)
    li.training_windows(0, n)  # validates the window for training (2..100)

    def windows(ex):
        c = tf.size(ex["texts"], out_type=tf.int64)
        count = c // n + tf.cast(c % n >= 2, tf.int64)

        def one(w):
            texts = ex["texts"][w * n: tf.minimum((w + 1) * n, c)]
            return {"qid": ex["qid"], "query": ex["query"], "query_type": ex["query_type"], "texts": texts,
                    "window_index": w}

        return tf.data.Dataset.range(count).map(one)

    return dataset.flat_map(windows)


def shuffle_windows(dataset: tf.data.Dataset, *, seed: int) -> tf.data.Dataset:
    """Show each window's passages in the hashed order; teacher_ranks[slot] = the teacher place shown there."""
    def fn(ex):
        ex = dict(ex)
        perm = window_permutation_tf(tf.size(ex["texts"]), seed=seed, qid=ex["qid"], window_index=ex["window_index"])
        ex["texts"] = tf.gather(ex["texts"], perm)
        ex["teacher_ranks"] = perm
        return ex

    return dataset.map(fn, num_parallel_calls=AUTOTUNE, deterministic=True)


_TEMPLATE_PARTS = re.split(r"\{(query|index|passage)\}", li.TEMPLATE)  # text, name, text, name, ...


def encode_passages_tf(vocabulary: seqio.Vocabulary, query: tf.Tensor, texts: tf.Tensor, *,
                       passage_length: int) -> tf.Tensor:
    """listwise_inputs.encode_passage for every slot (identifier = slot + 1): int32 [k, <=L], 0-padded."""
    k = tf.size(texts)
    fields = {"query": query, "index": tf.strings.as_string(tf.range(1, k + 1)), "passage": texts}
    parts = [fields[p] if i % 2 else p for i, p in enumerate(_TEMPLATE_PARTS) if i % 2 or p]
    ids = tf.cast(vocabulary.encode_tf(tf.strings.join(parts)), tf.int32)[:, : passage_length - 1]
    eos = tf.RaggedTensor.from_tensor(tf.fill([k, 1], tf.constant(EOS_ID, tf.int32)))
    return tf.concat([ids, eos], axis=1).to_tensor(0)


def encode_target_tf(vocabulary: seqio.Vocabulary, order: tf.Tensor, *, target_length: int) -> tf.Tensor:
    """listwise_inputs.encode_target unpadded: `[a] > [b] > ...` + EOS, asserted to fit target_length."""
    names = tf.strings.join(["[", tf.strings.as_string(order + 1), "]"])
    ids = tf.cast(vocabulary.encode_tf(tf.strings.reduce_join(names, separator=" > ")), tf.int32)
    ids = tf.concat([ids, tf.constant([EOS_ID], tf.int32)], axis=0)
    check = tf.debugging.assert_less_equal(tf.size(ids), target_length, message=(
        f"target_length={target_length}: a window's target (EOS included) is longer; raise target_length"))
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def tokenize_windows(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                     sequence_length: Optional[Mapping[str, LengthSpec]] = None, *,
                     passage_length: int = li.DEFAULT_PASSAGE_LENGTH,
                     target_length: int = li.DEFAULT_TARGET_LENGTH) -> tf.data.Dataset:
    """Add `inputs` [k, <=L] and `targets` [<=T] (the slots sorted by teacher rank)."""
    _, length, t_length = window_lengths(sequence_length, passage_length=passage_length,
                                         target_length=target_length)
    vocabulary = output_features["inputs"].vocabulary

    def fn(ex):
        ex = dict(ex)
        ex["inputs"] = encode_passages_tf(vocabulary, ex["query"], ex["texts"], passage_length=length)
        order = tf.argsort(ex["teacher_ranks"], stable=True)
        ex["targets"] = encode_target_tf(vocabulary, order, target_length=t_length)
        return ex

    return dataset.map(fn, num_parallel_calls=AUTOTUNE, deterministic=True)


# ------------------------------------------------------------------------------ feature converter
class FiDWindowFeatureConverter(seqio.FeatureConverter):
    """Pads windows to n slots of L tokens and targets to T; adds the passage mask (FID_WINDOW_BATCH).
    Empty slots continue teacher_ranks k..n-1, as the pointwise groups' padding does."""

    TASK_FEATURES = {"inputs": Spec(dtype=tf.int32, rank=2, sequence_dim=1), "targets": Spec(dtype=tf.int32),
                     "teacher_ranks": Spec(dtype=tf.int32)}
    MODEL_FEATURES = model_feature_specs(FID_WINDOW_BATCH)
    PACKING_FEATURE_DTYPES = None

    def __init__(self, pack: bool = False, apply_length_check: bool = False, **kwargs):
        if pack:
            raise ValueError("FiDWindowFeatureConverter cannot pack: windows are rank-2 features")
        super().__init__(pack=False, apply_length_check=apply_length_check, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, object]) -> tf.data.Dataset:
        n_max, length, t_length = window_lengths(task_feature_lengths)

        def fn(ex):
            inputs, targets = ex["inputs"], ex["targets"]
            n, width = tf.shape(inputs)[0], tf.shape(inputs)[1]
            checks = [tf.debugging.assert_less_equal(n, n_max, message=f"window larger than window={n_max}"),
                      tf.debugging.assert_less_equal(width, length, message=f"passage over passage_length={length}"),
                      tf.debugging.assert_less_equal(tf.size(targets), t_length,
                                                     message=f"target over target_length={t_length}"),
                      tf.debugging.assert_equal(tf.size(ex["teacher_ranks"]), n, message="teacher_ranks != window")]
            with tf.control_dependencies(checks):
                encoder = tf.pad(inputs, [[0, n_max - n], [0, length - width]])
                decoder = tf.pad(targets, [[0, t_length - tf.size(targets)]])
            ranks = tf.concat([ex["teacher_ranks"], tf.range(n, n_max, dtype=tf.int32)], axis=0)
            out = {"encoder_input_tokens": tf.ensure_shape(encoder, [n_max, length]),
                   "decoder_target_tokens": tf.ensure_shape(decoder, [t_length]),
                   "teacher_ranks": tf.ensure_shape(ranks, [n_max]),
                   "passage_mask": tf.ensure_shape(tf.sequence_mask(n, n_max, dtype=tf.int32), [n_max])}
            for name in self._passthrough_features:
                out[name] = ex[name]
            return out

        return ds.map(fn, num_parallel_calls=AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, object]) -> Mapping[str, int]:
        n_max, length, t_length = window_lengths(task_feature_lengths)
        lengths = {"encoder_input_tokens": length, "decoder_target_tokens": t_length, "teacher_ranks": n_max,
                   "passage_mask": n_max}
        for name in self._passthrough_features:
            lengths[name] = task_feature_lengths[name]
        return lengths


# ------------------------------------------------------------------------------ tasks
def output_features(vocabulary_path: Optional[str] = None) -> dict[str, seqio.Feature]:
    """inputs: rank-2 ids [k, L]; targets: the permutation's ids [T]; teacher_ranks: per slot [k]."""
    vocab = get_vocabulary(vocabulary_path)
    return {"inputs": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32, rank=2),
            "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32, rank=1),
            "teacher_ranks": seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
                                           dtype=tf.int32, rank=1)}


def task_preprocessors(*, seed: int, window: int = li.DEFAULT_WINDOW, passage_length: int = li.DEFAULT_PASSAGE_LENGTH,
                       target_length: int = li.DEFAULT_TARGET_LENGTH) -> list:
    """The chain over DISTILL_RECORD examples; sizes come from sequence_length when the caller gives one."""
    return [functools.partial(split_windows, window=window),
            functools.partial(shuffle_windows, seed=seed),
            functools.partial(tokenize_windows, passage_length=passage_length, target_length=target_length)]


def register_listwise_tasks(*, train_path: str, validation_path: Optional[str] = None, seed: int = 0,
                            query_types: Sequence[str] = tasks.QUERY_TYPES,
                            mixture_rates: Optional[Mapping[str, float]] = None, skip_invalid: bool = False,
                            vocabulary_path: Optional[str] = None, shuffle_buffer_size: Optional[int] = None,
                            prefix: str = TASK_PREFIX) -> list[str]:
    """(Re)register the listwise tasks over the distillation JSONL, as register_distill_tasks does for the
    pointwise family (same files, sources, query-type variants and mixture rule); returns the names.

    `seed` keys every window's passage shuffle. shuffle_buffer_size=None: windows of one query stay
    together in the stream (the source permutes the queries); an int mixes windows of nearby queries."""
    splits = {"train": tasks.load_index(train_path, skip_invalid=skip_invalid)}
    if validation_path is not None:
        splits["validation"] = tasks.load_index(validation_path, skip_invalid=skip_invalid)
    for split, index in splits.items():
        if not len(index):
            raise FormatError(index.path, None, None, f"no valid records; the {split} split needs at least one query")
    features, names, window_seed = output_features(vocabulary_path), [], seed
    for name, query_type in [(prefix, None)] + [(f"{prefix}_{qt}", qt) for qt in query_types]:
        def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *, _qt=query_type, _name=name):
            if split not in splits:
                raise ValueError(f"{_name}: no {split!r} split (registered: {sorted(splits)})")
            return tasks.jsonl_dataset(splits[split], query_type=_qt, shuffle=shuffle_files, seed=seed, name=_name)

        tasks._remove(name)
        seqio.TaskRegistry.add(name, source=tasks.JsonlDataSource(dataset_fn, splits=list(splits)),
                               preprocessors=task_preprocessors(seed=window_seed), output_features=features,
                               shuffle_buffer_size=shuffle_buffer_size)
        names.append(name)
    tasks._remove(f"{prefix}_mix")
    available = splits["train"].query_types()
    rates = dict(mixture_rates) if mixture_rates is not None else \
        {qt: r for qt, r in tasks.DEFAULT_MIXTURE_RATES.items() if available.get(qt) and qt in query_types}
    if rates:
        names.append(tasks._add_mixture(prefix, rates, available))
    return names


# ------------------------------------------------------------------------------ batches and gin
def get_listwise_batches(*, task_or_mixture: str, split: str, batch_size: int, window: int, passage_length: int,
                         target_length: int, seed: Optional[int], shuffle: bool = True, shard_index: int = 0,
                         num_shards: int = 1, skip_batches: int = 0, repeat: bool = True,
                         drop_remainder: Optional[bool] = None):
    """Batches (FID_WINDOW_BATCH) of a registered listwise task, as batches.get_distill_batches: batch_size is
    global, the order a pure function of (seed, shard), so skip_batches=k resumes exactly."""
    if skip_batches < 0:
        raise ValueError(f"skip_batches={skip_batches} must be >= 0")
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed: an unseeded order cannot be resumed")
    li.check_target_length(T5Tokenizer(), window=window, target_length=target_length)
    host_batch = per_host_batch_size(batch_size, num_shards)
    ds = seqio.get_dataset(task_or_mixture, task_feature_lengths=feature_lengths(window, passage_length, target_length),
                           feature_converter=FiDWindowFeatureConverter(), dataset_split=split, shuffle=shuffle,
                           num_epochs=None if repeat else 1, seed=seed, verbose=False,
                           shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None)
    ds = ds.batch(host_batch, drop_remainder=repeat if drop_remainder is None else drop_remainder)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def listwise_seqio_batches(*, task_or_mixture: str, split: str, batch_size: int, window: int, passage_length: int,
                           target_length: int, shuffle: bool = True, seed: Optional[int] = 0, repeat: bool = True,
                           files: "Optional[ListwiseFiles]" = None, shard_index: int, num_shards: int,
                           skip_batches: int):
    """The trainer's BatchSource (gin: `train.train_batches = @train/listwise_seqio_batches`): registers the
    tasks over `files` first (idempotent), then yields the windows of `task_or_mixture`."""
    if files is not None:
        files.register()
    return get_listwise_batches(task_or_mixture=task_or_mixture, split=split, batch_size=batch_size, window=window,
                                passage_length=passage_length, target_length=target_length, seed=seed,
                                shuffle=shuffle, shard_index=shard_index, num_shards=num_shards,
                                skip_batches=skip_batches, repeat=repeat)


@dataclasses.dataclass(frozen=True)
class ListwiseFiles:
    """The distillation files of a listwise run and the passage-shuffle seed (gin: `@ListwiseFiles()`);
    `register()` (re)registers the twolar_listwise tasks once per process for the same files and options."""

    train_path: str
    validation_path: Optional[str] = None
    seed: int = 0
    skip_invalid: bool = False
    mixture_rates: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        """Fail on a missing or malformed file when gin builds this, before the run writes anything."""
        tasks.check_files_exist(self.train_path, self.validation_path)
        self.register()

    def _key(self) -> tuple:
        return (tasks.files_key(self.train_path, self.validation_path), self.seed, self.skip_invalid,
                tuple(sorted((self.mixture_rates or {}).items())))

    def register(self) -> list[str]:
        key = self._key()
        if _REGISTERED.get("key") != key:
            _REGISTERED["names"] = register_listwise_tasks(
                train_path=self.train_path, validation_path=self.validation_path or None, seed=self.seed,
                skip_invalid=self.skip_invalid, mixture_rates=self.mixture_rates)
            _REGISTERED["key"] = key
        return list(_REGISTERED["names"])


_REGISTERED: dict = {}


def _register_gin() -> None:
    gin_utils.register(ListwiseFiles, module="data_pipeline.seqio_input")
    gin_utils.register(listwise_seqio_batches, module="data_pipeline.seqio_input")


_register_gin()
