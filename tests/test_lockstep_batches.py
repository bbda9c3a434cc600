"""Validation batches in lockstep: short last batches and uneven host shards padded to one shape.

Two hosts are simulated by two threads whose signatures meet at a barrier, as `process_allgather` makes
them meet across processes; tests/test_multihost_train.py runs the real thing in two processes.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from twolar_jax.lockstep_batches import empty_batch, lockstep_batches, pad_batch, padded_rows
from twolar_jax.trainer import BatchError


def _batch(rows: int, *, group: int = 3, length: int = 5, start: int = 1, scores: bool = False) -> dict:
    tokens = np.arange(start, start + rows * group * length, dtype=np.int32).reshape(rows, group, length)
    batch = {"encoder_input_tokens": tokens, "teacher_ranks": np.tile(np.arange(group, dtype=np.int32), (rows, 1)),
             "passage_mask": np.ones((rows, group), np.int32), "qid": np.arange(rows)}
    if scores:
        batch["teacher_scores"] = np.ones((rows, group), np.float32)
    return batch


@pytest.mark.parametrize("rows, parallelism, processes, expected", [
    (8, 8, 1, 8), (1, 8, 1, 8), (9, 8, 1, 16), (0, 1, 1, 1), (3, 1, 1, 3),
    (4, 8, 2, 4), (1, 8, 2, 4), (5, 8, 2, 8), (1, 2, 4, 1), (3, 6, 4, 3), (4, 6, 4, 6)])
def test_padded_rows_is_the_fewest_the_batch_sharding_divides(rows, parallelism, processes, expected):
    got = padded_rows(rows, parallelism=parallelism, process_count=processes)
    assert got == expected and (got * processes) % parallelism == 0


def test_pad_batch_adds_queries_without_a_real_passage():
    padded = pad_batch({k: v for k, v in _batch(2).items() if k != "qid"}, 4)
    assert padded["encoder_input_tokens"].shape == (4, 3, 5) and padded["passage_mask"].shape == (4, 3)
    np.testing.assert_array_equal(padded["encoder_input_tokens"][:2], _batch(2)["encoder_input_tokens"])
    assert not padded["encoder_input_tokens"][2:].any() and not padded["passage_mask"][2:].any()
    assert {v.dtype for v in padded.values()} == {np.dtype(np.int32)}
    empty = empty_batch(4, 3, 5, teacher_scores=True)
    assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in pad_batch(
        {k: v for k, v in _batch(1, scores=True).items() if k != "qid"}, 4).items()}
    assert empty["teacher_scores"].dtype == np.float32 and not empty["passage_mask"].any()


def test_one_host_pads_the_short_last_batch_to_the_first_batchs_rows():
    out = list(lockstep_batches([_batch(8), _batch(1, start=500)], parallelism=8, process_count=1))
    assert [b["encoder_input_tokens"].shape for b in out] == [(8, 3, 5), (8, 3, 5)]
    assert sorted(out[0]) == ["encoder_input_tokens", "passage_mask", "teacher_ranks"]  # features only
    assert out[1]["passage_mask"].sum(axis=1).tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    assert list(lockstep_batches([], parallelism=8, process_count=1)) == []


def _run_hosts(shards: list[list[dict]], *, parallelism: int) -> list:
    """Each host's lockstep batches (or the exception it raised), the hosts running at once as threads."""
    n = len(shards)
    barrier, slots, results = threading.Barrier(n, timeout=20), [None] * n, [None] * n

    def host(i: int) -> None:
        def gather(sig):
            slots[i] = sig
            barrier.wait()
            gathered = np.stack(slots)
            barrier.wait()  # nobody overwrites a slot before every host has read them all
            return gathered

        try:
            results[i] = list(lockstep_batches(shards[i], parallelism=parallelism, process_count=n, gather=gather))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=host, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a host is still waiting for the others"
    return results


def test_uneven_host_shards_step_together_and_stop_together():
    # 9 queries over 2 hosts at 4 per host batch: host 0 reads 4 + 1, host 1 reads 4, then nothing.
    host0, host1 = _run_hosts([[_batch(4), _batch(1, start=900)], [_batch(4, start=300)]], parallelism=8)
    assert len(host0) == len(host1) == 2
    for a, b in zip(host0, host1):
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert host0[1]["passage_mask"].sum(axis=1).tolist() == [3, 0, 0, 0]
    assert not host1[1]["passage_mask"].any() and not host1[1]["encoder_input_tokens"].any()
    # A host with no batch at all still steps (and stops) with the others.
    host0, host1 = _run_hosts([[_batch(2)], []], parallelism=2)
    assert [b["encoder_input_tokens"].shape for b in host0] == [(2, 3, 5)] == [b["encoder_input_tokens"].shape for b in host1]


def test_hosts_reading_different_shapes_both_get_a_clear_error():
    results = _run_hosts([[_batch(4)], [_batch(4, length=7)]], parallelism=2)
    for result in results:
        assert isinstance(result, BatchError)
        assert "validation batch 0: hosts read batches of different shapes" in str(result)
        assert "'max_length': 5" in str(result) and "'max_length': 7" in str(result)


def test_a_bad_batch_is_named_before_any_exchange():
    bad = _batch(2)
    del bad["passage_mask"]
    with pytest.raises(BatchError, match=r"validation batch 1: missing feature\(s\) \['passage_mask'\]"):
        list(lockstep_batches([_batch(2), bad], parallelism=1, process_count=1))


def test_validation_of_a_short_last_batch_on_8_devices_equals_one_device(tmp_path):
    """9 validation queries in batches of 8 over 8 devices: the batch of 1 failed to be placed (IndivisibleError)
    before it was padded; the padded mean must equal the same run's on one device, where nothing is padded."""
    import jax

    from tests.test_train_learns_scifact import RecordSource, build_standin_set
    from tests.train_helpers import run_options
    from twolar_jax import summaries
    from twolar_jax.model.config import preset
    from twolar_jax.train import train
    from twolar_jax.train_loop import ValidationConfig

    assert jax.device_count() == 8
    records = build_standin_set(num_queries=41)
    shape = dict(group_size=4, max_length=48)
    runs = {}
    for devices in (8, 1):
        model_dir = tmp_path / f"d{devices}"
        train(model_dir=str(model_dir), model=preset("tiny", dropout_rate=0.0), num_devices=devices, seed=0,
              train_batches=RecordSource(records[9:], batch_size=8, shuffle=True, repeat=True, **shape),
              validation=ValidationConfig(RecordSource(records[:9], batch_size=8, shuffle=False, repeat=False,
                                                       **shape), period=2, at_start=True),
              total_steps=2, **run_options(learning_rate=1e-3, save_period=100, log_period=1))
        runs[devices] = summaries.metrics_by_step(model_dir, "validation")
    assert sorted(runs[8]) == sorted(runs[1]) == [0, 2]
    for step in (0, 2):
        a, b = runs[8][step], runs[1][step]
        assert a["num_queries"] == b["num_queries"] == 9.0
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {key}")
