"""runtime/batching.py: the length-grouped training order (deterministic for a seed, every example once per
epoch, the same count on every rank) and the evaluation batches (every example, within the token budget).
The resume through a real 2-rank run: tests/e2e/test_e2e.py::test_group_by_length_resumes_mid_epoch."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from infoprompt_ds.runtime.batching import eval_batches, length_grouped_batches, lengths_of, padding_fraction
from infoprompt_ds.runtime.distributed import shard_batches, train_batches


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def test_same_seed_and_epoch_same_order_and_another_epoch_another():
    lengths = _lengths(300)
    a = length_grouped_batches(lengths, 8, 2, 1, seed=42, epoch=3)
    assert a == length_grouped_batches(list(lengths), 8, 2, 1, seed=42, epoch=3)  # a pure function: resumable
    assert a != length_grouped_batches(lengths, 8, 2, 1, seed=42, epoch=4)
    assert a != length_grouped_batches(lengths, 8, 2, 1, seed=43, epoch=3)


@pytest.mark.parametrize("n,batch,world", [(128, 16, 1), (300, 8, 2), (33, 8, 2), (7, 4, 3), (1, 4, 2)])
def test_every_example_once_per_epoch_and_the_same_count_on_every_rank(n, batch, world):
    lengths = _lengths(n, seed=n)
    per_rank = [length_grouped_batches(lengths, batch, world, r, seed=0, epoch=1) for r in range(world)]
    micro_per_epoch = math.ceil(math.ceil(n / world) / batch)  # prepare.plan_steps: what the loop expects
    assert all(len(b) == micro_per_epoch for b in per_rank)
    for step in range(micro_per_epoch):  # a step's micro-batches are the same size on every rank
        assert len({len(b[step]) for b in per_rank}) == 1
    seen = Counter(i for b in per_rank for batch_ in b for i in batch_)
    assert set(seen) == set(range(n))
    extra = math.ceil(n / world) * world - n  # DistributedSampler's padding, as in the default order
    assert sum(seen.values()) == n + extra and (extra or max(seen.values()) == 1)


def test_grouped_batches_pad_less_and_start_with_the_longest():
    lengths = _lengths(1000, seed=1)
    grouped = length_grouped_batches(lengths, 16, 1, 0, seed=0, epoch=0)
    plain = shard_batches(len(lengths), 16, 1, 0, True, 0, 0)
    assert padding_fraction(lengths, grouped) < 0.5 * padding_fraction(lengths, plain)
    assert max(lengths) in [lengths[i] for i in grouped[0]]
    # shuffled at the batch level: the batches are not in length order
    firsts = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_train_batches_default_is_the_distributed_sampler_order():
    lengths = _lengths(50)
    split = [{"input_ids": [0] * n} for n in lengths]
    assert train_batches(split, 8, 2, 1, 5, 2, False) == shard_batches(50, 8, 2, 1, True, 5, 2)
    assert train_batches(split, 8, 2, 1, 5, 2, True) == length_grouped_batches(lengths, 8, 2, 1, 5, 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_the_split_within_the_budget(world):
    lengths = _lengths(203, seed=world)
    per_rank = [eval_batches(lengths, 16, world, r, extra=4) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forwards (ZeRO-3)
    assert {i for b in per_rank for batch in b for i in batch} == set(range(203))
    budget = 16 * (max(lengths) + 4)
    for batch in (batch for b in per_rank for batch in b):
        assert len(batch) * (max(lengths[i] for i in batch) + 4) <= budget
    assert len(per_rank[0]) < math.ceil(203 / world / 16)  # short examples go many to a batch
    plain = shard_batches(203, 16, world, 0, False, 0, 0)  # the order eval used before: the split's
    assert padding_fraction(lengths, per_rank[0]) < 0.5 * padding_fraction(lengths, plain)


def test_lengths_of_a_dataset_reads_the_arrow_column():
    datasets = pytest.importorskip("datasets")
    rows = [[1] * n for n in (3, 1, 5)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": [0, 1, 0]}).select([2, 0])  # an index mapping
    assert lengths_of(ds) == [5, 3]
    assert lengths_of([{"input_ids": r} for r in rows]) == [3, 1, 5]
