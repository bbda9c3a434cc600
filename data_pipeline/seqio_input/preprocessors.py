"""seqio preprocessors for listwise distillation: pick a group of teacher-ordered candidates, tokenize
each as `Query: {q} Document: {d} Relevant:` + EOS with document-only truncation.

Raw examples (what the sources yield, one per query; declared once as
twolar_jax.ranking.features.DISTILL_RECORD, from which RAW_SIGNATURE is built):
    qid, query, query_type: tf.string scalars
    docids, texts: tf.string [n]            candidates in teacher order, best first
    teacher_scores: tf.float32 [n]          zeros when the record has none
    has_teacher_scores: tf.bool scalar
Task features after these preprocessors:
    inputs: int32 [n', <=L]                 one row per kept candidate (n' <= N), 0-padded
    teacher_ranks: int32 [n']               0..n'-1 (candidate order is teacher order)
    teacher_scores: float32 [n']
Group size N and length L come from `sequence_length["inputs"] = [N, L]` (see `feature_lengths`), so the
trainer's gin decides them; the keyword defaults apply when a caller gives no sequence_length.

The template pieces, truncation modes and group padding rule come from twolar_jax.ranking.pointwise_inputs
(this module is its TF twin); tokenization reproduces pointwise_inputs.encode_query_document id for id
(tests/test_data_tasks.py):
"document": encode(f"Query: {q} Document:") + encode(d)[:budget] + encode("Relevant:") + [EOS], where
budget = L - |prefix| - |suffix| - 1 (the query prefix itself is cut only if it alone overflows);
"whole": encode(f"Query: {q} Document: {d} Relevant:")[:L-1] + [EOS] (TWOLAR's reference truncation).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import seqio

from data_pipeline.seqio_input.tf_env import tf
from twolar_jax.ranking.features import DISTILL_RECORD, Feature, FeatureSet
from twolar_jax.ranking.pointwise_inputs import (DEFAULT_GROUP_SIZE, DEFAULT_MAX_LENGTH, DOCUMENT_MARKER,
                                                 QUERY_PREFIX, SUFFIX, TWOLAR_PADDING_PASSAGE,
                                                 check_encoding_options, check_group_options)
from twolar_jax.tokenizer import T5Tokenizer

AUTOTUNE = tf.data.AUTOTUNE
EOS_ID = T5Tokenizer.eos_id


def tf_dtype(feature: Feature) -> tf.dtypes.DType:
    """A declared dtype in TensorFlow's terms (the declaration is framework-neutral: "string" etc.)."""
    return tf.as_dtype(feature.dtype)


def tensor_signature(features: FeatureSet) -> dict[str, tf.TensorSpec]:
    """One unbatched example's TensorSpecs from its declaration: every dimension is of unknown size."""
    return {f.name: tf.TensorSpec([None] * f.rank, tf_dtype(f)) for f in features}


RAW_SIGNATURE = tensor_signature(DISTILL_RECORD)

LengthSpec = Union[int, Sequence[int]]


def feature_lengths(group_size: int, max_length: int) -> dict[str, LengthSpec]:
    """The task_feature_lengths of the distillation tasks: inputs [N, L], per-passage features [N]."""
    check_group_options(group_size=group_size, padding="mask")
    check_encoding_options(max_length=max_length, truncation="document")
    return {"inputs": [group_size, max_length], "teacher_ranks": group_size, "teacher_scores": group_size}


