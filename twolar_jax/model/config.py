"""T5 hyper-parameters as one frozen dataclass, and the named presets (t5x's `T5Config` habit)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from twolar_jax.errors import CheckpointError, OptionError

FEED_FORWARD_KINDS = ("relu", "gated-gelu")
# transformers' `dense_act_fn` names of the tanh-approximated GELU our gated-gelu computes (HF forces gelu_new).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
COMPUTE_DTYPES = ("float32", "bfloat16")
# How the attention core is computed (`network.resolve_attention` turns "auto" into one of the others).
ATTENTION_KINDS = ("auto", "rows", "einsum", "dot_product")
# How projections are computed (`network.resolve_projection` turns "auto" into one of the others).
PROJECTION_KINDS = ("auto", "flat", "einsum")
# Fields that say how the model computes, not what: a run may set them differently from its checkpoint.
RUNTIME_FIELDS = ("dtype", "remat", "dropout_rate", "attention", "projection", "scan_layers")
# Values of the field this one replaced (`attention_loop`), for model_config.json files written before.
_LEGACY_ATTENTION_LOOP = {"auto": "auto", "rows": "rows", "batched": "einsum"}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Everything the network needs; parameters are always stored in fp32, `dtype` is the compute dtype."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # The output projection is the input embedding (no lm_head / logits_dense parameter).
    tie_word_embeddings: bool = False
    # Multiply the decoder output by d_model**-0.5 before the output projection. None: as T5 pairs them,
    # scaled exactly when tied (v1.0 both, v1.1/Flan-T5 neither); True/False only for the other two
    # combinations (a Flan-T5-shaped model created and saved by transformers 5 is tied and unscaled).
    # __post_init__ stores None whenever the value equals tie_word_embeddings, so equal models compare equal.
    scale_decoder_outputs: Optional[bool] = None
    dtype: str = "float32"
    remat: bool = False
    # The attention core: "rows" (one sequence at a time under lax.map, cache-friendly on CPU), "einsum"
    # (one batched einsum-softmax-einsum), "dot_product" (jax.nn.dot_product_attention), or "auto" (rows
    # on CPU, dot_product on GPU, einsum on TPU). Same arithmetic every way; see network.resolve_attention.
    attention: str = "auto"
    # The projections (query/key/value/out, the MLP): "flat" (one [B*L, d] @ [d, n] matmul each, what
    # XLA:CPU differentiates well), "einsum" (dot_general on the [B, L, d] activations, what XLA:TPU lays
    # out in less memory), or "auto" (flat on CPU, einsum elsewhere). Same arithmetic; network.resolve_projection.
    projection: str = "auto"
    # Encoder/decoder layers under nn.scan (t5x/MaxText `scan_layers`): parameters stacked on a leading
    # 'layers' axis under <stack>/layers instead of <stack>/layers_<i>; model.scan converts between the two.
    # Faster to compile for deep models; the same numbers either way.
    scan_layers: bool = False
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD_KINDS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected one of {FEED_FORWARD_KINDS}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"T5Config.attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        if self.projection not in PROJECTION_KINDS:
            raise ValueError(f"T5Config.projection={self.projection!r}: expected one of {PROJECTION_KINDS}")
        if self.scale_decoder_outputs is not None and not isinstance(self.scale_decoder_outputs, bool):
            raise ValueError(f"T5Config.scale_decoder_outputs={self.scale_decoder_outputs!r}: expected True, False or None")
        if self.scale_decoder_outputs == self.tie_word_embeddings:
            object.__setattr__(self, "scale_decoder_outputs", None)
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"T5Config.scan_layers={self.scan_layers!r}: expected True or False")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"T5Config.dtype={self.dtype!r}: expected one of {COMPUTE_DTYPES}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name}={value!r}: expected a positive int")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def scales_decoder_outputs(self) -> bool:
        """Whether the decoder output is multiplied by d_model**-0.5 before the logits (see the field)."""
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "T5Config":
        """The inverse of to_dict; also reads the `attention_loop` field of older model_config.json files."""
        values = dict(values)
        if "attention_loop" in values:
            legacy = values.pop("attention_loop")
            if legacy not in _LEGACY_ATTENTION_LOOP:
                raise ValueError(f"T5Config.attention_loop={legacy!r}: expected auto, rows or batched")
            values.setdefault("attention", _LEGACY_ATTENTION_LOOP[legacy])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown T5Config fields: {unknown}")
        return cls(**values)

    # --- transformers' config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     tied: Optional[bool] = None) -> "T5Config":
        """Read a transformers T5 config.json as transformers 5 does (and as older versions wrote it).

        `tied` is what the weights say (hf_conversion decides it from lm_head.weight); without it the v4
        meaning of tie_word_embeddings is taken. Other architectures and feed-forwards are refused by name.
        """
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "t5" or any(not a.startswith("T5") for a in archs):
            raise CheckpointError(
                f"{source}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
                "only T5 encoder-decoder checkpoints (t5, t5-v1_1, flan-t5, monoT5, TWOLAR) are supported"
            )
        num_layers = int(hf.get("num_layers", 6))
        if tied is None:
            tied = hf.get("tie_word_embeddings", True) is not False
        eos = hf.get("eos_token_id", 1)
        return cls(
            vocab_size=int(hf.get("vocab_size", 32128)),
            d_model=int(hf.get("d_model", 512)),
            d_kv=int(hf.get("d_kv", 64)),
            d_ff=int(hf.get("d_ff", 2048)),
            num_heads=int(hf.get("num_heads", 8)),
            num_encoder_layers=num_layers,
            num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            dropout_rate=float(hf.get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=hf_feed_forward(hf, source),
            tie_word_embeddings=bool(tied),
            scale_decoder_outputs=hf_scale_decoder_outputs(hf, source),
            decoder_start_token_id=int(hf.get("decoder_start_token_id", 0) or 0),
            pad_token_id=int(hf.get("pad_token_id", 0) or 0),
            eos_token_id=int(eos[0] if isinstance(eos, list) else (1 if eos is None else eos)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5 writes it: it loads with the same feed-forward and output scaling.

        tie_word_embeddings says whether the weights hold no separate lm_head.weight (transformers 5
        ties unless both tensors are present and differ); scale_decoder_outputs is the scaling switch.
        Older transformers read tie_word_embeddings as both switches, so only the two combinations T5
        releases use (tied+scaled, untied+unscaled) load identically there.
        """
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_heads": self.num_heads,
            "num_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": "gelu_new" if self.is_gated else "relu",
            "is_gated_act": self.is_gated,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scales_decoder_outputs,
            "is_encoder_decoder": True,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
        }


