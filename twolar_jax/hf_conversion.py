"""HF T5 checkpoint import and export through one name table with per-tensor transforms.

transformers 5 has no Flax T5, so we read and write its files directly (MaxText's `param_mapping`
pattern): `config.json` plus `model.safetensors`, a sharded `model.safetensors.index.json`, or a
`pytorch_model.bin` (that one needs torch). Exported directories load with
`transformers.T5ForConditionalGeneration.from_pretrained`; HF -> ours -> HF is bit-exact.
config.json is read as transformers 5 reads it (T5Config.from_hf_dict: `scale_decoder_outputs`,
`dense_act_fn`, `is_gated_act`, and the keys older versions wrote); tied or untied comes from the
tensors (lm_head_is_tied), since transformers 5 writes tie_word_embeddings=true for every T5.

The table knows only the unrolled layer names (`encoder/layers_<i>/...`): a config with scan_layers
converts through them (`model.scan`), so a scanned model exports the same bytes as an unrolled one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from twolar_jax.errors import CheckpointError, MissingFileError
from twolar_jax.model.config import T5Config
from twolar_jax.model.scan import match_layout
from twolar_jax.resources import SPIECE_MODEL

TensorMap = dict[str, np.ndarray]
log = logging.getLogger(__name__)
# HF keys that may appear beside the ones we read and that carry no extra information.
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED_HF_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


@dataclass(frozen=True)
class Rule:
    """One tensor: our path, the HF key, and how to turn one into the other."""

    ours: str
    hf: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: tuple[int, ...]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _attention_rules(ours: str, hf: str, c: T5Config) -> list[Rule]:
    d, h, k = c.d_model, c.num_heads, c.d_kv
    rules = []
    for name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
        rules.append(Rule(f"{ours}/{name}/kernel", f"{hf}.{hf_name}.weight",
                          to_ours=lambda x, d=d, h=h, k=k: np.ascontiguousarray(x.T.reshape(d, h, k)),
                          to_hf=lambda x, d=d, h=h, k=k: np.ascontiguousarray(x.reshape(d, h * k).T),
                          hf_shape=(h * k, d)))
    rules.append(Rule(f"{ours}/out/kernel", f"{hf}.o.weight",
                      to_ours=lambda x, d=d, h=h, k=k: np.ascontiguousarray(x.T.reshape(h, k, d)),
                      to_hf=lambda x, d=d, h=h, k=k: np.ascontiguousarray(x.reshape(h * k, d).T),
                      hf_shape=(d, h * k)))
    return rules


def _mlp_rules(ours: str, hf: str, c: T5Config) -> list[Rule]:
    names = ("wi_0", "wi_1") if c.is_gated else ("wi",)
    rules = [Rule(f"{ours}/{n}/kernel", f"{hf}.{n}.weight", _transpose, _transpose, (c.d_ff, c.d_model)) for n in names]
    rules.append(Rule(f"{ours}/wo/kernel", f"{hf}.wo.weight", _transpose, _transpose, (c.d_model, c.d_ff)))
    return rules


def _norm(ours: str, hf: str, c: T5Config) -> Rule:
    return Rule(f"{ours}/scale", hf, _identity, _identity, (c.d_model,))


def name_table(c: T5Config) -> list[Rule]:
    """Every parameter of our (unrolled) tree and its HF counterpart, in a stable order."""
    rules = [Rule("token_embedder/embedding", "shared.weight", _identity, _identity, (c.vocab_size, c.d_model))]
    for stack, bidir in (("encoder", True), ("decoder", False)):
        rules.append(Rule(f"{stack}/relpos_bias/rel_embedding",
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          _transpose, _transpose, (c.relative_attention_num_buckets, c.num_heads)))
    for i in range(c.num_encoder_layers):
        ours, hf = f"encoder/layers_{i}", f"encoder.block.{i}"
        rules += _attention_rules(f"{ours}/attention", f"{hf}.layer.0.SelfAttention", c)
        rules.append(_norm(f"{ours}/pre_attention_layer_norm", f"{hf}.layer.0.layer_norm.weight", c))
        rules += _mlp_rules(f"{ours}/mlp", f"{hf}.layer.1.DenseReluDense", c)
        rules.append(_norm(f"{ours}/pre_mlp_layer_norm", f"{hf}.layer.1.layer_norm.weight", c))
    rules.append(_norm("encoder/encoder_norm", "encoder.final_layer_norm.weight", c))
    for i in range(c.num_decoder_layers):
        ours, hf = f"decoder/layers_{i}", f"decoder.block.{i}"
        rules += _attention_rules(f"{ours}/self_attention", f"{hf}.layer.0.SelfAttention", c)
        rules.append(_norm(f"{ours}/pre_self_attention_layer_norm", f"{hf}.layer.0.layer_norm.weight", c))
        rules += _attention_rules(f"{ours}/encoder_decoder_attention", f"{hf}.layer.1.EncDecAttention", c)
        rules.append(_norm(f"{ours}/pre_cross_attention_layer_norm", f"{hf}.layer.1.layer_norm.weight", c))
        rules += _mlp_rules(f"{ours}/mlp", f"{hf}.layer.2.DenseReluDense", c)
        rules.append(_norm(f"{ours}/pre_mlp_layer_norm", f"{hf}.layer.2.layer_norm.weight", c))
    rules.append(_norm("decoder/decoder_norm", "decoder.final_layer_norm.weight", c))
    if not c.tie_word_embeddings:
        rules.append(Rule("decoder/logits_dense/kernel", "lm_head.weight", _transpose, _transpose,
                          (c.vocab_size, c.d_model)))
    return rules


# --- reading ------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> TensorMap:
    """All tensors of one .safetensors file; a truncated or corrupt file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(str(path))
        except TypeError:
            # numpy has no bfloat16: read through ml_dtypes via the flax/jax loader.
            from safetensors.flax import load_file as load_flax
            return {k: np.asarray(v) for k, v in load_flax(str(path)).items()}
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError, MemoryError) as err:
        if isinstance(err, (FileNotFoundError, CheckpointError)):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); is it truncated or "
                              "corrupt? re-download or re-export it") from None


