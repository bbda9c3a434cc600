"""The listwise Fusion-in-Decoder student (LiT5 / FIRST): window arithmetic, rank_llm's parsing of hostile
generations, the losses against a hand computation, and parity with a torch FiD built from transformers' T5
(each passage through the encoder alone, states joined, the decoder over all of them) on a checkpoint the
installed transformers saved."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twolar_jax.errors import OptionError
from twolar_jax.ranking import listwise_inputs as li
from twolar_jax.ranking.listwise import BRACKET_ID, FiDRanker, sequence_cross_entropy, weighted_rank_net
from twolar_jax.tokenizer import T5Tokenizer


# ------------------------------------------------------------------------------------------ windows
def test_listwise_windows_slide_back_to_front():
    assert li.sliding_windows(100) == [(s, s + 20) for s in range(80, -1, -10)]
    assert len(li.sliding_windows(100)) == 9
    assert li.sliding_windows(30) == [(10, 30), (0, 20)]
    assert li.sliding_windows(20) == [(0, 20)]
    assert li.sliding_windows(7) == [(0, 7)]
    assert li.sliding_windows(0) == []
    assert li.sliding_windows(100, window=100, stride=10) == [(0, 100)]
    assert li.sliding_windows(25, window=20, stride=10) == [(5, 25), (0, 15)]


@pytest.mark.parametrize("window,stride", [(0, 1), (101, 10), (20, 0), (20, 21), (True, 1)])
def test_listwise_bad_window_is_an_option_error(window, stride):
    with pytest.raises(OptionError, match="window=|stride="):
        li.sliding_windows(30, window=window, stride=stride)


def test_listwise_apply_window_moves_only_its_slice():
    order = list(range(6))
    assert li.apply_window(order, 2, 5, [2, 0, 1]) == [0, 1, 4, 2, 3, 5]


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,want", [
    ("[3] > [1] > [2]", [2, 0, 1, 3]),
    ("", [0, 1, 2, 3]),
    ("[2] > [2] > [2]", [1, 0, 2, 3]),
    ("[9] > [0] > [4] > [-1]", [3, 0, 1, 2]),
    ("the best is 3, then two, then [1]", [2, 0, 1, 3]),
    ("[4]>[3]>[2]>[1]", [3, 2, 1, 0]),
    ("[1x2] [003]", [0, 1, 2, 3]),
])
def test_listwise_parsing_of_hostile_generations(text, want):
    assert li.parse_permutation(text, 4) == want


def test_listwise_template_tokens_and_identifiers():
    tok = T5Tokenizer()
    ids = li.encode_passage(tok, "q", 3, "p " * 400, passage_length=150)
    assert len(ids) == 150 and ids[-1] == tok.eos_id  # cut from the right, EOS last
    assert tok.encode(li.target_text([0, 1, 19])) == [784, 536, 908, 2490, 784, 357, 908, 2490, 784, 1755, 908]
    assert BRACKET_ID == tok.piece_to_id("▁[")
    assert li.identifier_ids(tok, 3).tolist() == [536, 357, 519]
    assert len(set(li.identifier_ids(tok, 100).tolist())) == 100
    tokens, mask = li.encode_window(tok, "q", ["a", "b"], window=4, passage_length=16)
    assert tokens.shape == (4, 16) and mask.tolist() == [1, 1, 0, 0] and not tokens[2:].any()


# ------------------------------------------------------------------------------------------- losses
def test_listwise_weighted_rank_net_equals_hand_computation():
    scores = jnp.array([[2.0, 0.5, -1.0, 7.0]])
    ranks = jnp.array([[1, 0, 2, 3]])  # slot 1 is the teacher's best
    mask = jnp.array([[1, 1, 1, 0]])  # slot 3 is empty
    s, r = [2.0, 0.5, -1.0], [2, 1, 3]  # 1-based ranks of the real slots
    num = den = 0.0
    for i in range(3):
        for j in range(3):
            if r[i] < r[j]:
                w = 1.0 / (r[i] + r[j])
                num += w * math.log1p(math.exp(s[j] - s[i]))
                den += w
    np.testing.assert_allclose(float(weighted_rank_net(scores, ranks, mask)[0]), num / den, rtol=1e-6)


def test_listwise_sequence_cross_entropy_equals_hand_computation():
    logits = jnp.array([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]])
    targets = jnp.array([[1, 2, 0]])  # the last position is padding
    def ce(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))
    want = (ce([1.0, 2.0, 0.0], 1) + ce([0.5, 0.5, 3.0], 2)) / 2
    np.testing.assert_allclose(float(sequence_cross_entropy(logits, targets)[0]), want, rtol=1e-6)


# ----------------------------------------------------------------------------------- torch parity
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
SHAPE = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def lit5_like(tmp_path_factory):
    """A gated-gelu, untied T5ForConditionalGeneration (LiT5-Distill's architecture), saved by transformers."""
    torch.manual_seed(5)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **SHAPE, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
    path = tmp_path_factory.mktemp("lit5") / "ckpt"
    hf.save_pretrained(path)
    from twolar_jax.hf_conversion import load_hf_checkpoint
    config, params = load_hf_checkpoint(path)
    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return config, params, torch_model


def _windows(tok, n=3, length=24):
    queries = ["who won the turing award", "what is a lobster roll"]
    passages = [["Hinton, LeCun and Bengio won the 2018 Turing Award.", "Lobster is a crustacean.", "A prize."],
                ["A lobster roll is a sandwich from New England.", "Rolls are bread."]]
    out = [li.encode_window(tok, q, p, window=n, passage_length=length) for q, p in zip(queries, passages)]
    return np.stack([t for t, _ in out]), np.stack([m for _, m in out])


def _torch_fid(torch_model, tokens, decoder_ids=None, generate=0):
    b, n, length = tokens.shape
    flat = torch.tensor(tokens.reshape(b * n, length), dtype=torch.long)
    with torch.no_grad():
        states = torch_model.encoder(input_ids=flat, attention_mask=(flat > 0).long()).last_hidden_state
        joined = states.reshape(b, n * length, -1)
        mask = (flat > 0).long().reshape(b, n * length)
        encoder_outputs = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=joined)
        if generate:
            return torch_model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=generate,
                                        do_sample=False, num_beams=1).numpy()[:, 1:]
        out = torch_model(encoder_outputs=encoder_outputs, attention_mask=mask,
                          decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long))
    return out.logits.numpy()