def group_and_length(sequence_length: Optional[Mapping[str, LengthSpec]], *,
                     group_size: int = DEFAULT_GROUP_SIZE, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[int, int]:
    """(N, L) from sequence_length["inputs"] == [N, L], else the given defaults."""
    if not sequence_length or sequence_length.get("inputs") is None:
        return group_size, max_length
    spec = sequence_length["inputs"]
    if isinstance(spec, int) or len(spec) != 2:
        raise ValueError(f"sequence_length['inputs'] must be [group_size, max_length] "
                         f"(use data_pipeline.seqio_input.preprocessors.feature_lengths), got {spec!r}")
    n, length = int(spec[0]), int(spec[1])
    feature_lengths(n, length)  # validates
    return n, length


def select_group(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, LengthSpec]] = None, *,
                 group_size: int = DEFAULT_GROUP_SIZE, padding: str = "mask") -> tf.data.Dataset:
    """Keep the teacher's top N candidates and add `teacher_ranks` = 0..n-1.

    padding="mask": short groups stay short; the feature converter pads them and masks the padding.
    padding="twolar": fill up to N with TWOLAR's "<padding_passage>" texts (docid ""), which count as
    real passages ranked last, as in the reference code. Their teacher score is (lowest real score - 1),
    or 0 when the record has no teacher scores.
    """
    check_group_options(group_size=group_size, padding=padding)
    n_max, _ = group_and_length(sequence_length, group_size=group_size)

    def fn(ex):
        ex = dict(ex)
        texts = ex["texts"][:n_max]
        docids = ex["docids"][:n_max]
        scores = ex["teacher_scores"][:n_max]
        if padding == "twolar":
            fill = n_max - tf.shape(texts)[0]
            texts = tf.concat([texts, tf.fill([fill], TWOLAR_PADDING_PASSAGE)], axis=0)
            docids = tf.concat([docids, tf.fill([fill], "")], axis=0)
            # A record without teacher scores keeps zeros throughout, as pointwise_inputs.group_features does.
            low = tf.where(ex["has_teacher_scores"], tf.reduce_min(scores) - 1.0, 0.0)
            scores = tf.concat([scores, tf.fill([fill], low)], axis=0)
        ex["texts"], ex["docids"], ex["teacher_scores"] = texts, docids, scores
        ex["teacher_ranks"] = tf.range(tf.shape(texts)[0], dtype=tf.int32)
        return ex

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def _tile_rows(row: tf.Tensor, n: tf.Tensor) -> tf.RaggedTensor:
    return tf.RaggedTensor.from_tensor(tf.tile(row[tf.newaxis], [n, 1]))


def encode_groups_tf(vocabulary: seqio.Vocabulary, query: tf.Tensor, texts: tf.Tensor, *, max_length: int,
                     truncation: str = "document") -> tf.Tensor:
    """Token ids [n, <=max_length] (0-padded) of the template for one query and its n texts."""
    check_encoding_options(max_length=max_length, truncation=truncation)
    n = tf.shape(texts)[0]
    eos = tf.constant([EOS_ID], tf.int32)
    if truncation == "whole":
        whole = tf.strings.join([QUERY_PREFIX, query, DOCUMENT_MARKER + " ", texts, " " + SUFFIX])
        ids = tf.cast(vocabulary.encode_tf(whole), tf.int32)[:, : max_length - 1]
        rows = tf.concat([ids, _tile_rows(eos, n)], axis=1)
        return rows.to_tensor(0)
    suffix = tf.constant(vocabulary.encode(SUFFIX), tf.int32)  # a constant: Python and TF ids agree
    n_suffix = int(suffix.shape[0])
    prefix = tf.cast(vocabulary.encode_tf(tf.strings.join([QUERY_PREFIX, query, DOCUMENT_MARKER])), tf.int32)
    prefix = prefix[: max(0, max_length - n_suffix - 1)]  # cut the query only if it alone overflows
    budget = tf.maximum(max_length - tf.size(prefix) - n_suffix - 1, 0)
    docs = tf.cast(vocabulary.encode_tf(texts), tf.int32)[:, :budget]
    rows = tf.concat([_tile_rows(prefix, n), docs, _tile_rows(tf.concat([suffix, eos], 0), n)], axis=1)
    return rows.to_tensor(0)


def tokenize_groups(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                    sequence_length: Optional[Mapping[str, LengthSpec]] = None, *,
                    max_length: int = DEFAULT_MAX_LENGTH, truncation: str = "document") -> tf.data.Dataset:
    """Add `inputs` int32 [n, <=L]: the template per candidate, tokenized with the task's vocabulary."""
    _, length = group_and_length(sequence_length, max_length=max_length)
    vocabulary = output_features["inputs"].vocabulary

    def fn(ex):
        ex = dict(ex)
        ex["inputs"] = encode_groups_tf(vocabulary, ex["query"], ex["texts"], max_length=length,
                                        truncation=truncation)
        return ex

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def filter_query_type(dataset: tf.data.Dataset, *, query_type: str) -> tf.data.Dataset:
    """Keep one query type (used by the TFDS-backed variants; the JSONL source filters by index)."""
    return dataset.filter(lambda ex: tf.equal(ex["query_type"], query_type))
