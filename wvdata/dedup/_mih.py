"""Exact Hamming range search over 64-bit codes by multi-index hashing, compiled with numba.

The code is cut into `nhash` substrings of `b` bits; two codes within radius R agree to within
nflip = floor(R / nhash) bits on at least one substring (pigeonhole), so probing, for every
query and substring, the buckets within nflip flips finds every pair exactly. Each table keeps
a copy of the codes sorted by its substring, so a bucket is a contiguous run: probes stay in
cache and candidates stream. A pair is reported only from the first table where it qualifies,
so there is no de-duplication pass. FAISS's IndexBinaryMultiHash follows the same idea but
spends ~1 us per probe on hash-map lookups and candidate sets, which at crawl scale (1M codes,
radius 10) is barely faster than exhaustive search.
"""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

_MAX_B = 16  # substrings up to 16 bits: the bucket offsets of a table fit in L2 cache
_CHUNKS, _CAP = 256, 4096  # one-pass search: query-group chunks, pairs each may write


def params(n: int, radius: int) -> tuple[int, int, int]:
    """(nhash, b, nflip) minimising probes + expected candidates per query over n codes."""
    return best(n, radius)[1:]


def best(n: int, radius: int) -> tuple[float, int, int, int]:
    """(cost per query, nhash, b, nflip) of the cheapest parameters (see `params`)."""
    top = None
    for nhash in range(2, 65):
        b = min(_MAX_B, 64 // nhash)
        if b < 4:
            break
        nflip = radius // nhash
        probes = nhash * sum(comb(b, k) for k in range(nflip + 1))
        cost = probes * (2.0 + n / 2.0 ** b)
        if top is None or cost < top[0]:
            top = (cost, nhash, b, nflip)
    assert top is not None
    return top


def _flip_masks(b: int, nflip: int) -> np.ndarray:
    masks = [0]
    for k in range(1, nflip + 1):
        for bits in combinations(range(b), k):
            masks.append(sum(1 << i for i in bits))
    return np.asarray(masks, dtype=np.uint64)


def _kernels():
    from . import _link  # numba is imported here, not when wvdata is

    k = _link.kernels()
    return k["mih_search"], k["mih_search_once"]


_SEARCH = None


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _table(codes: np.ndarray, t: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes sorted by substring t, their original rows, and bucket offsets."""
    keys = (codes >> np.uint64(t * b)) & np.uint64((1 << b) - 1)
    order = np.argsort(keys, kind="stable")
    offsets = np.zeros((1 << b) + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(keys, minlength=1 << b))
    return np.ascontiguousarray(codes[order]), order.astype(np.int64), offsets


def range_search(base: np.ndarray, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query row, base row, distance <= radius) for (n, 8) uint8 packed 64-bit codes."""
    global _SEARCH
    if _SEARCH is None:
        _SEARCH = _kernels()
    search, once = _SEARCH
    b64 = np.ascontiguousarray(base, dtype=np.uint8).view("<u8").ravel()
    q64 = np.ascontiguousarray(queries, dtype=np.uint8).view("<u8").ravel()
    nhash, b, nflip = params(len(b64), radius)
    masks = _flip_masks(b, nflip)
    parts = []
    for t in range(nhash):
        bs, bi, bo = _table(b64, t, b)
        qs, qi, qo = _table(q64, t, b)
        counts = np.zeros(_CHUNKS, np.int64)
        out_q, out_i = np.empty(_CHUNKS * _CAP, np.int64), np.empty(_CHUNKS * _CAP, np.int64)
        out_d = np.empty(_CHUNKS * _CAP, np.int32)
        once(t, qs, qi, qo, bs, bi, bo, masks, b, nflip, radius, counts, out_q, out_i, out_d, _CAP)
        if counts.max() <= _CAP:  # the usual case: one pass
            keep = (np.arange(_CAP)[None, :] < counts[:, None]).ravel()
            parts.append((out_q[keep], out_i[keep], out_d[keep]))
            continue
        counts = np.zeros(len(qo) - 1, np.int64)  # many pairs: count per group, then fill
        none_i, none_d = np.zeros(0, np.int64), np.zeros(0, np.int32)
        search(t, qs, qi, qo, bs, bi, bo, masks, b, nflip, radius, counts, none_i, none_i, none_d, False)
        starts = np.zeros(len(counts), np.int64)
        starts[1:] = np.cumsum(counts)[:-1]
        total = int(counts.sum())
        out_q, out_i, out_d = np.zeros(total, np.int64), np.zeros(total, np.int64), np.zeros(total, np.int32)
        search(t, qs, qi, qo, bs, bi, bo, masks, b, nflip, radius, starts, out_q, out_i, out_d, True)
        parts.append((out_q, out_i, out_d))
    return tuple(np.concatenate([p[j] for p in parts]).astype(np.int64) for j in range(3))
