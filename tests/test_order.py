"""Epoch order and rank split: pure functions over plain arrays."""
from collections import Counter

import numpy as np
import pytest

from wvdata.stream.order import epoch_order, num_batches, rank_plan


def _shards(n_shards=10, per=7):
    return np.repeat(np.arange(n_shards), per)


def test_epoch_order_is_a_permutation_and_a_function_of_seed_and_epoch():
    ids = _shards()
    a = epoch_order(ids, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(len(ids)))
    assert np.array_equal(a, epoch_order(ids, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(ids, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(ids, seed=4, epoch=1))
    assert np.array_equal(epoch_order(ids, 3, 1, shuffle=False), np.arange(len(ids)))


def test_shuffle_keeps_shard_locality():
    ids = _shards(12, 5)
    order = epoch_order(ids, seed=0, epoch=0, window=3)
    for w in range(4):  # each block of 15 consecutive entries comes from exactly 3 shards
        assert len(set(ids[order[w * 15:(w + 1) * 15]])) == 3
    assert len(set(ids[order[:15]])) < len(set(ids[epoch_order(ids, 0, 0, window=12)[:15]]))


@pytest.mark.parametrize("n,world,bs", [(70, 3, 8), (64, 2, 8), (5, 4, 2), (1, 2, 4)])
def test_rank_split_covers_every_entry_with_equal_batches(n, world, bs):
    order = epoch_order(np.zeros(n, np.int64), 0, 0)
    plans = [rank_plan(order, r, world, bs) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    assert len(plans[0]) == num_batches(n, world, bs)
    seen = Counter(np.concatenate([p.positions for p in plans]).tolist())
    assert set(seen) == set(range(n))  # every entry at least once
    assert sum(seen.values()) - n < world  # padding repeats fewer than one entry per rank


def test_drop_last_gives_only_full_batches():
    order = np.arange(70)
    plans = [rank_plan(order, r, 3, 8, drop_last=True) for r in range(3)]
    assert all(len(p.positions) == 16 for p in plans) and num_batches(70, 3, 8, True) == 2
    assert len(set(np.concatenate([p.positions for p in plans]).tolist())) == 48
