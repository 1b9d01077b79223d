"""Exact Hamming range search over 64-bit codes by multi-index hashing, compiled with numba.

The code is cut into `nhash` substrings of `b` bits. Two codes within radius R have substring
distances d_0..d_{nhash-1} summing to <= R, so with f = R // nhash and rm = R % nhash some
substring is within f - 1 flips, or at least nhash * (f + 1) - R of them are at exactly f, and
then one of the first rm + 1 is (pigeonhole, refined): probing, per substring t, the buckets
within f flips (t <= rm) or f - 1 flips (t > rm) finds every pair exactly. At 64 bits, R = 10:
4 x 16 bits, 137 buckets in tables 0-2 and 17 in table 3 (428 probes instead of 548). Each table
keeps a copy of the codes sorted by its substring, so a bucket is a contiguous run; the queries
are grouped by their own substring key, and each group's probed buckets are gathered once into
one run that every query of the group scans with a vectorised XOR-popcount loop. A pair is
reported only from the first table where it qualifies, so there is no de-duplication pass.
FAISS's IndexBinaryMultiHash follows the same idea but spends ~1 us per probe on hash-map
lookups and candidate sets, which at crawl scale (1M codes, radius 10) is barely faster than
exhaustive search.
"""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

_MAX_B = 16  # substrings up to 16 bits: the bucket offsets of a table fit in L2 cache
_CHUNKS, _CAP = 256, 4096  # one-pass search: query-group chunks, pairs each may write
_SORT_AT_ONCE = 2  # tables sorted at once (one per thread; each holds a copy of the codes)


def params(n: int, radius: int) -> tuple[int, int, int]:
    """(nhash, b, nflip) minimising probes + expected candidates per query over n codes
    (nflip = radius // nhash: the flips probed in the first radius % nhash + 1 tables)."""
    return best(n, radius)[1:]


def table_flips(nhash: int, radius: int) -> list[int]:
    """Flips probed in each table (-1: none) under the refined pigeonhole (module docstring)."""
    f, rm = divmod(radius, nhash)
    return [f if t <= rm else f - 1 for t in range(nhash)]


def best(n: int, radius: int) -> tuple[float, int, int, int]:
    """(cost per query, nhash, b, nflip) of the cheapest parameters (see `params`)."""
    top = None
    for nhash in range(2, 65):
        b = min(_MAX_B, 64 // nhash)
        if b < 4:
            break
        probes = sum(comb(b, k) for fl in table_flips(nhash, radius) for k in range(fl + 1))
        cost = probes * (2.0 + n / 2.0 ** b)
        if top is None or cost < top[0]:
            top = (cost, nhash, b, radius // nhash)
    assert top is not None
    return top


def _flip_masks(b: int, nflip: int) -> np.ndarray:
    masks = [0] if nflip >= 0 else []
    for k in range(1, nflip + 1):
        for bits in combinations(range(b), k):
            masks.append(sum(1 << i for i in bits))
    return np.asarray(masks, dtype=np.uint64)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _join(kernels: dict, t: int, q: tuple, base: tuple, masks: np.ndarray, b: int, f: int, rm: int,
          radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One table: every chunk writes up to _CAP pairs in one pass; a chunk that found more is
    searched again into a buffer of its exact size."""
    ngroups = len(q[2]) - 1
    per = -(-ngroups // _CHUNKS)
    nch = -(-ngroups // per)
    chunks = np.arange(nch, dtype=np.int64)
    counts = np.zeros(nch, np.int64)
    out_q, out_i, out_d = np.empty(nch * _CAP, np.int64), np.empty(nch * _CAP, np.int64), np.empty(nch * _CAP, np.int32)
    kernels["mih_join"](t, *q, *base, masks, b, f, rm, radius, chunks, per, chunks * _CAP,
                        np.full(nch, _CAP, np.int64), counts, out_q, out_i, out_d)
    keep = (np.arange(_CAP)[None, :] < np.where(counts > _CAP, 0, counts)[:, None]).ravel()
    res = [out_q[keep], out_i[keep], out_d[keep]]
    over = np.nonzero(counts > _CAP)[0]
    if len(over):  # many pairs in a few chunks: redo those with room for all of them
        caps = counts[over]
        starts = np.concatenate([[0], np.cumsum(caps)[:-1]]).astype(np.int64)
        total = int(caps.sum())
        more = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int32)
        kernels["mih_join"](t, *q, *base, masks, b, f, rm, radius, over, per, starts, caps,
                            np.zeros(len(over), np.int64), *more)
        res = [np.concatenate([r, m]) for r, m in zip(res, more)]
    return res[0], res[1], res[2]


def range_search(base: np.ndarray, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query row, base row, distance <= radius) for (n, 8) uint8 packed 64-bit codes."""
    from . import _link  # numba is imported here, not when wvdata is

    k = _link.kernels()
    b64 = np.ascontiguousarray(base, dtype=np.uint8).view("<u8").ravel()
    q64 = np.ascontiguousarray(queries, dtype=np.uint8).view("<u8").ravel()
    nhash, b, _ = params(len(b64), radius)
    f, rm = divmod(radius, nhash)
    parts = []
    todo = [t for t, flips in enumerate(table_flips(nhash, radius)) if flips >= 0]
    for s in range(0, len(todo), _SORT_AT_ONCE):  # tables sorted in parallel, a few at a time
        tables = np.asarray(todo[s:s + _SORT_AT_ONCE], np.int64)
        bt, qt = k["sort_tables"](b64, tables, b), k["sort_tables"](q64, tables, b)
        for x, t in enumerate(tables):
            masks = _flip_masks(b, table_flips(nhash, radius)[t])
            parts.append(_join(k, int(t), (qt[0][x], qt[1][x], qt[2][x]), (bt[0][x], bt[1][x], bt[2][x]),
                               masks, b, f, rm, radius))
        del bt, qt
    if not parts:
        return tuple(np.zeros(0, np.int64) for _ in range(3))  # type: ignore[return-value]
    return tuple(np.concatenate([p[j] for p in parts]).astype(np.int64) for j in range(3))  # type: ignore[return-value]
