"""The scorer's batch planner: which inputs share a batch, and how much padding that costs.

`plan_batches` must find a cheapest plan (brute force over every set partition), never cost more than
filling the length buckets one by one (the planner before it), keep input order among equal lengths, and
`group_batches` must cut a long group into windows that each plan alone."""
import bisect
import itertools
import random

import numpy as np
import pytest

from twolar_jax.reranker import default_length_buckets
from twolar_jax.scoring_runtime import Batch, GroupEnd, group_batches, plan_batches, rows_for


def plan_cost(plan, lengths, buckets, batch_size, parallelism, overhead):
    total = 0
    for members in plan:
        bucket = buckets[bisect.bisect_left(buckets, max(lengths[m] for m in members))]
        total += rows_for(len(members), batch_size=batch_size, parallelism=parallelism) * bucket + overhead
    return total


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


def fill_buckets_one_by_one(lengths, buckets, batch_size):
    """The planner before `plan_batches`: an input joins the shortest bucket it fits; full buckets go."""
    pending, plan = [[] for _ in buckets], []
    for i, n in enumerate(lengths):
        b = bisect.bisect_left(buckets, n)
        pending[b].append(i)
        if len(pending[b]) == batch_size:
            plan.append(pending[b])
            pending[b] = []
    return plan + [p for p in pending if p]


def check_is_plan(plan, lengths, buckets, batch_size):
    flat = sorted(int(i) for members in plan for i in members)
    assert flat == list(range(len(lengths))), "every input in exactly one batch"
    assert all(1 <= len(members) <= batch_size for members in plan)
    assert all(list(members) == sorted(members) for members in plan), "input order within a batch"


@pytest.mark.parametrize("parallelism", [1, 2])
def test_plan_is_cheapest_over_every_partition(parallelism):
    rng = random.Random(0)
    buckets, batch_size = (4, 8, 12, 20), 4 if parallelism == 2 else 3
    for trial in range(40):
        lengths = [rng.randint(0, 20) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 3, 50])
        plan = plan_batches(lengths, buckets=buckets, batch_size=batch_size, parallelism=parallelism,
                            overhead_tokens=overhead)
        check_is_plan(plan, lengths, buckets, batch_size)
        best = min(plan_cost(p, lengths, buckets, batch_size, parallelism, overhead)
                   for p in set_partitions(list(range(len(lengths))))
                   if all(len(block) <= batch_size for block in p))
        assert plan_cost(plan, lengths, buckets, batch_size, parallelism, overhead) == best, (trial, lengths)


def test_plan_never_costs_more_than_filling_buckets_one_by_one():
    rng = np.random.default_rng(1)
    buckets = default_length_buckets(512)
    for _ in range(20):
        lengths = list(rng.integers(10, 513, rng.integers(1, 300)))
        plan = plan_batches(lengths, buckets=buckets, batch_size=32, parallelism=1)
        check_is_plan(plan, lengths, buckets, 32)
        old = fill_buckets_one_by_one(lengths, buckets, 32)
        assert plan_cost(plan, lengths, buckets, 32, 1, 256) <= plan_cost(old, lengths, buckets, 32, 1, 256)


def test_plan_pads_dl19_less_than_the_old_buckets():
    """The shipped DL19 candidates' token lengths, one query at a time (as `Reranker.rank` scores)."""
    import json
    from pathlib import Path

    from twolar_jax.tokenizer import T5Tokenizer

    shipped = Path(__file__).resolve().parent.parent / "data" / "trec_dl" / "dl19_bm25_top100.json"
    rows = json.loads(shipped.read_text())
    tok = T5Tokenizer()
    old_buckets = (64, 96, 128, 192, 256, 384, 512)
    real, old, new = 0, 0, 0
    for row in rows[:6]:
        lengths = [len(tok.encode(f"Query: {row['query']} Document: {h['content']} Relevant:")) for h in row["hits"]]
        real += sum(lengths)
        old += plan_cost(fill_buckets_one_by_one(lengths, old_buckets, 32), lengths, old_buckets, 32, 1, 0)
        plan = plan_batches(lengths, buckets=default_length_buckets(512), batch_size=32, parallelism=1)
        new += plan_cost(plan, lengths, default_length_buckets(512), 32, 1, 0)
    assert new / real < 1.25 < 1.35 < old / real  # all 43 queries: 1.17 against 1.41


