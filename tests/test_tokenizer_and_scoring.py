"""The real T5 vocabulary, the template's document-only truncation, and the three score heads."""
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from twolar_jax.scoring import ScoreTokens, head_vocab_ids, resolve_score_tokens, score_from_logits
from twolar_jax.resources import SPIECE_MODEL as DEFAULT_SPIECE
from twolar_jax.ranking.pointwise_inputs import encode_query_document
from twolar_jax.tokenizer import T5Tokenizer


@pytest.fixture(scope="module")
def tok():
    return T5Tokenizer()


def test_score_token_ids_match_twolar_code(tok):
    # TWOLAR's Score hard-codes 1176 / 6136 / 32089; we look them up and must agree.
    assert resolve_score_tokens(tok) == ScoreTokens(1176, 6136, 32089)
    assert tok.vocab_size == 32100
    assert tok.id_to_piece(32099) == "<extra_id_0>"
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.piece_to_id("▁definitelynotapiece")


def test_template_matches_transformers_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copyfile(DEFAULT_SPIECE, tmp_path / "spiece.model")
    hf = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
    for q, d in [("what is a lobster roll", "Lobster rolls are sandwiches, served in New England."),
                 ("who won the 2018 turing award?", "Geoffrey Hinton, Yann LeCun and Yoshua Bengio."),
                 ("empty", "")]:
        ours = encode_query_document(tok, q, d)
        ref = hf(f"Query: {q} Document: {d} Relevant:").input_ids
        assert ours == ref


def test_document_only_truncation_keeps_the_suffix(tok):
    long_doc = " ".join(f"word{i}" for i in range(2000))
    assert len(tok.encode(long_doc)) > 2000
    ids = encode_query_document(tok, "a query", long_doc, max_length=128)
    suffix = tok.encode("Relevant:") + [tok.eos_id]
    assert len(ids) == 128
    assert ids[-len(suffix):] == suffix
    assert ids[: len(tok.encode("Query: a query Document:"))] == tok.encode("Query: a query Document:")
    whole = encode_query_document(tok, "a query", long_doc, max_length=128, truncation="whole")
    assert len(whole) == 128 and whole[-len(suffix):] != suffix  # the reference loses "Relevant:"


def test_over_long_query_still_fits(tok):
    ids = encode_query_document(tok, "q " * 600, "doc", max_length=64)
    assert len(ids) == 64 and ids[-1] == tok.eos_id


def test_bad_truncation_mode(tok):
    with pytest.raises(ValueError, match="truncation='middle'"):
        encode_query_document(tok, "q", "d", truncation="middle")


def test_score_heads_on_known_logits():
    tokens = ScoreTokens(true_id=2, false_id=5, extra_id=7)
    logits = np.zeros((2, 10), np.float32)
    logits[0, [2, 5, 7]] = [3.0, 1.0, -4.0]
    logits[1, [2, 5, 7]] = [-2.0, 2.5, 9.0]
    diff = score_from_logits(jnp.asarray(logits), "difference", tokens)
    soft = score_from_logits(jnp.asarray(logits), "softmax", tokens)
    extra = score_from_logits(jnp.asarray(logits), "extra_id", tokens)
    np.testing.assert_allclose(diff, [2.0, -4.5])
    np.testing.assert_allclose(soft, [math.exp(3) / (math.exp(3) + math.exp(1)),
                                      math.exp(-2) / (math.exp(-2) + math.exp(2.5))], rtol=1e-6)
    np.testing.assert_allclose(extra, [-4.0, 9.0])
    assert diff.dtype == jnp.float32 and soft.dtype == jnp.float32
    assert head_vocab_ids("extra_id", tokens) == (7,)
    with pytest.raises(ValueError, match="score_head='max': expected one of"):
        score_from_logits(jnp.asarray(logits), "max", tokens)