def test_listwise_fid_logits_match_torch(lit5_like):
    config, params, torch_model = lit5_like
    tokens, mask = _windows(T5Tokenizer())
    model = FiDRanker(config, window=3)
    prompt = np.tile(np.array([[0, BRACKET_ID]], np.int32), (2, 1))
    ours = np.asarray(model.decoder_logits(params, jnp.asarray(tokens), jnp.asarray(prompt)))
    np.testing.assert_allclose(ours, _torch_fid(torch_model, tokens, prompt), atol=1e-4, rtol=1e-4)
    scores = np.asarray(model.scores(params, {"encoder_input_tokens": tokens, "passage_mask": mask}))
    want = _torch_fid(torch_model, tokens, prompt)[:, 1, list(model.identifier_ids[:3])]
    np.testing.assert_allclose(scores[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scores[1, :2], want[1, :2], atol=1e-4, rtol=1e-4)
    assert scores[1, 2] < -1e8  # the empty slot


def test_listwise_fid_greedy_tokens_match_torch(lit5_like):
    from twolar_jax.generation import generate

    config, params, torch_model = lit5_like
    tokens, _ = _windows(T5Tokenizer())
    ours = generate(config, params, tokens, max_decode_length=8)
    theirs = _torch_fid(torch_model, tokens, generate=8)
    theirs = np.pad(theirs, ((0, 0), (0, 8 - theirs.shape[1])))
    np.testing.assert_array_equal(ours, theirs)


def test_listwise_fid_train_and_score_compile_for_a_tpu_slice():
    from twolar_jax.aot import programs, topology
    from twolar_jax.aot.gin_jobs import ScoreJob, TrainJob
    from twolar_jax.model.config import preset
    from twolar_jax.optimizers import OptimizerConfig
    from twolar_jax.partitioning import load_logical_axis_rules

    if not topology.libtpu_available():
        pytest.skip("libtpu is not installed (pip install 'twolar-jax[aot]')")
    target = topology.parse_topology("v5e:2x2")
    devices = topology.topology_devices(target)
    model = FiDRanker(preset("tiny"), window=4)
    rules = load_logical_axis_rules()
    job = TrainJob(model=model, optimizer=OptimizerConfig(), num_microbatches=1, enable_dropout=True,
                   mesh_shape=(2, 2, 1), rules=rules, total_steps=10, seed=0, batch_size=4, group_size=4,
                   max_length=32, target_length=16)
    report = programs.compile_program(programs.train_program(job, devices), target)
    assert report.fits and report.chips == 4 and report.model.startswith("tiny params=")
    no_target = TrainJob(**{**job.__dict__, "target_length": None})
    with pytest.raises(OptionError, match="target_length"):
        programs.train_program(no_target, devices)
    score = ScoreJob(model=model, mesh_shape=(2, 2, 1), rules=rules, batch_size=4, max_length=32)
    score_report = programs.compile_program(programs.score_program(score, devices), target)
    assert score_report.fits and "batch=4x4x32" in score_report.shape  # 4 windows of 4 passages x 32 tokens
