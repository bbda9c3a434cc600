"""The attention paths (rows, einsum, dot_product) compute the same function; "auto" picks one per backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twolar_jax.model import network
from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5, resolve_attention

PATHS = ("rows", "einsum", "dot_product")
# Small and random, fp32, both feed-forward kinds exercised elsewhere; gated here with untied logits.
CONFIG = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  dropout_rate=0.0)
TOL = dict(rtol=1e-5, atol=1e-5)


def _padded_batch() -> np.ndarray:
    """Rows of 7, 4 and 1 real tokens, and one fully padded row (a masked passage)."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((4, 7), np.int32)
    for row, real in enumerate([7, 4, 1, 0]):
        tokens[row, :real] = rng.integers(2, CONFIG.vocab_size, real)
    return tokens


@pytest.fixture(scope="module")
def params():
    return network.init_params(CONFIG, jax.random.PRNGKey(5))


def _outputs(kind: str, params) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    config = CONFIG.replace(attention=kind)
    model = T5(config)
    tokens = _padded_batch()
    decoder_tokens = np.array([[0, 5, 9, 3]] * tokens.shape[0], np.int32)

    def loss(p):  # a scalar touching encoder, causal decoder self-attention and cross-attention
        logits = model.apply({"params": p}, tokens, decoder_tokens)
        return jnp.sum(jax.nn.log_softmax(logits)[..., :13] * jnp.arange(13.0))

    @jax.jit
    def run(p):
        encoded = model.apply({"params": p}, tokens, method=T5.encode)
        logits = model.apply({"params": p}, tokens, method=T5.first_step_logits)
        forced = model.apply({"params": p}, tokens, decoder_tokens)
        return encoded, logits, jax.grad(loss)(p), forced

    return jax.tree.map(np.asarray, run(params))


@pytest.fixture(scope="module")
def results(params):
    return {kind: _outputs(kind, params) for kind in PATHS}


@pytest.mark.parametrize("kind", ["rows", "dot_product"])
def test_attention_paths_same_encoder_and_first_step_logits(results, kind):
    enc, logits, _, forced = results[kind]
    ref_enc, ref_logits, _, ref_forced = results["einsum"]
    assert np.all(np.isfinite(enc)) and np.all(np.isfinite(logits)), "the fully padded row must stay finite"
    np.testing.assert_allclose(enc, ref_enc, **TOL)
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    np.testing.assert_allclose(forced, ref_forced, **TOL)


@pytest.mark.parametrize("kind", ["rows", "dot_product"])
def test_attention_paths_same_gradients(results, kind):
    grads, ref = results[kind][2], results["einsum"][2]
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat):
        # 1e-5 of the leaf's own scale: these gradients reach ~100, where fp32's spacing is 7.6e-6, so an
        # element that cancels to ~0.2 keeps the rounding of its ~100-sized terms (1.2e-5 seen on an AVX2 host).
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=TOL["rtol"], atol=TOL["atol"] * scale, err_msg=jax.tree_util.keystr(path))
    relpos = ref["encoder"]["relpos_bias"]["rel_embedding"]
    assert np.abs(relpos).max() > 0, "the relative-position bias must receive a gradient"


@pytest.mark.parametrize("kind", PATHS)
def test_attention_paths_incremental_decoding_matches_teacher_forcing(params, kind):
    """Cached one-token steps (generation's decode=True) give the teacher-forced logits on every path."""
    config = CONFIG.replace(attention=kind)
    model = T5(config)
    tokens = _padded_batch()[:3]
    dec = np.array([[0, 5, 9, 3]] * 3, np.int32)

    @jax.jit
    def run(p):
        forced = model.apply({"params": p}, tokens, dec)
        encoded = model.apply({"params": p}, tokens, method=T5.encode)
        _, variables = model.apply({"params": p}, encoded, tokens, jnp.zeros_like(dec), decode=True,
                                   method=T5.decode, mutable=["cache"])
        steps = []
        for t in range(dec.shape[1]):
            step, variables = model.apply({"params": p, "cache": variables["cache"]}, encoded, tokens,
                                          dec[:, t:t + 1], decode=True, method=T5.decode, mutable=["cache"])
            steps.append(step[:, 0])
        return forced, jnp.stack(steps, axis=1)

    forced, incremental = run(params)
    np.testing.assert_allclose(incremental, forced, **TOL)


def test_attention_paths_dropout_falls_back_to_einsum(params):
    """dot_product_attention has no weight dropout: with dropout on, the dot_product config computes
    exactly what the einsum config does (same rng, same masks)."""
    tokens = _padded_batch()
    out = {}
    for kind in ("einsum", "dot_product"):
        model = T5(CONFIG.replace(attention=kind, dropout_rate=0.3))
        encode = jax.jit(lambda p, m=model: m.apply({"params": p}, tokens, enable_dropout=True,
                                                     rngs={"dropout": jax.random.PRNGKey(3)}, method=T5.encode))
        out[kind] = np.asarray(encode(params))
    np.testing.assert_array_equal(out["dot_product"], out["einsum"])


