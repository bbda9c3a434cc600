"""Parity of our Flax T5 with transformers' PyTorch T5 on identical random weights (the reference)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from twolar_jax.generation import generate  # noqa: E402
from twolar_jax.hf_conversion import save_hf_checkpoint  # noqa: E402
from twolar_jax.model.config import preset  # noqa: E402
from twolar_jax.model.network import T5, init_params  # noqa: E402
from twolar_jax.tokenizer import T5Tokenizer  # noqa: E402

TEXTS = [
    "Query: who won the turing award Document: Geoffrey Hinton, Yann LeCun and Yoshua Bengio won it. Relevant:",
    "Query: what is a lobster roll Document: a sandwich. Relevant:",
    "Query: how long is the flight from london to new york Document: About eight hours, depending on the "
    "winds over the Atlantic and the route the airline takes on the day of departure. Relevant:",
]
VARIANTS = {
    "tiny-gated": preset("tiny"),
    "tiny-relu-tied": preset("tiny").replace(feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5-small": preset("flan-t5-small"),
}


def _padded_batch():
    tok = T5Tokenizer()
    ids = [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    length = max(map(len, ids))
    batch = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = row
    return batch


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    config = VARIANTS[request.param]
    params = init_params(config, jax.random.PRNGKey(7))
    path = save_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", config, params)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return config, params, hf


def test_parity_encoder_and_first_step_logits(pair):
    config, params, hf = pair
    tokens = _padded_batch()
    mask = tokens > 0
    model = T5(config)
    ours_enc = np.asarray(model.apply({"params": params}, tokens, method=T5.encode))
    ours_logits = np.asarray(model.apply({"params": params}, tokens, method=T5.first_step_logits))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 decoder_input_ids=torch.zeros((tokens.shape[0], 1), dtype=torch.long))
    ref_enc = out.encoder_last_hidden_state.numpy()
    ref_logits = out.logits[:, 0, :].numpy()
    np.testing.assert_allclose(ours_enc[mask], ref_enc[mask], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=1e-4, rtol=0)


def test_parity_greedy_generation(pair):
    config, params, hf = pair
    tokens = _padded_batch()
    ours = generate(config, params, tokens, max_decode_length=8)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(tokens > 0, dtype=torch.long),
                          max_new_tokens=8, min_new_tokens=0, do_sample=False, num_beams=1).numpy()[:, 1:]
    ref = np.pad(ref, ((0, 0), (0, 8 - ref.shape[1])))
    np.testing.assert_array_equal(ours, ref)


def test_parity_full_decoder_matches_incremental(pair):
    """Teacher-forced logits over 5 decoder positions equal HF's (checks the causal relative bias)."""
    config, params, hf = pair
    tokens = _padded_batch()
    dec = np.array([[0, 71, 19, 3, 9]] * tokens.shape[0], np.int32)
    ours = np.asarray(T5(config).apply({"params": params}, tokens, dec))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(tokens > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