def _read_index(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file), checked."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{index}: not UTF-8 text") from None
    except ValueError as err:  # e.g. a number of more than 4300 digits
        raise CheckpointError(f"{index}: invalid JSON ({str(err).split(';')[0]})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: weight_map: missing field (expected {{tensor name: shard file}})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file name")
    return weight_map


def _read_torch_bin(path: Path) -> TensorMap:
    try:
        import torch
    except ImportError as err:  # torch is optional: a test-only reference here
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch; convert it to safetensors "
                              "or `pip install torch==2.13.0`") from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_hf_tensors(path: str | os.PathLike) -> TensorMap:
    """All tensors of an HF checkpoint dir: single or sharded safetensors, or pytorch_model.bin."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    torch_bin = path / "pytorch_model.bin"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        weight_map = _read_index(index)
        tensors: TensorMap = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is listed but missing")
            tensors.update(_read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed in weight_map but absent from the shards: {missing[:5]}")
        return tensors
    if torch_bin.exists():
        return _read_torch_bin(torch_bin)
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_hf_config_dict(path: str | os.PathLike) -> dict:
    """config.json of an HF checkpoint dir as a dict."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"{config_path}: missing (an HF T5 checkpoint dir needs config.json)")
    try:
        values = json.loads(config_path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{config_path}: not UTF-8 text (byte offset {err.start})") from None
    except ValueError as err:  # e.g. a number of more than 4300 digits
        raise CheckpointError(f"{config_path}: invalid JSON ({str(err).split(';')[0]})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{config_path}: is a directory, expected a JSON file") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(values).__name__}")
    return values


def read_hf_config(path: str | os.PathLike, *, tied: bool | None = None) -> T5Config:
    """The T5Config of an HF dir; `tied` as the weights say (see lm_head_is_tied), else config.json's word."""
    return _config_from_hf_dict(read_hf_config_dict(path), Path(path) / "config.json", tied)