def hf_feed_forward(hf: Mapping[str, Any], source: str = "config.json") -> str:
    """Our feed_forward_proj for an HF config, read as transformers 5 does: `feed_forward_proj` gives the
    defaults ("gated-gelu" means gelu_new), explicit `dense_act_fn` / `is_gated_act` keys win."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"{source}: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    gated = hf.get("is_gated_act", len(parts) == 2)
    act = hf.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
    if gated is True and act in _TANH_GELU:
        return "gated-gelu"
    if gated is False and act == "relu":
        return "relu"
    raise CheckpointError(
        f"{source}: feed-forward not supported: feed_forward_proj={proj!r}, dense_act_fn={act!r}, "
        f"is_gated_act={gated!r}; supported are relu (T5 v1.0) and gated-gelu with gelu_new (T5 v1.1, Flan-T5)")


def hf_scale_decoder_outputs(hf: Mapping[str, Any], source: str = "config.json") -> bool:
    """transformers 5's rule: the `scale_decoder_outputs` key when present, else what older versions meant
    by tie_word_embeddings (scaled unless it is false; v1.1/Flan-T5 configs wrote false)."""
    if "scale_decoder_outputs" not in hf:
        return hf.get("tie_word_embeddings", True) is not False
    value = hf["scale_decoder_outputs"]
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: scale_decoder_outputs={value!r}: expected true or false")
    return value


def _t5_v1_0(d_model: int, d_kv: int, d_ff: int, heads: int, layers: int) -> T5Config:
    return T5Config(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads, num_encoder_layers=layers,
                    num_decoder_layers=layers, feed_forward_proj="relu", tie_word_embeddings=True)


def _flan(d_model: int, d_ff: int, heads: int, layers: int, d_kv: int = 64) -> T5Config:
    return T5Config(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads, num_encoder_layers=layers,
                    num_decoder_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


PRESETS: dict[str, T5Config] = {
    "t5-small": _t5_v1_0(512, 64, 2048, 8, 6),
    "t5-base": _t5_v1_0(768, 64, 3072, 12, 12),
    "t5-large": _t5_v1_0(1024, 64, 4096, 16, 24),
    "t5-3b": _t5_v1_0(1024, 128, 16384, 32, 24),
    "flan-t5-small": _flan(512, 1024, 6, 8),
    "flan-t5-base": _flan(768, 2048, 12, 12),
    "flan-t5-large": _flan(1024, 2816, 16, 24),
    "flan-t5-xl": _flan(2048, 5120, 32, 24),
    "flan-t5-xxl": _flan(4096, 10240, 64, 24),
}
# `tiny` is flan-t5-small shrunk (as t5x's tiny.gin includes a real size and shrinks it): real vocabulary,
# real layout, small enough for CPU tests and the demo.
PRESETS["tiny"] = PRESETS["flan-t5-small"].replace(
    d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2)


def preset(name: str, **overrides: Any) -> T5Config:
    """A named preset, optionally with fields replaced (e.g. dtype="bfloat16"). The gin files' spelling
    (`flan_t5_small`) names the same preset as the hub's (`flan-t5-small`).
    Bad names, fields and values are OptionErrors naming the gin binding (`model_preset.dtype=...`).
    """
    key = name.replace("_", "-") if isinstance(name, str) else name
    if key not in PRESETS:
        raise OptionError(f"model_preset.name={name!r}: unknown model preset {name!r}; known: {sorted(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(T5Config)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise OptionError(f"model_preset.{unknown[0]}: not a T5Config field; the fields are {fields}")
    try:
        return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
    except ValueError as e:
        raise OptionError(str(e).replace("T5Config.", "model_preset.", 1)) from None


def resolve_model_config(model: str | T5Config | Mapping[str, Any],
                         overrides: Optional[Mapping[str, Any]] = None) -> T5Config:
    """A preset name ('tiny', 'flan-t5-base', ...), a T5Config or its dict, plus field overrides.

    A bad preset, field or value (dtype, attention, ...) is an OptionError naming train.model or
    train.model_overrides, raised before anything is built."""
    try:
        if isinstance(model, T5Config):
            config = model
        elif isinstance(model, str):
            try:
                config = preset(model)
            except OptionError as e:  # preset names its gin binding (model_preset.name); here it is train.model
                raise OptionError(f"train.model={model!r}: {str(e).split(': ', 1)[-1]}") from None
        elif isinstance(model, Mapping):
            config = T5Config.from_dict(model)
        else:
            raise OptionError(f"train.model: expected a preset name, T5Config or dict, got {type(model).__name__}")
    except (ValueError, TypeError) as e:
        if isinstance(e, OptionError):
            raise
        raise OptionError(f"train.model={model!r}: {e}") from None
    try:
        return config.replace(**dict(overrides)) if overrides else config
    except (ValueError, TypeError) as e:
        raise OptionError(f"train.model_overrides={dict(overrides)!r}: {e}") from None
