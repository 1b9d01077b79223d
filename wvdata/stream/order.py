"""Epoch order of a view's entries: a pure function of (seed, epoch), split evenly over ranks.

Shuffling keeps shard locality: the shard order is shuffled, then entries are shuffled within
consecutive windows of `window` shards, so a reader touches few shards at a time. Kept free of
torch so it is unit-tested on plain arrays.

Curriculum quota batches are another epoch order (`quota_order`: every global batch holds fixed
counts of entries from curriculum subsets 1, 2, 3, ...) with its own rank split
(`quota_rank_plan`: each rank's batch b holds its share of global batch b).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_order(shard_ids: np.ndarray, seed: int, epoch: int, shuffle: bool = True,
                window: int = 4) -> np.ndarray:
    """A permutation of entry positions for one epoch (identity when not shuffling)."""
    n = len(shard_ids)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x77DA7A])
    # entries grouped by shard, in position order within each: no sort where they already are
    # (a split, a written view) and a count per shard id instead of a unique (16M entries: ~1 s)
    counts = np.bincount(shard_ids) if n else np.zeros(0, np.int64)
    shards = np.flatnonzero(counts)
    if n and (shard_ids[1:] >= shard_ids[:-1]).all():
        by_shard = np.arange(n, dtype=np.int64)
    else:
        by_shard = np.argsort(shard_ids, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)])
    rng.shuffle(shards)
    starts, ends = first[shards], first[shards + 1]
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


# ---------------------------------------------------------------- curriculum quota batches


def parse_quota(quota: str | Sequence[int]) -> tuple[int, ...]:
    """'128,64,64' (or a sequence) -> (128, 64, 64): entries per global batch from subsets 1, 2, 3, ..."""
    try:
        q = tuple(int(x) for x in (quota.split(",") if isinstance(quota, str) else quota))
    except ValueError:
        raise ValueError(f"bad batch quota {quota!r}: expected counts like 128,64,64") from None
    if not q or min(q) < 0 or q[0] == 0:
        raise ValueError(f"bad batch quota {quota!r}: counts >= 0, and subset 1's > 0 (it defines the epoch)")
    return q


def share_quota(quota: Sequence[int], sizes: Sequence[int]) -> tuple[int, ...]:
    """The quota of the subsets that have entries: a subset with none (e.g. subset 3 in a curriculum
    stage "1+2") gives its share to the others in proportion to theirs (largest remainder), so the
    batch size stays sum(quota)."""
    total = sum(quota)
    if len(sizes) > len(quota):
        raise ValueError(f"the view has entries in subset {len(sizes)} but the batch quota {tuple(quota)} "
                         f"covers subsets 1-{len(quota)}")
    sizes = list(sizes) + [0] * (len(quota) - len(sizes))
    if not sizes[0]:
        raise ValueError("quota batches need subset-1 entries (subset 1 defines the epoch); the view has none")
    kept = np.array([q if n else 0 for q, n in zip(quota, sizes)], dtype=np.float64)
    if not kept.sum():
        kept[0] = 1
    exact = kept * total / kept.sum()
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[:total - out.sum()]] += 1
    return tuple(int(x) for x in out)


def quota_batches(n_first: int, q_first: int, drop_last: bool = False) -> int:
    """Global batches in a quota epoch: ceil(|S1| / q1) (floor with drop_last)."""
    return n_first // q_first if drop_last else -(-n_first // q_first)


def quota_order(groups: np.ndarray, labels: np.ndarray, quota: Sequence[int], seed: int, epoch: int,
                drop_last: bool = False) -> np.ndarray:
    """One epoch of curriculum quota batches, batch-major: global batch b is
    `order[b * Q:(b + 1) * Q]` (Q = sum(quota)) and holds quota[0] entries of group 0 (subset 1),
    then quota[1] of group 1, and so on.

    groups: each entry's group (subset - 1). Group 0 defines the epoch: ceil(|S1| / q1) batches
    in which every group-0 entry appears once (the last batch topped up with seeded repeats of
    group-0 entries; with drop_last the remainder is skipped instead), one entry per class in a
    batch, the classes drawn at random weighted by what each has left (see `_balanced_batches`).
    The other groups are drawn in order from seeded permutations that cycle across epochs:
    epoch e takes entries [e * nb * q, (e + 1) * nb * q) of that endless stream.
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    quota = [int(q) for q in quota]
    first = np.flatnonzero(groups == 0)
    nb = quota_batches(len(first), quota[0], drop_last)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x9C0A7A])
    if nb == 0:
        return np.zeros(0, np.int64)
    pool = rng.permutation(first)
    need = nb * quota[0]
    if need > len(pool):  # top up the last batch with repeats (never more than q1 - 1)
        pool = np.concatenate([pool, rng.choice(first, need - len(pool), replace=need - len(pool) > len(first))])
    parts = [_balanced_batches(pool[:need], labels[pool[:need]], nb, quota[0], rng)]
    for g, q in enumerate(quota[1:], start=1):
        members = np.flatnonzero(groups == g)
        if q and not len(members):
            raise ValueError(f"the batch quota asks {q} entries of subset {g + 1} per batch, but it has none")
        parts.append(_cycled(members, seed, g, epoch * nb * q, nb * q).reshape(nb, q))
    batches = np.concatenate(parts, axis=1)
    return batches[rng.permutation(nb)].reshape(-1)


