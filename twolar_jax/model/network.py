"""Flax linen T5 encoder-decoder (v1.0 and v1.1 / Flan-T5) in the style of t5x's examples/t5 network.

Parameter names follow t5x, so the HF name table in `hf_conversion` is the only place that knows
transformers' names. Every parameter is created with logical axis names and activations carry logical
constraints: `partitioning` maps those names onto a mesh, the model never names mesh axes itself.
Numerics follow transformers' `T5ForConditionalGeneration`: RMS norm in fp32, no 1/sqrt(d) attention
scaling, relative position buckets computed once per stack and shared by its layers, decoder output
scaled by d_model^-0.5 only when embeddings are tied (T5 v1.0).

Two ways of computing the same function are chosen by the config: `attention` picks the attention core
(`resolve_attention`: a per-sequence loop, batched einsums or jax.nn.dot_product_attention), and
`scan_layers` runs each stack's layers under nn.scan with stacked parameters (`model.scan` converts
parameter trees between the two forms).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twolar_jax.model.config import T5Config

Array = jax.Array
MASK_VALUE = -1e10  # finite, so a fully padded row (a masked passage) gives uniform attention, not NaN


def _dtype(config: T5Config) -> jnp.dtype:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def _normal(stddev: float):
    return nn.initializers.normal(stddev=stddev)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


def _dense(x: Array, kernel: Array, contract: int = 1, *, flat: bool) -> Array:
    """x's last `contract` dims times kernel's first `contract` dims (a bias-free projection).

    flat: as one 2-D matmul, [B, L, d] @ [d, heads, kv] -> [B*L, d] @ [d, heads*kv] (the reshapes are free:
    row-major, sharded dims stay major). XLA:CPU lays out the backward pass of a dot with two leading dims
    badly (it wrote the gated-GELU gradient transposed before each weight-gradient matmul): flat, the
    flan-t5-small MLP's forward and backward ran about 1.6x faster on 2 cores. XLA:TPU is the other way
    round: flat, the flan-t5-large fsdp train step on v5e-16 needed 8.29 GiB per chip instead of 7.74.
    Otherwise the dot_general of the einsum. Same arithmetic both ways."""
    if not flat:
        return jnp.tensordot(x, kernel, axes=contract)
    lead, inner, outer = x.shape[:x.ndim - contract], kernel.shape[:contract], kernel.shape[contract:]
    out = x.reshape((-1, math.prod(inner))) @ kernel.reshape((math.prod(inner), -1))
    return out.reshape(lead + outer)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of key-minus-query offsets: exact for small offsets, log-spaced up to max_distance."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    safe = jnp.maximum(relative_position, 1).astype(jnp.float32)
    if_large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, if_large)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, computed in fp32."""

    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (x32 * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
    """One [heads, buckets] table per stack; returns the additive bias [1, heads, q, k] in fp32."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        c = self.config
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(_normal(c.d_model ** -0.5), ("heads", "relpos_buckets")),
            (c.num_heads, c.relative_attention_num_buckets), jnp.float32)
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                           num_buckets=c.relative_attention_num_buckets,
                                           max_distance=c.relative_attention_max_distance)
        bias = jnp.take(table, buckets, axis=1)  # [heads, q, k]
        return bias[None]


class _Projection(nn.Module):
    """A bias-free projection holding one `kernel`, so parameter paths read attention/query/kernel."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    stddev: float

    @nn.compact
    def __call__(self) -> Array:
        return self.param("kernel", nn.with_logical_partitioning(_normal(self.stddev), self.axes),
                          self.shape, jnp.float32)


# Which attention path "auto" picks per backend. CPU: the per-sequence loop keeps the [heads, q, k] logits
# in cache (the tiny model's 30 x 512 encoder pass ran about 2x faster forward and 3x faster backward than
# the batched einsums). GPU: jax.nn.dot_product_attention, the API that can dispatch to fused kernels.
# TPU: the batched einsums, which XLA:TPU fuses well and which keep the batch sharding.
_AUTO_ATTENTION = {"cpu": "rows", "gpu": "dot_product", "cuda": "dot_product", "rocm": "dot_product",
                   "tpu": "einsum"}


def resolve_attention(config: T5Config, backend: str | None = None) -> str:
    """The attention path ("rows", "einsum" or "dot_product") a compile for `backend` uses.

    `backend` is a jax platform name ("cpu", "gpu", "tpu"); None means jax.default_backend() (what the
    model does while tracing). Pure given `backend`, so tests and AOT tools can report the path without
    compiling. An unknown backend gets "einsum", the form every XLA backend compiles. (With dropout active
    a dot_product call still computes the einsum path, see `attention_core`.)"""
    if config.attention != "auto":
        return config.attention
    backend = (backend or jax.default_backend()).lower()
    return _AUTO_ATTENTION.get(backend, "einsum")


# Which projection layout "auto" picks per backend (see _dense): flat on CPU, the einsum elsewhere.
_AUTO_PROJECTION = {"cpu": "flat"}


def resolve_projection(config: T5Config, backend: str | None = None) -> str:
    """The projection layout ("flat" or "einsum") a compile for `backend` uses; None: jax.default_backend()."""
    if config.projection != "auto":
        return config.projection
    return _AUTO_PROJECTION.get((backend or jax.default_backend()).lower(), "einsum")


def _attention_weights(logits: Array, bias: Array | None, key_padding: Array | None, dropout_rng: Array | None,
                       rate: float) -> Array:
    """softmax(logits + bias + padding) in fp32, with dropout on the weights when dropout_rng is given."""
    if bias is not None:
        logits = logits + bias
    if key_padding is not None:
        logits = logits + key_padding
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
    return weights


def _attend(q: Array, key: Array, value: Array, bias: Array | None, key_padding: Array | None,
            dropout_rng: Array | None, rate: float) -> Array:
    """One sequence ([len, heads, kv]) or a batch ([B, len, heads, kv]); bias/padding broadcast."""
    spec = "qhk,thk->hqt" if q.ndim == 3 else "bqhk,bthk->bhqt"
    logits = jnp.einsum(spec, q, key, preferred_element_type=jnp.float32)
    weights = _attention_weights(logits, None if bias is None else (bias[0] if q.ndim == 3 else bias),
                                 key_padding, dropout_rng, rate)
    out_spec = "hqt,thk->qhk" if q.ndim == 3 else "bhqt,bthk->bqhk"
    return jnp.einsum(out_spec, weights.astype(value.dtype), value)


def _attend_rows(q: Array, key: Array, value: Array, bias: Array | None, key_padding: Array | None,
                 dropout_rng: Array | None, rate: float) -> Array:
    """`_attend` one sequence at a time (lax.map, rematerialised in the backward pass).

    The rows drop the batch dimension: XLA:CPU lays out einsums with a batch dimension of 1 badly."""
    keys = None if dropout_rng is None else jax.random.split(dropout_rng, q.shape[0])
    padding = None if key_padding is None else key_padding[:, 0]  # [B, 1, k] -> per row [1, k]

    def row(xs):
        qi, ki, vi, pi, ri = xs
        return _attend(qi, ki, vi, bias, pi, ri, rate)

    return jax.lax.map(jax.checkpoint(row), (q, key, value, padding, keys))


def dot_product_implementation(dtype: Any, q_len: int, kv_len: int, d_kv: int, backend: str | None = None) -> str:
    """The kernel `jax.nn.dot_product_attention` is asked for: "cudnn" (the fused flash kernel) or "xla".

    cuDNN's fused attention takes bf16/fp16 inputs with a head size that is a multiple of 8 up to 128,
    on NVIDIA GPUs, and (to differentiate through a bias) even query and key lengths; everything else
    (fp32, CPU, TPU, odd lengths, the one-position decoder step, whose logits are a single row anyway)
    takes jax's XLA path. Pure given `backend`, so tests and tools can report it."""
    backend = (backend or jax.default_backend()).lower()
    fused = (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
             and d_kv % 8 == 0 and d_kv <= 128 and q_len > 1 and q_len % 2 == 0 and kv_len % 2 == 0)
    return "cudnn" if fused else "xla"


def _attend_dot_product(q: Array, key: Array, value: Array, bias: Array | None,
                        key_padding: Array | None) -> Array:
    """jax.nn.dot_product_attention with T5's relative-position bias and padding as one additive bias.

    scale=1.0 because T5 has no 1/sqrt(d) scaling. The XLA path keeps the bias, logits and softmax in
    fp32 like `_attend`; the cuDNN kernel (`dot_product_implementation`) takes the bias in the inputs'
    dtype and accumulates logits and softmax in fp32 inside the kernel. Rows of padding alone differ
    between the two (uniform weights here, unmasked there); their scores are never used."""
    total = bias
    if key_padding is not None:
        total = key_padding if total is None else total + key_padding
    implementation = dot_product_implementation(q.dtype, q.shape[1], key.shape[1], q.shape[-1])
    if implementation == "cudnn" and total is not None:  # cuDNN takes a [B|1, H|1, q, k] bias in q's dtype
        total = jnp.broadcast_to(total, total.shape[:2] + (q.shape[1], key.shape[1]))
        if key_padding is not None:
            # A sequence of padding alone (a masked passage) would have every logit near MASK_VALUE: the
            # kernel's backward recomputes the weights from an fp32 log-sum-exp that cannot hold
            # log(keys) beside 1e10, so its gradient would be `keys` times too large. Such sequences
            # attend unmasked instead: finite, with exact gradients, and never scored.
            all_padding = jnp.all(key_padding < MASK_VALUE / 2, axis=-1, keepdims=True)
            unmasked = jnp.zeros((), total.dtype) if bias is None else bias
            total = jnp.where(all_padding, unmasked, total)
        total = total.astype(q.dtype)
    return jax.nn.dot_product_attention(q, key, value, bias=total, scale=1.0, implementation=implementation)


def absorb_kv_projection(q_len: int, kv_len: int, d_model: int, d_kv: int) -> bool:
    """Whether `_attend_absorbed` costs fewer FLOPs than projecting keys and values (per head).

    Projecting costs 2 kv_len d_model d_kv multiply-adds (keys, values) plus 2 q_len kv_len d_kv
    (logits, mixing); absorbing the kernels into the query and the output costs 2 q_len d_model d_kv plus
    2 q_len kv_len d_model. True for the cross-attention of a short decoder (scoring's single first step:
    about 40x fewer), false for self-attention over a whole sequence."""
    projected = 2 * kv_len * d_model * d_kv + 2 * q_len * kv_len * d_kv
    absorbed = 2 * q_len * d_model * d_kv + 2 * q_len * kv_len * d_model
    return absorbed < projected


def _attend_absorbed(q: Array, inputs_kv: Array, wk: Array, wv: Array, bias: Array | None,
                     key_padding: Array | None, dropout_rng: Array | None, rate: float) -> Array:
    """softmax(q (x Wk)^T + bias) (x Wv) without computing x Wk or x Wv: [B, q, heads, kv].

    Reassociated as softmax((q Wk^T) x^T + bias) then (weights x) Wv, so keys and values of all kv_len
    positions are never projected; for one decoder step over an encoded passage that drops the [B*len,
    d_model] x [d_model, heads*kv] key and value matmuls of every decoder layer (about an eighth of a
    flan-t5-small scoring forward). Same fp32 logits and softmax as `_attend`; only the summation order
    of the projections differs."""
    q_model = jnp.einsum("bqhk,dhk->bqhd", q, wk)
    logits = jnp.einsum("bqhd,btd->bhqt", q_model, inputs_kv, preferred_element_type=jnp.float32)
    weights = _attention_weights(logits, bias, key_padding, dropout_rng, rate)
    mixed = jnp.einsum("bhqt,btd->bqhd", weights.astype(inputs_kv.dtype), inputs_kv)
    return jnp.einsum("bqhd,dhk->bqhk", mixed, wv)


def attention_core(q: Array, key: Array, value: Array, bias: Array | None, key_padding: Array | None, *,
                   dropout_rng: Array | None, rate: float, kind: str = "einsum") -> Array:
    """softmax(q k^T + bias + padding) v over [B, len, heads, kv]; fp32 logits, no 1/sqrt(d) scaling.

    kind: "einsum" (batched), "rows" (one sequence at a time, the cache-friendly order on CPU; a batch of
    one, or a single query position whose logits are one row anyway, takes the einsum path) or "dot_product" (jax.nn.dot_product_attention). dot_product_attention has
    no dropout on the attention weights, so with dropout active (dropout_rng given) a dot_product call
    falls back to einsum: training with dropout_rate > 0 computes the same arithmetic the einsum way."""
    if kind not in ("einsum", "rows", "dot_product"):
        raise ValueError(f"attention_core: kind={kind!r}: expected einsum, rows or dot_product")
    if kind == "dot_product" and dropout_rng is None:
        return _attend_dot_product(q, key, value, bias, key_padding)
    if kind == "rows" and q.shape[0] > 1 and q.shape[1] > 1:
        return _attend_rows(q, key, value, bias, key_padding, dropout_rng, rate)
    return _attend(q, key, value, bias, key_padding, dropout_rng, rate)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; logits and softmax in fp32."""

    config: T5Config

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array | None, *, enable_dropout: bool,
                 key_padding: Array | None = None, decode_index: Array | None = None,
                 cache_step: bool = False) -> Array:
        """bias: [1, heads, q, k] shared by the batch (relative positions, causal mask) or None;
        key_padding: [B, 1, 1, k] additive mask of padded keys, or None."""
        c = self.config
        dtype = _dtype(c)
        d, h, k = c.d_model, c.num_heads, c.d_kv
        # t5x names the projections query/key/value/out, each a DenseGeneral with [embed, heads, kv] kernels.
        wq = _Projection((d, h, k), ("embed", "heads", "kv"), (d * k) ** -0.5, name="query")()
        wk = _Projection((d, h, k), ("embed", "heads", "kv"), d ** -0.5, name="key")()
        wv = _Projection((d, h, k), ("embed", "heads", "kv"), d ** -0.5, name="value")()
        wo = _Projection((h, k, d), ("heads", "kv", "embed"), (h * k) ** -0.5, name="out")()
        flat = resolve_projection(c) == "flat"
        q = _dense(inputs_q.astype(dtype), wq.astype(dtype), flat=flat)
        q = _constrain(q, ("batch", "length", "heads", "kv"))
        rate = c.dropout_rate if enable_dropout else 0.0
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        if decode_index is None and absorb_kv_projection(q.shape[1], inputs_kv.shape[1], d, k):
            out = _attend_absorbed(q, inputs_kv.astype(dtype), wk.astype(dtype), wv.astype(dtype), bias,
                                   key_padding, dropout_rng, rate)
            return self._project_out(out, wo, dtype, flat)
        key = _dense(inputs_kv.astype(dtype), wk.astype(dtype), flat=flat)
        value = _dense(inputs_kv.astype(dtype), wv.astype(dtype), flat=flat)
        key = _constrain(key, ("batch", "length", "heads", "kv"))
        value = _constrain(value, ("batch", "length", "heads", "kv"))
        if decode_index is not None:
            # Incremental decoding: the first call creates a zero cache of the full length; each later
            # one-token call writes its key/value at decode_index and attends over the whole cache.
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            if cache_step:
                cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, decode_index, 0, 0))
                cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, decode_index, 0, 0))
                key, value = cached_key.value, cached_value.value
        out = attention_core(q, key, value, bias, key_padding, dropout_rng=dropout_rng, rate=rate,
                             kind=resolve_attention(c))
        return self._project_out(out, wo, dtype, flat)

    @staticmethod
    def _project_out(out: Array, wo: Array, dtype: jnp.dtype, flat: bool) -> Array:
        out = _dense(out, wo.astype(dtype), 2, flat=flat)
        return _constrain(out, ("batch", "length", "embed"))


def gated_gelu(gate: Array, linear: Array) -> Array:
    """gelu_tanh(gate) * linear: the hidden activation of T5 v1.1 / Flan-T5's feed-forward block."""
    return jax.nn.gelu(gate, approximate=True) * linear


# gated_gelu recomputed from its two inputs in the backward pass. Differentiated as written, the tanh
# approximation leaves four more [tokens, d_ff] intermediates (tanh, 1 - tanh^2, two products) for the
# backward pass to read: 0.6 GiB of the 4.6 GiB of temporaries in flan-t5-small's 30 x 512-token train
# step on CPU. Recomputing them is elementwise work XLA fuses into the gradient; only the two projections
# stay saved. A layer under remat recomputes everything anyway, so it uses the plain function.
gated_gelu_rematerialised = jax.checkpoint(gated_gelu)


class MlpBlock(nn.Module):
    """ReLU (T5 v1.0) or gated-GELU with the tanh approximation (T5 v1.1 / Flan-T5)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, *, enable_dropout: bool) -> Array:
        c = self.config
        dtype = _dtype(c)
        x = x.astype(dtype)
        flat = resolve_projection(c) == "flat"
        if c.is_gated:
            wi_0 = _Projection((c.d_model, c.d_ff), ("embed", "mlp"), c.d_model ** -0.5, name="wi_0")()
            wi_1 = _Projection((c.d_model, c.d_ff), ("embed", "mlp"), c.d_model ** -0.5, name="wi_1")()
            activation = gated_gelu if c.remat else gated_gelu_rematerialised
            hidden = activation(_dense(x, wi_0.astype(dtype), flat=flat), _dense(x, wi_1.astype(dtype), flat=flat))
        else:
            wi = _Projection((c.d_model, c.d_ff), ("embed", "mlp"), c.d_model ** -0.5, name="wi")()
            hidden = jax.nn.relu(_dense(x, wi.astype(dtype), flat=flat))
        hidden = _constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(c.dropout_rate)(hidden, deterministic=not enable_dropout)
        wo = _Projection((c.d_ff, c.d_model), ("mlp", "embed"), c.d_ff ** -0.5, name="wo")()
        return _constrain(_dense(hidden, wo.astype(dtype), flat=flat), ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, key_padding: Array, enable_dropout: bool) -> Array:
        c = self.config
        dtype = _dtype(c)
        drop = nn.Dropout(c.dropout_rate)
        y = RMSNorm(c.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
        y = Attention(c, name="attention")(y, y, bias, key_padding=key_padding, enable_dropout=enable_dropout)
        x = x + drop(y, deterministic=not enable_dropout)
        y = RMSNorm(c.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
        y = MlpBlock(c, name="mlp")(y, enable_dropout=enable_dropout)
        x = _constrain(x + drop(y, deterministic=not enable_dropout), ("batch", "length", "embed"))
        return (x, None) if c.scan_layers else x  # nn.scan's body returns (carry, per-layer output)


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_padding: Array, enable_dropout: bool,
                 decode_index: Array | None = None, cache_step: bool = False) -> Array:
        c = self.config
        dtype = _dtype(c)
        drop = nn.Dropout(c.dropout_rate)
        y = RMSNorm(c.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
        y = Attention(c, name="self_attention")(y, y, self_bias, enable_dropout=enable_dropout,
                                                decode_index=decode_index, cache_step=cache_step)
        x = x + drop(y, deterministic=not enable_dropout)
        y = RMSNorm(c.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
        y = Attention(c, name="encoder_decoder_attention")(y, encoded, None, key_padding=cross_padding,
                                                           enable_dropout=enable_dropout)
        x = x + drop(y, deterministic=not enable_dropout)
        y = RMSNorm(c.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
        y = MlpBlock(c, name="mlp")(y, enable_dropout=enable_dropout)
        x = _constrain(x + drop(y, deterministic=not enable_dropout), ("batch", "length", "embed"))
        return (x, None) if c.scan_layers else x


def _layer_stack(layer: type[nn.Module], config: T5Config, num_layers: int, *, static_argnums: tuple[int, ...],
                 remat: bool) -> type[nn.Module]:
    """The layer class a stack instantiates: the layer itself, rematerialised and/or scanned.

    Unscanned, the stack calls it once per layer (`layers_<i>`). Scanned (config.scan_layers), one call
    named `layers` runs all of them under nn.scan: parameters stacked on a leading axis named 'layers'
    (added to their logical axes through metadata_params), a fresh params/dropout rng per layer, and every
    argument but the carried hidden state broadcast. The 'cache' collection is scanned as well, so
    incremental decoding keeps one [layers, B, len, heads, kv] key/value cache per stack rather than
    falling back to an unrolled decoder; 'intermediates' (sow, capture_intermediates) are stacked the same
    way. Inside a scan XLA cannot CSE the rematerialised forward into the original one, so remat drops
    its prevent_cse barrier there (jax.checkpoint's advice; t5x does the same). Because the params rng is
    split per layer, a scanned init draws other values than an unrolled one: use model.scan.stack_layers
    to get the same weights in both forms."""
    if remat:
        layer = nn.remat(layer, static_argnums=static_argnums, prevent_cse=not config.scan_layers)
    if not config.scan_layers:
        return layer
    return nn.scan(layer, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=nn.broadcast, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


def _padding_bias(key_tokens: Array) -> Array:
    """[B, 1, 1, K] additive fp32 mask: 0 for real tokens, MASK_VALUE for padding (id 0)."""
    return jnp.where(key_tokens > 0, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None, :]


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, enable_dropout: bool) -> Array:
        c = self.config
        x = self.embedder(tokens).astype(_dtype(c))
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not enable_dropout)
        x = _constrain(x, ("batch", "length", "embed"))
        positions = jnp.arange(tokens.shape[1])
        bias = RelativePositionBias(c, bidirectional=True, name="relpos_bias")(positions, positions)
        padding = _padding_bias(tokens)
        layer_cls = _layer_stack(EncoderLayer, c, c.num_encoder_layers, static_argnums=(4,), remat=c.remat)
        if c.scan_layers:
            x, _ = layer_cls(c, name="layers")(x, bias, padding, enable_dropout)
        else:
            for i in range(c.num_encoder_layers):
                x = layer_cls(c, name=f"layers_{i}")(x, bias, padding, enable_dropout)
        x = RMSNorm(c.layer_norm_epsilon, _dtype(c), name="encoder_norm")(x)
        return nn.Dropout(c.dropout_rate)(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, encoded: Array, encoder_tokens: Array, decoder_tokens: Array, enable_dropout: bool,
                 decode: bool = False, output_vocab_ids: Array | None = None) -> Array:
        c = self.config
        dtype = _dtype(c)
        x = self.embedder(decoder_tokens).astype(dtype)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not enable_dropout)
        x = _constrain(x, ("batch", "length", "embed"))
        length = decoder_tokens.shape[1]
        decode_index, cache_step = None, False
        query_positions = key_positions = jnp.arange(length)
        if decode:
            cache_step = self.has_variable("cache", "decode_index")
            index = self.variable("cache", "decode_index", lambda: jnp.array(0, dtype=jnp.int32))
            cached_positions = self.variable("cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32))
            decode_index = index.value
            if cache_step:
                if length != 1:
                    raise ValueError(f"incremental decoding takes one token per step, got {length}")
                index.value = index.value + 1
                query_positions, key_positions = decode_index[None], cached_positions.value
        causal = jnp.where(key_positions[None, :] <= query_positions[:, None], 0.0, MASK_VALUE)
        self_bias = RelativePositionBias(c, bidirectional=False, name="relpos_bias")(query_positions, key_positions)
        self_bias = self_bias + causal[None, None].astype(jnp.float32)
        cross_padding = _padding_bias(encoder_tokens)
        layer_cls = _layer_stack(DecoderLayer, c, c.num_decoder_layers, static_argnums=(5, 7),
                                 remat=c.remat and not decode)
        rest = (encoded, self_bias, cross_padding, enable_dropout, decode_index, cache_step)
        if c.scan_layers:
            x, _ = layer_cls(c, name="layers")(x, *rest)
        else:
            for i in range(c.num_decoder_layers):
                x = layer_cls(c, name=f"layers_{i}")(x, *rest)
        x = RMSNorm(c.layer_norm_epsilon, dtype, name="decoder_norm")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not enable_dropout)
        if c.scales_decoder_outputs:
            # T5 v1.0 scales the decoder output by d_model^-0.5 (and ties); v1.1 / Flan-T5 do neither.
            x = x * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            kernel = self.embedder.embedding_table().T
        else:
            # t5x initialises logits_dense with fan-in variance scaling (HF uses std 1.0, which gives logits ~50).
            kernel = _Projection((c.d_model, c.vocab_size), ("embed", "vocab"), c.d_model ** -0.5,
                                 name="logits_dense")()
        if output_vocab_ids is not None:
            # Scoring reads only a few vocabulary entries: slicing the kernel first skips the [D, V] matmul.
            kernel = jnp.take(kernel, output_vocab_ids, axis=1)
        logits = jnp.einsum("bld,dv->blv", x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        if output_vocab_ids is None:
            logits = _constrain(logits, ("batch", "length", "vocab"))
        return logits

class Embedder(nn.Module):
    """The shared token embedding [vocab, embed]."""

    config: T5Config

    def setup(self) -> None:
        c = self.config
        self.embedding = self.param("embedding", nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
                                    (c.vocab_size, c.d_model), jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0)

    def embedding_table(self) -> Array:
        return self.embedding


class T5(nn.Module):
    """Encoder-decoder T5. Token id 0 is padding: attention masks come from tokens != 0 (t5x convention)."""

    config: T5Config

    def setup(self) -> None:
        self.token_embedder = Embedder(self.config)
        self.encoder = Encoder(self.config, self.token_embedder)
        self.decoder = Decoder(self.config, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, *, enable_dropout: bool = False) -> Array:
        _check_tokens(encoder_input_tokens, "encoder_input_tokens")
        return self.encoder(encoder_input_tokens, enable_dropout)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
               enable_dropout: bool = False, decode: bool = False, output_vocab_ids: Array | None = None) -> Array:
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout, decode,
                            output_vocab_ids)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
                 enable_dropout: bool = False) -> Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout=enable_dropout)

    def first_step_logits(self, encoder_input_tokens: Array, *, enable_dropout: bool = False,
                          vocab_ids: Sequence[int] | Array | None = None) -> Array:
        """fp32 logits [B, V] (or [B, len(vocab_ids)]) of the first decoder step from the start token."""
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        start = jnp.full((encoder_input_tokens.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
        ids = None if vocab_ids is None else jnp.asarray(vocab_ids, jnp.int32)
        return self.decode(encoded, encoder_input_tokens, start, enable_dropout=enable_dropout,
                           output_vocab_ids=ids)[:, 0, :]


def _check_tokens(tokens: Array, name: str) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, length], got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")


def _dummy_tokens(length: int = 4) -> np.ndarray:
    return np.ones((1, length), np.int32)


def init_boxed(config: T5Config, rng: Array) -> Any:
    """Params as created by flax, each wrapped in nn.LogicallyPartitioned (carries its logical axes)."""
    return T5(config).init(rng, _dummy_tokens(), _dummy_tokens())["params"]


def init_params(config: T5Config, rng: Array | int = 0) -> Any:
    """Random fp32 params (plain arrays), as T5ForConditionalGeneration initialises them."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return nn.meta.unbox(init_boxed(config, rng))


def logical_axes(config: T5Config) -> Any:
    """PartitionSpecs of logical axis names, in the same tree structure as the params."""
    abstract = jax.eval_shape(lambda: init_boxed(config, jax.random.PRNGKey(0)))
    return nn.get_partition_spec(abstract)
