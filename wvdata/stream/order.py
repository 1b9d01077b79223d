"""Epoch order of a view's entries: a pure function of (seed, epoch), split evenly over ranks.

Shuffling keeps shard locality: the shard order is shuffled, then entries are shuffled within
consecutive windows of `window` shards, so a reader touches few shards at a time. Kept free of
torch so it is unit-tested on plain arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_order(shard_ids: np.ndarray, seed: int, epoch: int, shuffle: bool = True,
                window: int = 4) -> np.ndarray:
    """A permutation of entry positions for one epoch (identity when not shuffling)."""
    n = len(shard_ids)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x77DA7A])
    shards = np.unique(shard_ids)
    rng.shuffle(shards)
    by_shard = np.argsort(shard_ids, kind="stable")
    starts = np.searchsorted(shard_ids[by_shard], shards)
    ends = np.searchsorted(shard_ids[by_shard], shards, side="right")
    out = []
    for w in range(0, len(shards), max(1, window)):
        chunk = np.concatenate([by_shard[s:e] for s, e in zip(starts[w:w + window], ends[w:w + window])])
        rng.shuffle(chunk)
        out.append(chunk)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of an epoch: entry positions, cut into batches of `batch_size`."""

    positions: np.ndarray
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def batch(self, i: int) -> np.ndarray:
        return self.positions[i * self.batch_size:(i + 1) * self.batch_size]


def rank_plan(order: np.ndarray, rank: int, world_size: int, batch_size: int,
              drop_last: bool = False) -> RankPlan:
    """Contiguous share of `order` for `rank`; every rank gets the same number of batches.

    Without drop_last the order is padded by repeating its first entries until it divides
    evenly, so all entries are seen and nobody waits at the end; with drop_last each rank gets
    only full batches and the remainder (< world_size * batch_size entries) is skipped.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    n = len(order)
    if drop_last:
        per_rank = (n // (world_size * batch_size)) * batch_size
    else:
        per_rank = -(-n // world_size)
        if n and per_rank * world_size > n:
            reps = -(-(per_rank * world_size) // n)
            order = np.tile(order, reps)[:per_rank * world_size]
    return RankPlan(order[rank * per_rank:(rank + 1) * per_rank], batch_size)


def num_batches(n: int, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per rank for a view of n entries."""
    if drop_last:
        return n // (world_size * batch_size)
    per_rank = -(-n // world_size)  # ceil: ranks are padded to equal length
    return -(-per_rank // batch_size)