def _config_from_hf_dict(values: dict, config_path: Path, tied: bool | None) -> T5Config:
    """T5Config.from_hf_dict, where a field of the wrong type or out of range is a CheckpointError naming the file."""
    try:
        return T5Config.from_hf_dict(values, source=str(config_path), tied=tied)
    except (ValueError, TypeError, OverflowError, AttributeError, IndexError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        message = str(err)  # e.g. null for a size, a number for an architecture
        raise CheckpointError(message if message.startswith(str(config_path)) else f"{config_path}: {message}") from None


def lm_head_is_tied(tensors: Mapping[str, np.ndarray]) -> bool:
    """transformers 5's rule: the output projection is shared.weight unless the checkpoint holds an
    lm_head.weight that differs from it (its configs say tie_word_embeddings=true either way)."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    if head is None or shared is None:
        return head is None
    return np.shape(head) == np.shape(shared) and np.array_equal(np.asarray(head), np.asarray(shared))


def hf_to_params(tensors: Mapping[str, np.ndarray], config: T5Config, *, source: str = "checkpoint") -> dict:
    """Map HF tensors onto our tree; any missing, extra or misshapen tensor is an error that names it.

    The tree is scanned (layers stacked) when config.scan_layers is set, unrolled otherwise."""
    flat: dict[str, np.ndarray] = {}
    used = set()
    for rule in name_table(config):
        if rule.hf not in tensors:
            raise CheckpointError(f"{source}: missing tensor {rule.hf} (expected shape {rule.hf_shape}, "
                                  f"for {rule.ours})")
        value = np.asarray(tensors[rule.hf])
        if tuple(value.shape) != rule.hf_shape:
            raise CheckpointError(
                f"{source}: tensor {rule.hf} has shape {tuple(value.shape)}, expected {rule.hf_shape} "
                "(does config.json agree with the weights?)")
        flat[rule.ours] = rule.to_ours(value.astype(np.float32))
        used.add(rule.hf)
    for key in tensors:
        if key in used or key in _IGNORED_HF_KEYS:
            continue
        if key in _TIED_ALIASES or (key == "lm_head.weight" and config.tie_word_embeddings):
            if not np.array_equal(np.asarray(tensors[key]), np.asarray(tensors["shared.weight"])):
                what = "untied input embeddings are not supported" if key in _TIED_ALIASES else \
                    "the config ties the output projection to the embedding"
                raise CheckpointError(f"{source}: tensor {key} differs from shared.weight ({what})")
            continue
        raise CheckpointError(f"{source}: unexpected tensor {key} (shape {tuple(np.shape(tensors[key]))}) "
                              "that the T5 config does not account for")
    return match_layout(traverse_util.unflatten_dict(flat, sep="/"), config)


def params_to_hf(params: Any, config: T5Config, dtype: str = "float32") -> TensorMap:
    """HF tensors of a scanned or unrolled tree (its form is read from the tree, not the config)."""
    params = match_layout(params, config.replace(scan_layers=False))
    flat = traverse_util.flatten_dict(params, sep="/")
    out: TensorMap = {}
    for rule in name_table(config):
        if rule.ours not in flat:
            raise CheckpointError(f"params: missing {rule.ours}")
        value = rule.to_hf(np.asarray(flat[rule.ours], dtype=np.float32))
        if tuple(value.shape) != rule.hf_shape:
            raise CheckpointError(f"params: {rule.ours} gives shape {value.shape}, expected {rule.hf_shape}")
        out[rule.hf] = value if dtype == "float32" else value.astype(_np_dtype(dtype))
    extra = sorted(set(flat) - {r.ours for r in name_table(config)})
    if extra:
        raise CheckpointError(f"params: unexpected entries {extra[:5]}")
    return out


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def load_hf_checkpoint(path: str | os.PathLike, *, scan_layers: bool = False) -> tuple[T5Config, dict]:
    """(config, fp32 params) from a local HF T5 directory, read as transformers 5 loads it: the feed-forward
    and output scaling from config.json (T5Config.from_hf_dict), tied or not from the tensors
    (lm_head_is_tied). scan_layers=True gives a scanned config and tree (config.json has no such field)."""
    tensors = read_hf_tensors(path)
    values = read_hf_config_dict(path)
    tied = lm_head_is_tied(tensors)
    if tied and values.get("tie_word_embeddings") is False:
        log.warning("%s: config.json says tie_word_embeddings=false but there is no lm_head.weight distinct from "
                    "shared.weight: the output projection is shared.weight, as transformers 5 loads it", path)
    config = _config_from_hf_dict(values, Path(path) / "config.json", tied)
    config = config.replace(scan_layers=scan_layers)
    return config, hf_to_params(tensors, config, source=str(path))


def save_hf_checkpoint(path: str | os.PathLike, config: T5Config, params: Any, *, dtype: str = "float32",
                       tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.safetensors (atomically, via a temp dir) and the spiece.model."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = params_to_hf(params, config, dtype)
    if dtype == "bfloat16":
        from safetensors.flax import save_file as save_flax
        import jax.numpy as jnp
        save_flax({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    shutil.copyfile(tokenizer_path or SPIECE_MODEL, tmp / "spiece.model")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
