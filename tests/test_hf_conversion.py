"""HF checkpoint import/export: bit-exact round trips and the errors a bad checkpoint gets."""
import json

import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from twolar_jax.hf_conversion import (CheckpointError, load_hf_checkpoint, params_to_hf, read_hf_tensors,
                                      save_hf_checkpoint)
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params

GATED = preset("tiny")
RELU_TIED = preset("tiny").replace(feed_forward_proj="relu", tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["gated", "relu"])
def checkpoint(request, tmp_path_factory):
    config = GATED if request.param == "gated" else RELU_TIED
    params = init_params(config, 3)
    path = save_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", config, params)
    return config, params, path


def test_hf_ours_hf_round_trip_is_bit_exact(checkpoint, tmp_path):
    config, _, path = checkpoint
    original = load_file(str(path / "model.safetensors"))
    loaded_config, params = load_hf_checkpoint(path)
    assert loaded_config == config
    again = save_hf_checkpoint(tmp_path / "again", loaded_config, params)
    rewritten = load_file(str(again / "model.safetensors"))
    assert sorted(original) == sorted(rewritten)
    for key in original:
        assert original[key].dtype == rewritten[key].dtype
        assert original[key].tobytes() == rewritten[key].tobytes(), key


def test_ours_hf_ours_round_trip_is_bit_exact(checkpoint):
    config, params, path = checkpoint
    _, loaded = load_hf_checkpoint(path)
    flat_a = traverse_util.flatten_dict(params, sep="/")
    flat_b = traverse_util.flatten_dict(loaded, sep="/")
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), flat_b[key])


def test_sharded_safetensors_and_bfloat16(checkpoint, tmp_path):
    config, params, path = checkpoint
    tensors = load_file(str(path / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(out / name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (out / "config.json").write_text((path / "config.json").read_text())
    _, loaded = load_hf_checkpoint(out)
    for key, value in traverse_util.flatten_dict(params, sep="/").items():
        np.testing.assert_array_equal(np.asarray(value), traverse_util.flatten_dict(loaded, sep="/")[key])
    bf16 = save_hf_checkpoint(tmp_path / "bf16", config, params, dtype="bfloat16")
    _, from_bf16 = load_hf_checkpoint(bf16)
    emb = np.asarray(params["token_embedder"]["embedding"])
    np.testing.assert_allclose(from_bf16["token_embedder"]["embedding"], emb, rtol=1e-2, atol=1e-2)


def test_pytorch_bin_is_read(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    config, params, path = checkpoint
    tensors = load_file(str(path / "model.safetensors"))
    out = tmp_path / "bin"
    out.mkdir()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, str(out / "pytorch_model.bin"))
    (out / "config.json").write_text((path / "config.json").read_text())
    assert read_hf_tensors(out).keys() == tensors.keys()
    load_hf_checkpoint(out)


def _broken_copy(path, tmp_path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    out = tmp_path / "broken"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((path / "config.json").read_text())
    return out


def test_missing_tensor_is_named(checkpoint, tmp_path):
    _, _, path = checkpoint
    out = _broken_copy(path, tmp_path, lambda t: t.pop("encoder.block.1.layer.0.SelfAttention.k.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight "
                                              r"\(expected shape \(64, 64\)"):
        load_hf_checkpoint(out)


def test_extra_tensor_is_named(checkpoint, tmp_path):
    _, _, path = checkpoint
    out = _broken_copy(path, tmp_path, lambda t: t.update({"encoder.block.9.extra.weight": np.zeros((3, 4), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor encoder\.block\.9\.extra\.weight \(shape \(3, 4\)\)"):
        load_hf_checkpoint(out)


def test_misshapen_tensor_names_both_shapes(checkpoint, tmp_path):
    _, _, path = checkpoint
    key = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
    out = _broken_copy(path, tmp_path, lambda t: t.update({key: np.zeros((64, 100), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(64, 100\), expected \(64, 128\)"):
        load_hf_checkpoint(out)


def test_config_that_disagrees_with_weights(checkpoint, tmp_path):
    _, _, path = checkpoint
    out = _broken_copy(path, tmp_path, lambda t: None)
    hf = json.loads((path / "config.json").read_text())
    hf["d_ff"] = 256
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"expected \(256, 64\).*config\.json agree"):
        load_hf_checkpoint(out)


def test_unknown_architecture(checkpoint, tmp_path):
    _, _, path = checkpoint
    out = _broken_copy(path, tmp_path, lambda t: None)
    hf = json.loads((path / "config.json").read_text())
    hf.update(model_type="bart", architectures=["BartForConditionalGeneration"])
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture \(model_type='bart'"):
        load_hf_checkpoint(out)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GATED.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_params_to_hf_rejects_a_wrong_tree():
    params = init_params(GATED, 0)
    params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] = np.zeros((64, 99), np.float32)
    with pytest.raises(CheckpointError, match="encoder/layers_0/mlp/wi_0/kernel gives shape"):
        params_to_hf(params, GATED)
