"""Feature declarations: what a batch (or a stored example) holds, said once.

A model declares its features here (names, dimensions, dtypes, logical axes); everything that builds,
checks, shards or stands in for a batch reads the declaration: the host-side check (`FeatureSet.validate`),
the partitioner's batch shardings (`logical_axes`), the AOT tool's abstract batch (`FeatureSet.abstract`),
the seqio feature converter and the TFDS builder (data_pipeline.seqio_input, which translates dtypes to
TensorFlow's). Dimensions are named after the options that size them (batch, group_size, max_length), and one size per
name holds across features.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from twolar_jax.errors import TwolarError

DTYPES = ("int32", "float32", "bool", "string")


class BatchError(TwolarError, ValueError):
    """A batch that does not match its model's feature declaration (names, ranks, dtypes, shapes)."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature: `dims` names each dimension (the first is the batch's when batched), `logical_axes` maps
    them for sharding (t5x names; None: never split). `bool_ok`: an int32 feature that may come as bool."""

    name: str
    dtype: str
    dims: tuple[str, ...]
    logical_axes: tuple[str | None, ...]
    required: bool = True
    bool_ok: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"feature {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        if len(self.logical_axes) != len(self.dims):
            raise ValueError(f"feature {self.name!r}: {len(self.dims)} dims but {len(self.logical_axes)} logical axes")

    @property
    def rank(self) -> int:
        return len(self.dims)

    def accepts(self, dtype: np.dtype) -> bool:
        if self.dtype == "int32":
            return np.issubdtype(dtype, np.integer) or (self.bool_ok and dtype == np.bool_)
        if self.dtype == "float32":
            return np.issubdtype(dtype, np.floating)
        if self.dtype == "bool":
            return dtype == np.bool_
        return dtype.kind in "OSU"

    def expected(self) -> str:
        return {"int32": "int or bool" if self.bool_ok else "int", "float32": "float"}.get(self.dtype, self.dtype)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """An ordered set of features: a model's batch, or a stored example (unbatched: no batch dim)."""

    features: tuple[Feature, ...]

    def __iter__(self) -> Iterator[Feature]:
        return iter(self.features)

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def select(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The declared features only (a batch may carry qids or texts for logging)."""
        return {k: v for k, v in batch.items() if k in self.names}

    def sizes(self, batch: Mapping[str, Any]) -> dict[str, int]:
        """{dim name: size} as the batch's first feature of each dimension has it."""
        out: dict[str, int] = {}
        for feature in self.features:
            if feature.name in batch:
                for dim, size in zip(feature.dims, np.shape(batch[feature.name])):
                    out.setdefault(dim, int(size))
        return out

    def validate(self, batch: Any, *, where: str = "batch", expect: Mapping[str, int] | None = None) -> None:
        """Check names, ranks, dtypes and that each named dimension has one size, before anything is traced.

        `expect` pins dimension sizes ({"group_size": 30}); messages name the feature, its shape and the option."""
        if not isinstance(batch, Mapping):
            raise BatchError(f"{where}: expected a dict of arrays, got {type(batch).__name__}")
        missing = [f.name for f in self.features if f.required and f.name not in batch]
        if missing:
            raise BatchError(f"{where}: missing feature(s) {missing}; got {sorted(batch)}")
        present = [f for f in self.features if f.name in batch]
        for feature in present:
            _check_rank_and_dtype(feature, batch[feature.name], where)
        first: dict[str, tuple[Feature, tuple]] = {}
        for feature in present:
            shape = tuple(np.shape(batch[feature.name]))
            for axis, (dim, size) in enumerate(zip(feature.dims, shape)):
                if dim not in first:
                    first[dim] = (feature, shape)
                    continue
                ref, ref_shape = first[dim]
                if ref_shape[ref.dims.index(dim)] != size:
                    want = tuple(ref_shape[ref.dims.index(d)] if d in ref.dims else s for d, s in zip(feature.dims, shape))
                    raise BatchError(f"{where}: feature {feature.name!r} has shape {shape} but {ref.name} has shape "
                                     f"{ref_shape}; expected {want} ([{', '.join(feature.dims)}])")
        for dim, size in (expect or {}).items():
            if dim in first:
                ref, ref_shape = first[dim]
                got = ref_shape[ref.dims.index(dim)]
                if got != size:
                    raise BatchError(f"{where}: {ref.name} has {dim}={got} (shape {ref_shape}), expected {dim}={size}")

    def abstract(self, sizes: Mapping[str, int]) -> dict[str, Any]:
        """ShapeDtypeStructs of every feature for the given dimension sizes (the AOT tool's batch)."""
        import jax

        out = {}
        for feature in self.features:
            missing = [d for d in feature.dims if d not in sizes]
            if missing:
                raise ValueError(f"feature {feature.name!r}: no size for dims {missing}")
            out[feature.name] = jax.ShapeDtypeStruct(tuple(sizes[d] for d in feature.dims), np.dtype(feature.dtype))
        return out

    def logical_axes(self, batch: Mapping[str, Any]) -> dict[str, tuple[str | None, ...]]:
        """The logical axes of each feature in `batch` (unknown names: batch axis first, the rest unsplit)."""
        names = self.names
        return {k: self[k].logical_axes if k in names else ("batch",) + (None,) * (np.ndim(v) - 1)
                for k, v in batch.items()}


def _check_rank_and_dtype(feature: Feature, value: Any, where: str) -> None:
    shape = tuple(np.shape(value))
    if len(shape) != feature.rank:
        raise BatchError(f"{where}: feature {feature.name!r} must have rank {feature.rank}, got shape {shape}")
    dtype = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
    if not feature.accepts(dtype):
        raise BatchError(f"{where}: feature {feature.name!r} has dtype {dtype}, expected {feature.expected()}")


# ---------------------------------------------------------------------------------- declarations
def _group_feature(name: str, dtype: str, doc: str, **kw: Any) -> Feature:
    return Feature(name, dtype, ("batch", "group_size"), ("batch", None), doc=doc, **kw)


LISTWISE_GROUP_BATCH = FeatureSet((
    Feature("encoder_input_tokens", "int32", ("batch", "group_size", "max_length"), ("batch", None, None),
            doc="one templated passage per row, 0-padded"),
    _group_feature("teacher_ranks", "int32", "0 = the teacher's best; padding rows continue n..N-1"),
    _group_feature("passage_mask", "int32", "1 = a real passage, 0 = padding", bool_ok=True),
    _group_feature("teacher_scores", "float32", "0 where absent or padded (margin_mse reads it)", required=False),
))
"""A distillation batch of teacher-ordered groups: B queries x N passages x L tokens."""

POINTWISE_SCORE_BATCH = FeatureSet((
    Feature("encoder_input_tokens", "int32", ("batch", "max_length"), ("batch", None),
            doc="one templated (query, document) pair per row, 0-padded"),
))
"""What a pointwise model scores: rows of pair tokens (the Reranker's length-bucketed batches)."""

DISTILL_RECORD = FeatureSet((
    Feature("qid", "string", (), ()),
    Feature("query", "string", (), ()),
    Feature("query_type", "string", (), ()),
    Feature("docids", "string", ("candidates",), (None,), doc="in teacher order, best first"),
    Feature("texts", "string", ("candidates",), (None,)),
    Feature("teacher_scores", "float32", ("candidates",), (None,), doc="zeros when the record has none"),
    Feature("has_teacher_scores", "bool", (), ()),
))
"""One stored distillation example (unbatched, untokenized): what the TFDS builder writes and the TF
preprocessors read; every student family reads this same record."""

FID_WINDOW_BATCH = FeatureSet((
    Feature("encoder_input_tokens", "int32", ("batch", "group_size", "max_length"), ("batch", None, None),
            doc="one templated passage per slot, identifiers 1..n after the shuffle, 0-padded"),
    Feature("decoder_target_tokens", "int32", ("batch", "target_length"), ("batch", None),
            doc="`[a] > [b] > ...` in teacher order + EOS, 0-padded"),
    _group_feature("teacher_ranks", "int32", "each slot's place in the teacher order, 0 = best"),
    _group_feature("passage_mask", "int32", "1 = a real passage, 0 = an empty slot", bool_ok=True),
))
"""A listwise (Fusion-in-Decoder) batch: B windows x n passage slots x L tokens, and the target permutation."""

FID_SCORE_BATCH = FeatureSet(tuple(f for f in FID_WINDOW_BATCH if f.name in ("encoder_input_tokens", "passage_mask")))
"""What a listwise model scores: windows of passages and which slots hold one."""
