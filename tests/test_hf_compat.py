"""HF checkpoints as transformers writes them (5 and older): same numbers as torch, and exports it loads.

transformers 5 writes `tie_word_embeddings: true` for every T5 and carries the output scaling in
`scale_decoder_outputs`; it ties lm_head to shared unless both tensors are present and differ. Older
versions wrote `tie_word_embeddings: false` for v1.1/Flan-T5 and meant both switches by it. Every
checkpoint here is written by the installed transformers itself (or by hand from v4's documented keys),
then our encoder states, first-step logits and Reranker scores are compared with torch on the same files.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from twolar_jax.errors import CheckpointError  # noqa: E402
from twolar_jax.hf_conversion import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from twolar_jax.model.config import T5Config, preset  # noqa: E402
from twolar_jax.model.network import T5, init_params  # noqa: E402
from twolar_jax.reranker import Reranker  # noqa: E402
from twolar_jax.scoring import SCORE_HEADS, default_score_tokens  # noqa: E402

SHAPE = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4)
QUERIES = ["who won the turing award", "what is a lobster roll", "how long is the flight to new york"]
DOCS = ["Geoffrey Hinton, Yann LeCun and Yoshua Bengio won the 2018 Turing Award.",
        "A lobster roll is a sandwich from New England.",
        "About eight hours, depending on the winds over the Atlantic and the route taken on the day."]
# name -> (how transformers built it, tied, scaled, gated) as transformers 5 itself loads it
KINDS = {
    "v1_0": ("relu, tied, scaled (T5 v1.0)", True, True, False),
    "flan_fresh": ("gated-gelu created with tie_word_embeddings=False: transformers 5 ties it, unscaled", True, False, True),
    "flan_untied": ("gated-gelu with its own lm_head (Flan-T5 as released)", False, False, True),
    "flan_v4": ("flan_untied's tensors, config.json as transformers 4 wrote it", False, False, True),
    "v1_0_v4": ("v1_0's tensors, config.json as transformers 4 wrote it", True, True, False),
    "flan_resaved": ("flan_v4 loaded by transformers 5 and saved again", False, False, True),
}
# The keys transformers 4.x wrote for T5 (no scale_decoder_outputs, dense_act_fn or is_gated_act).
V4_KEYS = ("architectures", "d_ff", "d_kv", "d_model", "decoder_start_token_id", "dropout_rate", "eos_token_id",
           "feed_forward_proj", "initializer_factor", "is_encoder_decoder", "layer_norm_epsilon", "model_type",
           "num_decoder_layers", "num_heads", "num_layers", "pad_token_id", "relative_attention_max_distance",
           "relative_attention_num_buckets", "vocab_size")


def _new_hf_model(feed_forward_proj: str, tie: bool, seed: int):
    torch.manual_seed(seed)
    config = transformers.T5Config(**SHAPE, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _write_v4(src, dst, *, tie: bool):
    """src's tensors with a config.json holding only the keys transformers 4 wrote."""
    dst.mkdir()
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    v4 = {k: hf[k] for k in V4_KEYS if k in hf}
    v4.update(tie_word_embeddings=tie, transformers_version="4.46.3", torch_dtype="float32")
    (dst / "config.json").write_text(json.dumps(v4, indent=2))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory, each written by transformers (save_pretrained) or from its v4 keys by hand."""
    root = tmp_path_factory.mktemp("hf_compat")
    out = {}
    _new_hf_model("relu", True, 1).save_pretrained(root / "v1_0")
    _new_hf_model("gated-gelu", False, 2).save_pretrained(root / "flan_fresh")
    untied = _new_hf_model("gated-gelu", False, 3)
    untied.lm_head.weight = torch.nn.Parameter(torch.randn_like(untied.shared.weight))
    untied.save_pretrained(root / "flan_untied")
    for name in ("v1_0", "flan_fresh", "flan_untied"):
        out[name] = root / name
    out["flan_v4"] = _write_v4(out["flan_untied"], root / "flan_v4", tie=False)
    out["v1_0_v4"] = _write_v4(out["v1_0"], root / "v1_0_v4", tie=True)
    transformers.T5ForConditionalGeneration.from_pretrained(str(out["flan_v4"])).save_pretrained(root / "flan_resaved")
    out["flan_resaved"] = root / "flan_resaved"
    return out


def _torch_model(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def _padded(encoded):
    batch = np.zeros((len(encoded), max(map(len, encoded))), np.int32)
    for i, ids in enumerate(encoded):
        batch[i, :len(ids)] = ids
    return batch


def _torch_forward(model, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(tokens > 0, dtype=torch.long),
                    decoder_input_ids=torch.zeros((tokens.shape[0], 1), dtype=torch.long))
    return out.encoder_last_hidden_state.numpy(), out.logits[:, 0, :].numpy()


def _torch_scores(logits, head):
    t = default_score_tokens()
    if head == "extra_id":
        return logits[:, t.extra_id]
    diff = logits[:, t.true_id].astype(np.float64) - logits[:, t.false_id]
    return diff if head == "difference" else 1.0 / (1.0 + np.exp(-diff))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_hf_compat_config_is_read_as_transformers_reads_it(checkpoints, name):
    _, tied, scaled, gated = KINDS[name]
    config, params = load_hf_checkpoint(checkpoints[name])
    hf = _torch_model(checkpoints[name])
    assert hf.config.scale_decoder_outputs is scaled
    assert (hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()) is tied
    assert (config.tie_word_embeddings, config.scales_decoder_outputs, config.is_gated) == (tied, scaled, gated)
    assert ("logits_dense" in params["decoder"]) is not tied


@pytest.mark.parametrize("name", sorted(KINDS))
def test_hf_compat_encoder_logits_and_scores_match_torch(checkpoints, name):
    path = checkpoints[name]
    config, params = load_hf_checkpoint(path)
    hf = _torch_model(path)
    rr = Reranker.from_pretrained(path, batch_size=4, max_length=64)
    tokens = _padded(rr.encode_pairs(QUERIES, DOCS))
    mask = tokens > 0
    ref_enc, ref_logits = _torch_forward(hf, tokens)
    model = T5(config)
    ours_enc = np.asarray(model.apply({"params": params}, tokens, method=T5.encode))
    ours_logits = np.asarray(model.apply({"params": params}, tokens, method=T5.first_step_logits))
    np.testing.assert_allclose(ours_enc[mask], ref_enc[mask], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=1e-4, rtol=0)
    for head in SCORE_HEADS:
        scores = Reranker.from_pretrained(path, score_head=head, batch_size=4, max_length=64).score_pairs(QUERIES, DOCS)
        np.testing.assert_allclose(scores, _torch_scores(ref_logits, head), atol=1e-4, rtol=0, err_msg=head)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_hf_compat_our_export_loads_identically_in_transformers(checkpoints, name, tmp_path):
    """load -> save_hf_checkpoint -> transformers.from_pretrained: the same logits, and we read it back equal."""
    config, params = load_hf_checkpoint(checkpoints[name])
    exported = save_hf_checkpoint(tmp_path / "export", config, params)
    tokens = _padded(Reranker.from_pretrained(exported, max_length=64).encode_pairs(QUERIES, DOCS))
    _, before = _torch_forward(_torch_model(checkpoints[name]), tokens)
    _, after = _torch_forward(_torch_model(exported), tokens)
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    again, _ = load_hf_checkpoint(exported)
    assert again == config
    tensors = load_file(str(exported / "model.safetensors"))
    assert ("lm_head.weight" in tensors) is not config.tie_word_embeddings


@pytest.mark.parametrize("tied,scaled", [(True, True), (True, False), (False, False), (False, True)])
def test_hf_compat_every_tie_and_scale_combination_exports(tied, scaled, tmp_path):
    """Our four output layouts (T5 releases use two) load in transformers 5 with the same logits."""
    config = preset("tiny").replace(num_decoder_layers=3, tie_word_embeddings=tied, scale_decoder_outputs=scaled)
    params = init_params(config, 5)
    path = save_hf_checkpoint(tmp_path / "ckpt", config, params)
    hf = _torch_model(path)
    assert hf.config.scale_decoder_outputs is scaled
    tokens = _padded(Reranker.from_params(config, params, max_length=64).encode_pairs(QUERIES, DOCS))
    _, ref = _torch_forward(hf, tokens)
    ours = np.asarray(T5(config).apply({"params": params}, tokens, method=T5.first_step_logits))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert load_hf_checkpoint(path)[0] == config


CONFIG_CASES = [
    {},
    {"tie_word_embeddings": False},
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": True, "scale_decoder_outputs": False},
    {"tie_word_embeddings": False, "scale_decoder_outputs": True},
    {"feed_forward_proj": "gated-gelu"},
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True},
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_pytorch_tanh"},
]


@pytest.mark.parametrize("values", CONFIG_CASES, ids=[json.dumps(c) for c in CONFIG_CASES])
def test_hf_compat_config_keys_follow_transformers(values):
    ours = T5Config.from_hf_dict({"model_type": "t5", **values})
    theirs = transformers.T5Config.from_dict(dict(values))
    assert ours.scales_decoder_outputs is theirs.scale_decoder_outputs
    assert ours.is_gated is theirs.is_gated_act
    assert (ours.is_gated and theirs.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh")) or \
        (not ours.is_gated and theirs.dense_act_fn == "relu")


@pytest.mark.parametrize("values,named", [
    ({"feed_forward_proj": "gated-silu"}, "dense_act_fn='silu'"),
    ({"feed_forward_proj": "gelu"}, "dense_act_fn='gelu', is_gated_act=False"),
    ({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}, "dense_act_fn='gelu'"),
    ({"feed_forward_proj": "relu", "is_gated_act": True}, "is_gated_act=True"),
    ({"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj='gated-gelu-x'"),
    ({"scale_decoder_outputs": "yes"}, "scale_decoder_outputs='yes'"),
])
def test_hf_compat_unsupported_keys_are_refused_by_name(values, named):
    with pytest.raises(CheckpointError, match=f"my/config.json: .*{named}"):
        T5Config.from_hf_dict({"model_type": "t5", **values}, source="my/config.json")


def test_hf_compat_untied_input_embeddings_are_refused(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    out = tmp_path / "bad"
    out.mkdir()
    tensors = load_file(str(checkpoints["flan_untied"] / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copyfile(checkpoints["flan_untied"] / "config.json", out / "config.json")
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight differs from shared.weight"):
        load_hf_checkpoint(out)
