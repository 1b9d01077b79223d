"""Hamming range search over packed binary hashes (FAISS or our compiled MIH), its brute-force baseline.

FAISS's binary range_search keeps distances strictly below its radius, so every call here
passes radius + 1 and returns pairs with distance <= radius.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from math import comb

import numpy as np

from . import _mih
from .hashing import Hashes

METHODS = ("flat", "multihash", "mih")
_PROBE_COST = 16.0  # a bucket probe costs about as much as this many candidate distances
# Seconds per unit of each method's cost model, fitted on the 2-core reference machine at 1M
# 64-bit codes, radius 10 (benchmarks/results/dedup-cpu.txt: flat 743 s, FAISS multihash
# 4,954 s for 1M queries on a quiet machine; mih 105x faster than flat and 520x faster than
# multihash in one run under load, i.e. ~8 s). Only their ratios matter for choosing.
_FLAT_S_PER_DISTANCE = 7.4e-10
_MULTIHASH_S_PER_UNIT = 2.9e-7
_MIH_S_PER_UNIT = 1.1e-9
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
    multi-index hashing for 64-bit codes, ~500x faster than FAISS's at 1M codes, radius 10) or
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


# ---------------------------------------------------------------- search + verify + join

DENSE_MIN = 24  # images sharing one 16-bit substring bucket of whole-image hashes: a dense region
_DENSE_B = 16
_DENSE_TABLES = 4


@dataclass
class Links:
    """What `link` found, in the rows of the Hashes it was given.

    edges: (k, 2) joins (each verified, or raw with verify off); their union-find components
    are the near-duplicate clusters. near_j, near_d: each image's closest candidate seen (-1 /
    -1 when none) by search-hash distance, ties to the smaller rank. stats: candidates (pairs
    seen, repeats included), checks (signature checks), colour_rejected, representatives (dense
    images that queried in the collapse pass), queries (images in the batched search), phases
    (name -> (wall, CPU seconds of all threads): collapse, search, join).
    """

    edges: np.ndarray
    near_j: np.ndarray
    near_d: np.ndarray
    stats: dict


def _u64(packed: np.ndarray) -> np.ndarray:
    """Packed bytes (..., 8k) as (..., k) uint64 (byte order does not matter for Hamming)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    return packed.view("<u8").reshape(*packed.shape[:-1], packed.shape[-1] // 8)


def _tables(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-index tables of 64-bit codes: (tables, n) sorted codes and rows, (tables, 2^b+1) offsets."""
    from ._link import kernels

    return kernels()["sort_tables"](codes, np.arange(_DENSE_TABLES, dtype=np.int64), _DENSE_B)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _lap(phases: dict, name: str, since: tuple[float, float]) -> tuple[float, float]:
    """Record wall and CPU seconds (all threads) since `since` under phases[name]."""
    now = _clock()
    phases[name] = (now[0] - since[0], now[1] - since[1])
    return now


def link(h: Hashes, radius: int, method: str = "auto", *, flat_std: float, verify: bool = True,
         verify_radius: int = 20, chroma_tol: float = 12.0, rank: np.ndarray | None = None,
         dense_min: int | None = DENSE_MIN) -> Links:
    """Near-duplicate joins of the decodable, non-flat images of `h`, without quadratic work
    in a cluster.

    1. Collapse (64-bit search hashes): images whose whole-image hash falls into a bucket of
       >= dense_min (scaled up with n) in a 16-bit substring table are dense; densest first,
       each one not yet joined queries the tables itself and the candidates that verify
       against it join its cluster (`_link.leaders`). dense_min=None skips this pass.
    2. Batched range search (`range_pairs`, `method`) for every image not yet joined: each of
       its views against every whole-image hash (the views as queries: many queries share a
       bucket, so each scanned code is compared with many at once); each pair joins two
       clusters when they are not one yet and the pair verifies (`_link.link_pairs`).
    Verification: colour check, then the crop-tolerant 256-bit signature distance <= verify_radius.
    """
    from ._link import kernels

    k = kernels()
    phases: dict[str, tuple[float, float]] = {}
    clock = _clock()
    n_all, v, nbytes = h.bits.shape
    rows = np.nonzero(h.ok & (h.std >= flat_std))[0]
    n = len(rows)
    every = n == n_all  # no copy of the (1 KB an image) signatures when every row takes part
    rank = np.arange(n, dtype=np.int64) if rank is None else np.asarray(rank, np.int64)[rows]
    vsig = _u64(h.vsig if every else h.vsig[rows])
    chroma = np.ascontiguousarray(h.chroma[rows], np.float64)
    colorful = np.ascontiguousarray(h.colorful[rows])
    bits = h.bits if every else h.bits[rows]
    parent, size = np.arange(n, dtype=np.int64), np.ones(n, np.int64)
    done = np.zeros(n, bool)
    near_j, near_d = np.full(n, -1, np.int64), np.full(n, 1 << 30, np.int64)
    edges = np.empty((max(n, 1), 2), np.int64)
    stats = np.zeros(8, np.int64)
    st = np.array([verify_radius, chroma_tol, 1.0 if verify else 0.0])
    common = (st, vsig, chroma, colorful, rank, parent, size, done, near_d, near_j, edges, stats)
    if nbytes == 8 and dense_min is not None and n:
        views = _u64(bits)[..., 0]
        whole = np.ascontiguousarray(views[:, 0])
        wt = _tables(whole)
        counts = np.diff(wt[2], axis=1)
        keys = (whole[None, :] >> (np.arange(_DENSE_TABLES, dtype=np.uint64)[:, None] * np.uint64(_DENSE_B))
                ) & np.uint64((1 << _DENSE_B) - 1)
        per = np.take_along_axis(counts, keys.astype(np.int64), axis=1)  # (tables, n)
        thresh = max(dense_min, 8 * n // (1 << _DENSE_B))
        dense = np.nonzero(per.max(axis=0) >= thresh)[0]
        if len(dense):
            order = dense[np.lexsort((rank[dense], -per[:, dense].sum(axis=0)))]
            vt = _tables(views.ravel())
            f, rm = divmod(radius, _DENSE_TABLES)
            masks, masks_lo = _mih._flip_masks(_DENSE_B, f), _mih._flip_masks(_DENSE_B, f - 1)
            k["leaders"](order, whole, views, *vt, *wt, masks, masks_lo, _DENSE_B, f, rm, radius, *common)
            del vt
        del wt, counts, keys, per
    clock = _lap(phases, "collapse", clock)
    queries = np.nonzero(~done)[0]
    stats[5] = len(queries)
    if len(queries):  # every view of each such image against every whole-image hash
        qv = (bits if every and len(queries) == n else bits[queries]).reshape(len(queries) * v, nbytes)
        q, j, d = range_pairs(bits[:, 0], qv, radius, method)
        del qv
        clock = _lap(phases, "search", clock)
        i = queries[q // v]
        order = np.argsort(i * n + j, kind="stable")  # by (i, j): the join order does not depend on the search's
        k["link_pairs"](i[order], j[order], d[order].astype(np.int64), *common)
        clock = _lap(phases, "join", clock)
    e = edges[:stats[3]]
    nj = np.full(n_all, -1, np.int64)
    nd = np.full(n_all, -1, np.int64)
    seen = near_j >= 0
    nj[rows[seen]], nd[rows[seen]] = rows[near_j[seen]], near_d[seen]
    return Links(rows[e], nj, nd, {"candidates": int(stats[0]), "checks": int(stats[1]),
                                   "colour_rejected": int(stats[2]), "representatives": int(stats[4]),
                                   "queries": int(stats[5]), "phases": phases})
