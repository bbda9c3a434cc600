"""Task features of a listwise group -> the student's model features (no packing: groups are rank 2).

Model features, per example (batching adds the leading B), as declared once in
twolar_jax.ranking.features.LISTWISE_GROUP_BATCH (MODEL_FEATURES is built from it):
    encoder_input_tokens  int32   [N, L]  one templated passage per row, 0-padded
    teacher_ranks         int32   [N]     0..n-1 for real passages; padding rows continue n..N-1
    passage_mask          int32   [N]     1 for a real passage, 0 for padding
    teacher_scores        float32 [N]     0 where absent or padded
The model scores with one decoder step from the start token, so there is no decoder feature.
task_feature_lengths must be data_pipeline.seqio_input.preprocessors.feature_lengths(N, L):
    {"inputs": [N, L], "teacher_ranks": N, "teacher_scores": N}.
"""
from __future__ import annotations

from typing import Mapping

import seqio

from data_pipeline.seqio_input.preprocessors import AUTOTUNE, group_and_length, tf_dtype
from data_pipeline.seqio_input.tf_env import tf
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, Feature, FeatureSet

Spec = seqio.FeatureConverter.FeatureSpec


def example_spec(feature: Feature) -> Spec:
    """A batched feature's per-example seqio spec: the batch dim is dropped, and a rank-2 feature
    ([group, length]) is a sequence along its second axis, as seqio pads and checks it."""
    rank = feature.rank - 1
    return Spec(dtype=tf_dtype(feature), rank=rank, sequence_dim=1 if rank == 2 else 0)


def model_feature_specs(batch: FeatureSet) -> dict[str, Spec]:
    """seqio's MODEL_FEATURES from the model's batch declaration, so the two cannot drift apart."""
    return {feature.name: example_spec(feature) for feature in batch}


class DistillFeatureConverter(seqio.FeatureConverter):
    """Pads groups to N passages of L tokens and adds the passage mask.

    seqio's generic length check compares one axis against one int, which cannot express [N, L], so it
    is off by default; `_convert_features` asserts both bounds itself and fixes static shapes.
    """

    TASK_FEATURES = {
        "inputs": Spec(dtype=tf.int32, rank=2, sequence_dim=1),
        "teacher_ranks": Spec(dtype=tf.int32),
        "teacher_scores": Spec(dtype=tf.float32),
    }
    MODEL_FEATURES = model_feature_specs(LISTWISE_GROUP_BATCH)
    PACKING_FEATURE_DTYPES = None

    def __init__(self, pack: bool = False, apply_length_check: bool = False, **kwargs):
        if pack:
            raise ValueError("DistillFeatureConverter cannot pack: listwise groups are rank-2 features")
        super().__init__(pack=False, apply_length_check=apply_length_check, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, object]) -> tf.data.Dataset:
        n_max, length = group_and_length(task_feature_lengths)

        def fn(ex):
            inputs = ex["inputs"]
            n = tf.shape(inputs)[0]
            width = tf.shape(inputs)[1]
            checks = [
                tf.debugging.assert_less_equal(n, n_max, message=f"group larger than group_size={n_max}"),
                tf.debugging.assert_less_equal(width, length, message=f"passage longer than max_length={length}"),
                tf.debugging.assert_greater(n, 0, message="empty group"),
                tf.debugging.assert_equal(tf.shape(ex["teacher_ranks"])[0], n, message="teacher_ranks != group"),
                tf.debugging.assert_equal(tf.shape(ex["teacher_scores"])[0], n, message="teacher_scores != group"),
            ]
            with tf.control_dependencies(checks):
                pad_rows = n_max - n
                encoder = tf.pad(inputs, [[0, pad_rows], [0, length - width]])
            ranks = tf.concat([ex["teacher_ranks"], tf.range(n, n_max, dtype=tf.int32)], axis=0)
            scores = tf.pad(ex["teacher_scores"], [[0, pad_rows]])
            out = {
                "encoder_input_tokens": tf.ensure_shape(encoder, [n_max, length]),
                "teacher_ranks": tf.ensure_shape(ranks, [n_max]),
                "passage_mask": tf.sequence_mask(n, n_max, dtype=tf.int32),
                "teacher_scores": tf.ensure_shape(scores, [n_max]),
            }
            out["passage_mask"] = tf.ensure_shape(out["passage_mask"], [n_max])
            for name in self._passthrough_features:
                out[name] = ex[name]
            return out

        return ds.map(fn, num_parallel_calls=AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, object]) -> Mapping[str, int]:
        """Each declared feature's length along its sequence axis: per example, a feature is [N] or [N, L]."""
        n_max, length = group_and_length(task_feature_lengths)
        lengths = {name: (n_max, length)[spec.sequence_dim] for name, spec in self.MODEL_FEATURES.items()}
        for name in self._passthrough_features:
            lengths[name] = task_feature_lengths[name]
        return lengths