def _cycled(members: np.ndarray, seed: int, group: int, start: int, count: int) -> np.ndarray:
    """Entries [start, start + count) of the endless stream perm(0) ++ perm(1) ++ ... of `members`."""
    n = len(members)
    if count == 0:
        return np.zeros(0, np.int64)
    out = []
    for cycle in range(start // n, (start + count - 1) // n + 1):
        perm = members[np.random.default_rng([int(seed) & 0xFFFFFFFF, group, cycle, 0xC7C1E]).permutation(n)]
        lo, hi = max(start - cycle * n, 0), min(start + count - cycle * n, n)
        out.append(perm[lo:hi])
    return np.concatenate(out)


def _balanced_batches(pool: np.ndarray, labels: np.ndarray, nb: int, q: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Deal `pool` (nb * q entries) into nb batches of q with no class twice in a batch.

    Greedy over batches: a class whose remaining entries equal the remaining batches must be
    taken (else it could not finish); the rest of the q classes are drawn without replacement,
    weighted by their remaining entries (Gumbel top-k). That invariant keeps every later batch
    feasible. A class with more than nb entries cannot avoid repeats: it is split into
    ceil(c / nb) parts, each scheduled as a class, so it appears at most that often per batch.
    """
    order = np.lexsort((rng.random(len(pool)), labels))  # by class, shuffled within
    pool, labels = pool[order], labels[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    sizes = np.diff(np.r_[starts, len(pool)])
    parts = -(-sizes // nb)  # virtual classes per class
    v_class = np.repeat(np.arange(len(sizes)), parts)
    v_index = np.arange(len(v_class)) - np.repeat(np.cumsum(parts) - parts, parts)
    v_parts = parts[v_class]
    base, extra = sizes[v_class] // v_parts, sizes[v_class] % v_parts
    v_size = base + (v_index < extra)
    v_start = starts[v_class] + v_index * base + np.minimum(v_index, extra)
    left = v_size.astype(np.int64)
    out = np.empty((nb, q), dtype=np.int64)
    for b in range(nb):
        forced = np.flatnonzero(left == nb - b)
        keys = np.where(left > 0, np.log(np.maximum(left, 1)) - np.log(-np.log(rng.random(len(left)))), -np.inf)
        keys[forced] = np.inf
        pick = np.argpartition(-keys, q - 1)[:q] if q < len(keys) else np.arange(len(keys))
        taken = v_start[pick] + (v_size[pick] - left[pick])
        left[pick] -= 1
        out[b] = pool[taken]
    return out


def quota_rank_plan(order: np.ndarray, rank: int, world_size: int, batch_size: int) -> RankPlan:
    """This rank's share of a batch-major quota order: batch b of rank r holds entries r, r + W, ...
    of global batch b, so each rank gets its share of every subset's quota (q / W, +-1 where W
    does not divide q) and every rank the same number of batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    width = world_size * batch_size
    if len(order) % width:
        raise ValueError(f"a quota order of {len(order)} entries is not whole batches of {width}")
    return RankPlan(order.reshape(-1, width)[:, rank::world_size].reshape(-1), batch_size)
