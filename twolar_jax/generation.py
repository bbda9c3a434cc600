"""Greedy and top-k sampled decoding with the decoder's key/value cache (docT5query and LiT5 need it).

One jit-compiled `lax.fori_loop` per (batch, input length, output length): the encoder runs once, then
each step feeds one token through the cached decoder. Sequences that emitted EOS are padded with 0.
Encoder tokens [B, n, L] are Fusion-in-Decoder input: each of the n passages is encoded alone and the
decoder cross-attends to all n x L states at once (LiT5).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "top_k", "sample"))
def _generate(params: Any, encoder_input_tokens: jax.Array, rng: jax.Array, temperature: jax.Array, *,
              config: T5Config, max_decode_length: int, top_k: int, sample: bool) -> jax.Array:
    model = T5(config)
    encoded, encoder_input_tokens = fused_encode(model, params, encoder_input_tokens)
    batch = encoder_input_tokens.shape[0]
    full = jnp.zeros((batch, max_decode_length), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, encoder_input_tokens, full, decode=True,
                               method=T5.decode, mutable=["cache"])
    cache = variables["cache"]

    def step(t, state):
        cache, token, done, out, rng = state
        logits, new_vars = model.apply({"params": params, "cache": cache}, encoded, encoder_input_tokens,
                                       token[:, None], decode=True, method=T5.decode, mutable=["cache"])
        logits = logits[:, 0, :]
        if sample:
            rng, key = jax.random.split(rng)
            logits = logits / temperature
            if top_k > 0:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            next_token = jax.random.categorical(key, logits).astype(jnp.int32)
        else:
            next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, 0, next_token)
        out = out.at[:, t].set(next_token)
        done = done | (next_token == config.eos_token_id)
        return new_vars["cache"], next_token, done, out, rng

    start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
    init = (cache, start, jnp.zeros((batch,), bool), full, rng)
    return jax.lax.fori_loop(0, max_decode_length, step, init)[3]


def fused_encode(model: T5, params: Any, tokens: jax.Array, *,
                 enable_dropout: bool = False, rngs: Any = None) -> tuple[jax.Array, jax.Array]:
    """(encoder states, the tokens they stand for): [B, L] as T5 encodes it; [B, n, L] encoded passage by
    passage and joined to [B, n*L] (Fusion-in-Decoder), so padding rows and tokens stay masked."""
    if tokens.ndim == 2:
        return model.apply({"params": params}, tokens, enable_dropout=enable_dropout, method=T5.encode,
                           rngs=rngs), tokens
    b, n, length = tokens.shape
    encoded = model.apply({"params": params}, tokens.reshape(b * n, length), enable_dropout=enable_dropout,
                          method=T5.encode, rngs=rngs)
    return encoded.reshape(b, n * length, encoded.shape[-1]), tokens.reshape(b, n * length)


def generate(config: T5Config, params: Any, encoder_input_tokens: Any, *, max_decode_length: int,
             rng: jax.Array | None = None, top_k: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """int32 [B, max_decode_length]: greedy when rng is None, else (top-k) sampling at `temperature`.
    encoder_input_tokens: [B, L], or [B, n, L] for Fusion-in-Decoder."""
    tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    if tokens.ndim not in (2, 3):
        raise ValueError(f"encoder_input_tokens: expected [batch, length] or [batch, passages, length], "
                         f"got {tuple(tokens.shape)}")
    if max_decode_length < 1:
        raise ValueError(f"max_decode_length={max_decode_length}: must be >= 1")
    sample = rng is not None
    out = _generate(params, tokens, rng if sample else jax.random.PRNGKey(0), jnp.float32(temperature),
                    config=config, max_decode_length=max_decode_length, top_k=int(top_k or 0), sample=sample)
    return np.asarray(out)
