"""Training data of the listwise (Fusion-in-Decoder) family: windows, the passage shuffle (identifiers given
after it), the target permutation, the TF twin equal to the Python path id for id, the batch declaration,
and a FiDRanker that trains on the Python source and resumes exactly."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from data_pipeline import distill_format as formats
from data_pipeline.distill_format import Candidate, DistillRecord
from data_pipeline.seqio_input.listwise_batches import (ListwiseRecordSource, listwise_batches_from_records,
                                                        window_count)
from tests.test_train_learns_scifact import build_standin_set
from tests.train_helpers import QUIET, run_options, tiny_config
from twolar_jax import checkpointing
from twolar_jax.errors import OptionError
from twolar_jax.ranking import listwise_inputs as li
from twolar_jax.ranking.features import FID_WINDOW_BATCH
from twolar_jax.ranking.listwise import FiDRanker
from twolar_jax.tokenizer import T5Tokenizer

TOK = T5Tokenizer()
W, L, T = 4, 40, 16  # window, passage_length, target_length ([1] > [2] > [3] > [4] + EOS is 16 tokens)


def _records() -> list[DistillRecord]:
    """The SciFact stand-in set (the shipped corpus, 11 candidates: windows of 4, 4, 3) and edge cases:
    a non-ASCII qid, a lone remainder dropped (9 = 4 + 4 + 1), a record with a single candidate."""
    shipped = build_standin_set(num_queries=6, group_size=11, passage_words=30)
    extra = [DistillRecord(qid, f"question {qid}?", "doct5query",
                           tuple(Candidate(f"{qid}-{j}", f"passage {j}: " + "word " * (2 * j), "bm25") for j in range(n)),
                           None) for qid, n in (("q-é東京", 9), ("q-single", 1), ("q-two", 2))]
    return shipped + extra


def _one_window(seed: int, n: int = W) -> dict:
    texts = [f"passage number {j}" for j in range(n)]
    (ex,) = li.window_examples("a query", texts, tokenizer=TOK, window=W, passage_length=L, target_length=T,
                               seed=seed, qid="q1")
    return ex


def _slot_texts(ex: dict) -> list[str]:
    return [TOK.decode([int(i) for i in row if i not in (0, TOK.eos_id)]) for row in ex["encoder_input_tokens"]]


# ------------------------------------------------------------------------------------ Python path
def test_listwise_identifiers_are_given_after_the_shuffle():
    gold_slots = []
    for seed in range(200):
        ex = _one_window(seed)
        perm = ex["teacher_ranks"]
        assert sorted(perm.tolist()) == list(range(W))
        for slot, text in enumerate(_slot_texts(ex)):  # slot s says [s+1] and shows teacher passage perm[s]
            assert text == f"Search Query: a query Passage: [{slot + 1}] passage number {perm[slot]} Relevance Ranking:"
        gold_slots.append(int(np.argmin(perm)))
    assert set(gold_slots) == set(range(W))  # the gold passage is at every identifier over the seeds
    assert min(np.bincount(gold_slots)) > 20
    np.testing.assert_array_equal(_one_window(7)["teacher_ranks"], _one_window(7)["teacher_ranks"])  # deterministic


def test_listwise_target_decodes_to_the_teacher_order():
    for seed in range(20):
        for n in (2, 3, W):
            ex = _one_window(seed, n)
            target = [int(i) for i in ex["decoder_target_tokens"] if i != 0]
            assert target[-1] == TOK.eos_id and len(ex["decoder_target_tokens"]) == T
            order = li.parse_permutation(TOK.decode(target[:-1]), n)
            assert ex["teacher_ranks"][order].tolist() == list(range(n))  # slots by teacher rank: best first
            assert ex["passage_mask"].tolist() == [1] * n + [0] * (W - n)
            assert ex["teacher_ranks"][n:].tolist() == list(range(n, W))  # empty slots continue, as groups do
            assert not ex["encoder_input_tokens"][n:].any()


def test_listwise_windows_and_option_errors():
    assert li.training_windows(11, 4) == [(0, 4), (4, 8), (8, 11)]
    assert li.training_windows(9, 4) == [(0, 4), (4, 8)] and li.training_windows(1, 4) == []
    with pytest.raises(OptionError, match="target_length=15"):
        li.window_examples("q", ["a", "b", "c", "d"], tokenizer=TOK, window=W, target_length=15, seed=0, qid="q")
    with pytest.raises(OptionError, match="window=1"):
        li.training_windows(5, 1)
    unshuffled = li.window_examples("q", ["a", "b", "c"], tokenizer=TOK, window=W, passage_length=L,
                                    target_length=T, seed=None, qid="q")[0]
    assert unshuffled["teacher_ranks"].tolist() == [0, 1, 2, 3]


def test_listwise_python_batches_validate_against_the_declaration():
    records = _records()
    batches = list(listwise_batches_from_records(records, tokenizer=TOK, batch_size=5, window=W, passage_length=L,
                                                 target_length=T, seed=0))
    assert sum(len(b["passage_mask"]) for b in batches) == window_count(records, W) == 6 * 3 + 2 + 1
    for b in batches:
        FID_WINDOW_BATCH.validate(b, expect={"group_size": W, "max_length": L, "target_length": T})
        assert set(b) == set(FID_WINDOW_BATCH.names)
        assert FiDRanker(tiny_config(), window=W).example_weights(b, np).all()  # every window has >= 2 passages


# ------------------------------------------------------------------------------------ the TF twin
@pytest.fixture(scope="module")
def lw():
    pytest.importorskip("seqio")
    from data_pipeline.seqio_input import listwise

    return listwise


@pytest.fixture(scope="module")
def listwise_file(tmp_path_factory, lw):
    path = tmp_path_factory.mktemp("listwise") / "train.jsonl"
    formats.write_distill_jsonl(path, _records())
    return path


def test_listwise_tf_permutation_equals_python(lw):
    cases = [(s, q, w, n) for s in (0, 5, -3, 2**40 + 7) for q in ("q1", "", "q-é東京", "crop-12345")
             for w in (0, 1, 7) for n in (2, 4, 20)]
    for seed, qid, w, n in cases:
        got = lw.window_permutation_tf(n, seed=seed, qid=lw.tf.constant(qid), window_index=lw.tf.constant(w))
        np.testing.assert_array_equal(got.numpy(), li.window_permutation(n, seed=seed, qid=qid, window_index=w),
                                      err_msg=str((seed, qid, w, n)))


def _tf_batches(lw, **kw):
    args = dict(task_or_mixture="twolar_listwise", split="train", batch_size=5, window=W, passage_length=L,
                target_length=T, seed=None, shuffle=False, repeat=False)
    return list(lw.get_listwise_batches(**{**args, **kw}))


def test_listwise_tf_pipeline_equals_python_path(lw, listwise_file):
    lw.register_listwise_tasks(train_path=listwise_file, validation_path=listwise_file, seed=5)
    tf_batches = _tf_batches(lw)
    py_batches = list(listwise_batches_from_records(_records(), tokenizer=TOK, batch_size=5, window=W,
                                                    passage_length=L, target_length=T, seed=5))
    assert len(tf_batches) == len(py_batches) == 5
    for a, b in zip(tf_batches, py_batches):
        assert a.keys() == b.keys() == set(FID_WINDOW_BATCH.names)
        FID_WINDOW_BATCH.validate(a, expect={"group_size": W, "max_length": L, "target_length": T})
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Shuffled and repeated: a pure function of the seed, so skipping batches resumes exactly.
    full = list(zip(range(6), lw.get_listwise_batches(task_or_mixture="twolar_listwise_mix", split="train",
                                                      batch_size=4, window=W, passage_length=L, target_length=T,
                                                      seed=1)))
    tail = list(zip(range(3), lw.get_listwise_batches(task_or_mixture="twolar_listwise_mix", split="train",
                                                      batch_size=4, window=W, passage_length=L, target_length=T,
                                                      seed=1, skip_batches=3)))
    for (_, a), (_, b) in zip(full[3:], tail):
        np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


def test_listwise_tf_target_length_is_checked(lw, listwise_file):
    with pytest.raises(OptionError, match="target_length=12"):
        _tf_batches(lw, target_length=12)


def test_listwise_gin_smoke_experiment_builds_the_model_and_batches(lw, listwise_file):
    """experiments/tiny_listwise_smoke.gin binds train.model to a FiDRanker and train.train_batches to the
    seqio windows (the same run trains from the command line: twolar-train --gin_file=...)."""
    import gin

    from twolar_jax import gin_utils
    from twolar_jax.train import register_configurables

    register_configurables()
    gin.clear_config()
    try:
        gin_utils.parse_gin_flags(["experiments/tiny_listwise_smoke.gin"],
                                  ["MODEL_DIR = '/tmp/unused'", f"DISTILL_JSONL = '{listwise_file}'"],
                                  skip_unknown=False)
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        source = gin.query_parameter("train.train_batches").scoped_configurable_fn
        batch = next(source(shard_index=0, num_shards=1, skip_batches=0))
    finally:
        gin.clear_config()
    assert isinstance(model, FiDRanker) and model.window == W and model.loss_name == "first+lm"
    FID_WINDOW_BATCH.validate(batch, expect={"batch": 4, "group_size": W, "max_length": 32, "target_length": T})
    assert model.example_weights(batch, np).all()


# ------------------------------------------------------------------------------------ training
def _train(model_dir, steps: int):
    from twolar_jax.train import train

    source = ListwiseRecordSource(_records(), tokenizer=TOK, batch_size=4, window=W, passage_length=24,
                                  target_length=T, seed=0)
    return train(model_dir=str(model_dir), model=FiDRanker(tiny_config(), window=W), train_batches=source,
                 total_steps=steps, num_devices=1,
                 **{**run_options(learning_rate=1e-3, save_period=3, log_period=1), "logging_config": QUIET})


def test_listwise_fid_ranker_trains_and_resumes_exactly(tmp_path):
    from twolar_jax.optimizers import OptimizerConfig
    from twolar_jax.partitioner import Partitioner
    from twolar_jax.trainer import Trainer, initial_params

    straight = _train(tmp_path / "straight", 5)
    first = _train(tmp_path / "resumed", 3)
    assert first.step == 3 and np.isfinite(first.train_metrics["loss"])
    resumed = _train(tmp_path / "resumed", 5)
    assert resumed.step == 5 and resumed.batches_consumed == straight.batches_consumed == 5
    trainer = Trainer(FiDRanker(tiny_config(), window=W), Partitioner.create((1, 1, 1), devices=jax.devices()[:1]),
                      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"), total_steps=5)
    states = []
    for run in ("straight", "resumed"):
        manager = checkpointing.make_manager(str(tmp_path / run), read_only=True)
        try:
            state, meta = checkpointing.restore(manager, trainer.restore_target)
        finally:
            manager.close()
        assert meta["step"] == 5
        states.append(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 *states)
    initial = initial_params(FiDRanker(tiny_config(), window=W), 0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(initial)))  # it trained
    assert (tmp_path / "resumed" / checkpointing.MODEL_CONFIG).exists()  # FiDRanker writes its T5 config
