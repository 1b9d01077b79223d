"""Hamming range search over packed binary hashes (FAISS or our compiled MIH), its brute-force baseline.

FAISS's binary range_search keeps distances strictly below its radius, so every call here
passes radius + 1 and returns pairs with distance <= radius.
"""
from __future__ import annotations

from math import comb

import numpy as np

from . import _mih
from .hashing import Hashes

METHODS = ("flat", "multihash", "mih")
_PROBE_COST = 16.0  # a bucket probe costs about as much as this many candidate distances
# Seconds per unit of each method's cost model, fitted on the 2-core reference machine at 1M
# 64-bit codes, radius 10 (benchmarks/results/dedup-cpu.txt: flat 743 s, FAISS multihash
# 4,954 s, mih 23.5 s for 1M queries). Only their ratios matter for choosing.
_FLAT_S_PER_DISTANCE = 7.4e-10
_MULTIHASH_S_PER_UNIT = 2.9e-7
_MIH_S_PER_UNIT = 2.5e-9
_MIH_START_S = 1.0  # loading the compiled kernels


def search_costs(n_base: int, n_queries: int, bits: int, radius: int) -> dict[str, float]:
    """Estimated seconds of each exact search method for these sizes (mih: 64-bit codes only)."""
    costs = {"flat": n_base * n_queries * _FLAT_S_PER_DISTANCE * bits / 64,
             "multihash": n_queries * _multihash_best(n_base, bits, radius)[0] * _MULTIHASH_S_PER_UNIT}
    if bits == 64 and _mih.available():
        costs["mih"] = _MIH_START_S + n_queries * _mih.best(n_base, radius)[0] * _MIH_S_PER_UNIT
    return costs


def choose_method(n_base: int, n_queries: int, bits: int, radius: int) -> str:
    """The cheapest method by `search_costs` (all of them give the same pairs)."""
    costs = search_costs(n_base, n_queries, bits, radius)
    return min(costs, key=costs.__getitem__)


def _multihash_best(n: int, bits: int, radius: int) -> tuple[float, int, int, int]:
    best = None
    for b in range(8, min(bits, 32) + 1):
        nhash = bits // b
        nflip = radius // nhash
        probes = sum(comb(b, k) for k in range(nflip + 1))
        cost = nhash * probes * (_PROBE_COST + n / 2.0 ** b)
        if best is None or cost < best[0]:
            best = (cost, nhash, b, nflip)
    assert best is not None
    return best


def multihash_params(n: int, bits: int, radius: int) -> tuple[int, int, int]:
    """(nhash, b, nflip) for IndexBinaryMultiHash that make a radius search exact and cheap.

    Pigeonhole: split the code into nhash disjoint b-bit substrings; two codes within
    `radius` agree to within floor(radius / nhash) bits on at least one of them, so probing
    every bucket within nflip = floor(radius / nhash) flips of each substring finds them all.
    Cost per query ~ nhash * probes * (probe cost + n / 2^b); pick the cheapest b.
    """
    return _multihash_best(n, bits, radius)[1:]


def range_pairs(base: np.ndarray, queries: np.ndarray, radius: int,
                method: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query row, base row, distance) with Hamming distance <= radius.

    base, queries: (n, bytes) uint8 packed codes. method: "flat" (FAISS exhaustive, on the GPU
    when faiss-gpu sees one), "multihash" (FAISS IndexBinaryMultiHash), "mih" (our compiled
    multi-index hashing for 64-bit codes, ~100x faster than FAISS's at 1M codes, radius 10) or
    "auto" (the cheapest by `search_costs`).
    """
    import faiss

    base = np.ascontiguousarray(base, dtype=np.uint8)
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    bits = base.shape[1] * 8
    if method == "auto":
        method = choose_method(len(base), len(queries), bits, radius)
    if len(base) == 0 or len(queries) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if method == "mih":
        if bits != 64:
            raise ValueError(f"method 'mih' searches 64-bit codes, these have {bits} bits")
        return _mih.range_search(base, queries, radius)
    if method == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif method == "multihash":
        nhash, b, nflip = multihash_params(len(base), bits, radius)
        index = faiss.IndexBinaryMultiHash(bits, nhash, b)
        index.nflip = nflip
    else:
        raise ValueError(f"unknown search method {method!r}")
    index.add(base)
    lims, dist, ids = index.range_search(queries, radius + 1)
    q = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
    return q, ids.astype(np.int64), dist.astype(np.int64)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def brute_force_pairs(base: np.ndarray, queries: np.ndarray, radius: int,
                      chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baseline a user would write: numpy XOR + popcount of every query against all."""
    b64 = np.ascontiguousarray(base).view(np.uint64)
    out_q, out_i, out_d = [], [], []
    for s in range(0, len(queries), chunk):
        q64 = np.ascontiguousarray(queries[s:s + chunk]).view(np.uint64)
        x = np.bitwise_xor(q64[:, None, :], b64[None, :, :])
        d = np.bitwise_count(x).sum(axis=2) if hasattr(np, "bitwise_count") else \
            _POPCOUNT[x.view(np.uint8)].sum(axis=2)
        qi, bi = np.nonzero(d <= radius)
        out_q.append(qi + s)
        out_i.append(bi)
        out_d.append(d[qi, bi])
    if not out_q:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return (np.concatenate(out_q).astype(np.int64), np.concatenate(out_i).astype(np.int64),
            np.concatenate(out_d).astype(np.int64))


def candidate_pairs(h: Hashes, radius: int, method: str, flat_std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (i < j, distance) pairs: whole-image hash of one within radius of a view of the other."""
    n, v, _ = h.bits.shape
    rows = np.nonzero(h.ok & (h.std >= flat_std))[0]
    base = h.bits[rows].reshape(len(rows) * v, -1)
    q, b, d = range_pairs(base, h.bits[rows, 0], radius, method)
    i, j = rows[q], rows[b // v]
    keep = i != j
    i, j, d = i[keep], j[keep], d[keep]
    a, c = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((d, c, a))
    a, c, d = a[order], c[order], d[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (c[1:] != c[:-1])
    return a[first], c[first], d[first]