def test_equal_lengths_keep_input_order_and_fill_whole_batches():
    plan = plan_batches([7] * 10, buckets=(8,), batch_size=4, parallelism=1)
    assert [[int(i) for i in m] for m in plan] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]  # one partial batch
    plan = plan_batches([30, 5, 30, 5, 5], buckets=(8, 32), batch_size=4, parallelism=1)
    assert [[int(i) for i in m] for m in plan] == [[1, 3, 4], [0, 2]]  # short ones together, each batch in input order
    assert plan_batches([], buckets=(8,), batch_size=4, parallelism=1) == []


def test_overhead_keeps_batches_whole():
    lengths = list(range(1, 33))  # one per length: without overhead the planner cuts at every bucket
    buckets = tuple(range(4, 33, 4))
    free = plan_batches(lengths, buckets=buckets, batch_size=32, parallelism=1, overhead_tokens=0)
    costly = plan_batches(lengths, buckets=buckets, batch_size=32, parallelism=1, overhead_tokens=10 ** 6)
    assert len(free) > 1 and len(costly) == 1


def test_group_batches_plans_each_window_alone():
    rng = np.random.default_rng(2)
    encoded = [[5] * int(n) + [1] for n in rng.integers(1, 60, 23)]
    buckets, read = (16, 32, 64), []

    def source():
        for ids in encoded:
            read.append(ids)
            yield ids

    stream = group_batches(7, source(), buckets=buckets, batch_size=4, parallelism=1, window=10)
    first = next(stream)
    assert len(read) == 10  # the first window went out before the rest of the group was read
    items = [first] + list(stream)
    assert isinstance(items[-1], GroupEnd) and items[-1] == GroupEnd(7, 23)
    batches = [b for b in items if isinstance(b, Batch)]
    for batch in batches:
        assert batch.group == 7 and batch.tokens.dtype == np.int32
        assert batch.tokens.shape == (rows_for(len(batch.rows), batch_size=4, parallelism=1),
                                      buckets[bisect.bisect_left(buckets, max(len(encoded[r]) for r in batch.rows))])
        for row, i in enumerate(batch.rows):
            assert list(batch.tokens[row, :len(encoded[i])]) == encoded[i]
            assert not batch.tokens[row, len(encoded[i]):].any()
        assert not batch.tokens[len(batch.rows):].any()  # padding rows stay zero
    got = sorted(list(map(int, b.rows)) for b in batches)
    want = sorted([int(m) + w for m in members]
                  for w in (0, 10, 20)
                  for members in plan_batches([len(ids) for ids in encoded[w:w + 10]], buckets=buckets,
                                              batch_size=4, parallelism=1))
    assert got == want  # each window planned alone; no batch spans two windows


def test_group_batches_rejects_an_input_longer_than_every_bucket():
    with pytest.raises(ValueError, match="input 2 has 70 tokens, more than the longest length bucket 64"):
        list(group_batches(0, [[1], [1], [5] * 69 + [1]], buckets=(16, 64), batch_size=4, parallelism=1))


def test_default_buckets_bound_the_padding():
    assert default_length_buckets(512) == (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
    assert default_length_buckets(100) == (16, 32, 48, 64, 80, 96, 100)
    assert default_length_buckets(8) == (8,)
    for max_length in (8, 100, 512, 1000, 4096):
        buckets = default_length_buckets(max_length)
        assert list(buckets) == sorted(set(buckets)) and buckets[-1] == max_length
        for n in range(1, max_length + 1):
            pad = buckets[bisect.bisect_left(buckets, n)] - n
            assert pad <= max(15, n / 4), (max_length, n, pad)
    assert len(default_length_buckets(4096)) == 8 + 4 * 5