def test_attention_paths_auto_resolution_per_backend():
    auto = CONFIG.replace(attention="auto")
    assert resolve_attention(auto, "cpu") == "rows"
    assert resolve_attention(auto, "gpu") == "dot_product"
    assert resolve_attention(auto, "tpu") == "einsum"
    assert resolve_attention(auto) == resolve_attention(auto, jax.default_backend())
    for kind in PATHS:  # an explicit choice is kept on every backend
        assert {resolve_attention(CONFIG.replace(attention=kind), b) for b in ("cpu", "gpu", "tpu")} == {kind}


def test_attention_paths_unknown_value_is_refused():
    with pytest.raises(ValueError, match=r"T5Config\.attention='flash': expected one of \('auto', 'rows', "
                                         r"'einsum', 'dot_product'\)"):
        CONFIG.replace(attention="flash")
    with pytest.raises(TypeError):
        T5Config(attention_loop="rows")  # the field this one replaced


def test_attention_paths_legacy_attention_loop_in_model_config():
    """model_config.json files written before the rename still load."""
    values = CONFIG.to_dict()
    del values["attention"]
    assert T5Config.from_dict({**values, "attention_loop": "batched"}).attention == "einsum"
    assert T5Config.from_dict({**values, "attention_loop": "rows"}).attention == "rows"
    assert T5Config.from_dict(CONFIG.replace(attention="dot_product").to_dict()).attention == "dot_product"


def test_attention_paths_dot_product_kernel_per_backend_and_dtype():
    """cuDNN's fused kernel where it exists (NVIDIA GPU, bf16/fp16, head size a multiple of 8 up to 128,
    even lengths, more than one query position); jax's XLA path everywhere else."""
    kernel = network.dot_product_implementation
    assert kernel(jnp.bfloat16, 512, 512, 64, "gpu") == "cudnn"
    assert kernel(jnp.float16, 384, 512, 128, "cuda") == "cudnn"
    assert kernel(jnp.float32, 512, 512, 64, "gpu") == "xla"  # no fp32 flash kernel
    assert kernel(jnp.bfloat16, 512, 512, 64, "cpu") == "xla"
    assert kernel(jnp.bfloat16, 512, 512, 64, "tpu") == "xla"
    assert kernel(jnp.bfloat16, 512, 512, 12, "gpu") == "xla"  # head size not a multiple of 8
    assert kernel(jnp.bfloat16, 512, 512, 256, "gpu") == "xla"  # head size over 128
    assert kernel(jnp.bfloat16, 1, 512, 64, "gpu") == "xla"  # the one-position decoder step
    assert kernel(jnp.bfloat16, 7, 512, 64, "gpu") == "xla"  # odd lengths: no bias gradient in cuDNN
    assert kernel(jnp.bfloat16, 512, 7, 64, "gpu") == "xla"
    assert kernel(jnp.bfloat16, 512, 512, 64) == kernel(jnp.bfloat16, 512, 512, 64, jax.default_backend())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_attention_paths_cudnn_kernel_matches_einsum_in_bf16_on_gpu():
    """On a GPU in bf16 the dot_product path runs cuDNN's flash kernel (bias in bf16, fp32 softmax inside);
    it must agree with the einsum path to bf16 rounding, forward and gradient. A fully padded row (a
    masked passage, never scored) attends unmasked there: finite, and left out of the comparison."""
    config = CONFIG.replace(d_model=128, d_kv=64, num_heads=2, d_ff=256, dtype="bfloat16")
    params = network.init_params(config, jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    tokens = np.zeros((4, 96), np.int32)
    for row, real in enumerate([96, 50, 7, 0]):
        tokens[row, :real] = rng.integers(2, config.vocab_size, real)

    def first_step(kind):
        model = T5(config.replace(attention=kind))

        def loss(p):
            logits = model.apply({"params": p}, tokens, method=T5.first_step_logits)
            return jnp.sum(logits[:3, :3].astype(jnp.float32) * jnp.arange(3.0)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        text = jax.jit(lambda p: model.apply({"params": p}, tokens, method=T5.encode)).lower(params).as_text()
        return np.asarray(logits, np.float32), jax.tree.map(lambda g: np.asarray(g, np.float32), grads), text

    fused_logits, fused_grads, fused_text = first_step("dot_product")
    ref_logits, ref_grads, _ = first_step("einsum")
    assert "cudnn" in fused_text.lower()  # the fused kernel was used, not the XLA fallback
    assert np.isfinite(fused_logits).all()
    scale = np.abs(ref_logits[:3]).max()
    np.testing.assert_allclose(fused_logits[:3], ref_logits[:3], atol=3e-2 * scale)
    for fused, ref in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(ref_grads)):
        assert np.isfinite(fused).all()
        np.testing.assert_allclose(fused, ref, atol=5e-2 * max(np.abs(ref).max(), 1e-6))
