"""Per-class density kernels of `wvdata curriculum` (CurriculumNet): the exact blocked density,
its anchored nearest-neighbour approximation (FAISS on a GPU) and exact 1-D k-means.

Exact density (the reference): Euclidean distances between a class's features; cut-off d_c =
the `density_t` quantile (lower value: element floor(t * (m - 1)) of the m = n(n-1)/2 sorted
pair distances); rho_i = #{j != i : d_ij < d_c}. Never holds the n x n matrix: distances come
in blocks of BLOCK x BLOCK from float64 Gram products of the centred features (so they match a
direct float64 computation to ~1e-12 relative), the upper triangle only, counted by a compiled
kernel. d_c uses all pairs up to ALL_PAIRS_MAX samples, in one pass where possible (the pairs
in a narrow band around d_c, placed by a sample of pairs, are collected while the pairs below
it are counted; see `pair_quantile`); above, d_c is the same quantile of PAIR_SAMPLE seeded
random pairs and one pass counts.

The `knn` density is the same ball count measured against a seeded sample of anchors (see
`knn_density`); the subsets come from optimal 1-D k-means on the densities (`kmeans_1d`).
"""
from __future__ import annotations

import math

import numba
import numpy as np

ALL_PAIRS_MAX = 20_000  # exact d_c from all n(n-1)/2 pairs up to this class size, sampled above
PAIR_SAMPLE = 1 << 22  # sampled pairs for d_c above ALL_PAIRS_MAX (quantile rank error ~2e-4)
BAND_SAMPLE = 1 << 18  # sampled pairs that place the band of pairs collected around an exact d_c
BLOCK = 1024
ANCHORS = 2048  # knn: anchors per class (FAISS GPU k-NN searches up to k = 2048)
KNN_ALL_PAIRS_MAX = 4096  # knn: exact d_c up to this class size
KNN_PAIR_SAMPLE = 1 << 20  # knn: sampled pairs for d_c above it
_BINS = 1 << 16
_COLLECT_MAX = 1 << 24  # pairs in d_c's bin collected at once; a fuller bin is split again


# ---------------------------------------------------------------- compiled kernels


@numba.njit(cache=True, nogil=True)
def _hist_kernel(g, sq_r, sq_c, diag, lo, scale, hist):  # pragma: no cover - compiled
    nb = hist.shape[0]
    for i in range(g.shape[0]):
        j0 = i + 1 if diag else 0
        for j in range(j0, g.shape[1]):
            b = math.floor((max(sq_r[i] + sq_c[j] - 2.0 * g[i, j], 0.0) - lo) * scale)
            if 0 <= b < nb:
                hist[b] += 1


@numba.njit(cache=True, nogil=True)
def _collect_kernel(g, sq_r, sq_c, r0, c0, diag, lo, scale, b_cut, below, out_i, out_j, out_d, n_out):
    """Pairs in bin b_cut (the same arithmetic as _hist_kernel) collected; pairs in lower bins counted."""
    k = n_out
    for i in range(g.shape[0]):
        j0 = i + 1 if diag else 0
        for j in range(j0, g.shape[1]):
            d = max(sq_r[i] + sq_c[j] - 2.0 * g[i, j], 0.0)
            b = math.floor((d - lo) * scale)
            if b < b_cut:
                below[r0 + i] += 1
                below[c0 + j] += 1
            elif b == b_cut and k < out_d.shape[0]:
                out_i[k], out_j[k], out_d[k] = r0 + i, c0 + j, d
                k += 1
    return k


@numba.njit(cache=True, nogil=True)
def _count_kernel(g, sq_r, sq_c, r0, c0, diag, cut, counts, cols):  # pragma: no cover - compiled
    """Pairs of the block closer than cut, added to both ends (branch-free inner loop)."""
    m = g.shape[1]
    cols[:m] = 0
    for i in range(g.shape[0]):
        j0 = i + 1 if diag else 0
        c = 0
        for j in range(j0, m):
            h = 1 if max(sq_r[i] + sq_c[j] - 2.0 * g[i, j], 0.0) < cut else 0
            c += h
            cols[j] += h
        counts[r0 + i] += c
    for j in range(m):
        counts[c0 + j] += cols[j]


@numba.njit(cache=True, nogil=True)
def _count_rows_kernel(g, sq_r, sq_c, cut, counts):  # pragma: no cover - compiled
    """Per row of a float32 block g = -2 x_r . x_c, the columns closer than cut (vectorised)."""
    for i in range(g.shape[0]):
        c = 0
        for j in range(g.shape[1]):
            c += 1 if sq_r[i] + sq_c[j] + g[i, j] < cut else 0
        counts[i] += c


# ---------------------------------------------------------------- exact density


def _blocks(x: np.ndarray, sq: np.ndarray, block: int):
    """(row start, col start, diagonal?, Gram block) over the upper triangle of block pairs."""
    n = len(x)
    for r0 in range(0, n, block):
        xr = x[r0:r0 + block]
        for c0 in range(r0, n, block):
            yield r0, c0, r0 == c0, xr @ x[c0:c0 + block].T


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    return x, np.einsum("ij,ij->i", x, x)


def _collect(x: np.ndarray, sq: np.ndarray, lo: float, scale: float, b: int, cap: int, block: int):
    """One pass: per-sample counts of pairs in bins < b, and the pairs of bin b (at most cap)."""
    n = len(x)
    below = np.zeros(n, np.int64)
    out_i, out_j, out_d = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.float64)
    k = 0
    for r0, c0, diag, g in _blocks(x, sq, block):
        k = _collect_kernel(g, sq[r0:r0 + len(g)], sq[c0:c0 + g.shape[1]], r0, c0, diag, lo, scale, b, below,
                            out_i, out_j, out_d, k)
    return below, out_i[:k], out_j[:k], out_d[:k]


def _select(n: int, target: int, below, out_i, out_j, out_d) -> tuple[float, np.ndarray] | None:
    """d_c^2 = the target-th pair distance and rho, if it lies among the collected pairs."""
    rank = target - int(below.sum()) // 2
    if not 0 <= rank < len(out_d):
        return None
    cut = float(np.partition(out_d, rank)[rank])
    hit = out_d < cut
    return cut, below + np.bincount(out_i[hit], minlength=n) + np.bincount(out_j[hit], minlength=n)


def pair_quantile(x: np.ndarray, t: float, block: int = BLOCK, seed: int = 0) -> tuple[float, np.ndarray]:
    """Exact squared cut-off over all pairs and the counts below it: (d_c^2, rho).

    Usually one pass: a band around d_c^2 from BAND_SAMPLE sampled pairs (6 standard errors of
    the sample quantile either side) is collected while the pairs below it are counted. Where d_c
    falls outside the band or the band is too full (many equal distances), a histogram of all
    pair distances locates d_c's bin first (refined while the bin is too full), then one more
    pass collects that bin."""
    x, sq = _centred(x)
    n = len(x)
    m = n * (n - 1) // 2
    target = int(np.floor(t * (m - 1)))  # rank of d_c^2 among the m sorted pair distances
    if m > 4 * BAND_SAMPLE:
        d = np.sort(_pair_sample(x, BAND_SAMPLE, seed))
        w = 6 * np.sqrt(t * (1 - t) / BAND_SAMPLE)
        lo = float(d[int(max(t - w, 0) * (len(d) - 1))]) * (1 - 1e-6)
        hi = float(d[int(min(t + w, 1) * (len(d) - 1))]) * (1 + 1e-6)
        if lo < hi:
            cap = int(min(m, 3 * 2 * w * m + 1024, _COLLECT_MAX))
            found = _collect(x, sq, lo, 1 / (hi - lo), 0, cap, block)
            res = _select(n, target, *found) if len(found[3]) < cap else None
            if res is not None:
                return res
    lo, hi = 0.0, float(4 * sq.max()) * (1 + 1e-6) + 1e-300  # |x_i - x_j|^2 <= 4 max |x|^2 (centred)
    skipped = 0  # pairs below lo
    while True:
        scale = _BINS / (hi - lo)
        hist = np.zeros(_BINS, np.int64)
        for r0, c0, diag, g in _blocks(x, sq, block):
            _hist_kernel(g, sq[r0:r0 + len(g)], sq[c0:c0 + g.shape[1]], diag, lo, scale, hist)
        cum = np.cumsum(hist) + skipped
        b = min(int(np.searchsorted(cum, target, side="right")), _BINS - 1)
        b_lo, b_hi = lo + b / scale, lo + (b + 1) / scale
        if hist[b] <= _COLLECT_MAX or not lo < b_lo < b_hi < hi or b_hi - b_lo <= 1e-12 * b_hi:
            break  # a bin too full is split again (degenerate data: many equal distances)
        lo, hi, skipped = b_lo, b_hi, int(cum[b] - hist[b])
    below, out_i, out_j, out_d = _collect(x, sq, lo, scale, b, int(min(hist[b], _COLLECT_MAX)) + 1, block)
    res = _select(n, target, below, out_i, out_j, out_d)
    if res is None:  # a bin split on float edges: take its nearest collected value
        rank = min(max(target - int(below.sum()) // 2, 0), max(len(out_d) - 1, 0))
        cut = float(np.partition(out_d, rank)[rank]) if len(out_d) else b_lo
        hit = out_d < cut
        res = cut, below + np.bincount(out_i[hit], minlength=n) + np.bincount(out_j[hit], minlength=n)
    return res


def _pair_sample(x: np.ndarray, pairs: int, seed: int = 0) -> np.ndarray:
    """Squared distances (float32) of `pairs` seeded random pairs i != j."""
    x = np.asarray(x, dtype=np.float32)  # the sample's own error (~2e-4 in rank) dwarfs float32's
    n = len(x)
    rng = np.random.default_rng([seed, n, 0xD5])
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # uniform over the other samples
    d = np.empty(pairs, np.float32)
    step = 1 << 14
    for s in range(0, pairs, step):
        diff = x[i[s:s + step]] - x[j[s:s + step]]
        d[s:s + step] = np.einsum("ij,ij->i", diff, diff)
    return d


def sampled_cutoff(x: np.ndarray, t: float, pairs: int = PAIR_SAMPLE, seed: int = 0) -> float:
    """The squared cut-off as the same quantile of `pairs` seeded random pairs (i != j)."""
    r = int(np.floor(t * (pairs - 1)))
    return float(np.partition(_pair_sample(x, pairs, seed), r)[r])


def count_below(x: np.ndarray, cut: float, block: int = BLOCK) -> np.ndarray:
    """rho_i = #{j != i : |x_i - x_j|^2 < cut}, over the upper triangle in blocks."""
    x, sq = _centred(x)
    counts, cols = np.zeros(len(x), np.int64), np.zeros(block, np.int64)
    for r0, c0, diag, g in _blocks(x, sq, block):
        _count_kernel(g, sq[r0:r0 + len(g)], sq[c0:c0 + g.shape[1]], r0, c0, diag, cut, counts, cols)
    return counts


def exact_density(x: np.ndarray, t: float = 0.6, seed: int = 0, all_pairs_max: int = ALL_PAIRS_MAX,
                  block: int = BLOCK) -> tuple[np.ndarray, float]:
    """(rho, d_c) of one class: exact over all pairs up to `all_pairs_max` samples, else d_c sampled."""
    n = len(x)
    if n < 2:
        return np.zeros(n, np.int64), 0.0
    if n <= all_pairs_max:
        cut, rho = pair_quantile(x, t, block, seed)
    else:
        cut = sampled_cutoff(x, t, seed=seed)
        rho = count_below(x, cut, block)
    return rho, float(np.sqrt(max(cut, 0.0)))


# ---------------------------------------------------------------- anchored nearest-neighbour density


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 without faiss-gpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn_density(x: np.ndarray, t: float = 0.6, anchors: int = ANCHORS, seed: int = 0,
                search: str = "auto") -> tuple[np.ndarray, float]:
    """(rho estimate, d_c): the exact density's ball count at d_c, measured against `anchors` seeded
    samples of the class instead of all n: rho_i = (n - 1) x (anchors within d_c) / (other anchors).

    O(n x anchors) instead of O(n^2). search "faiss": the anchors are a FAISS flat index, each
    sample's k-nearest-neighbour search over all of them (k = anchors <= 2048) on the GPU with
    faiss-gpu, a range search at d_c on the CPU; "blas": a float32 BLAS product and a compiled
    count (on the CPU 2.6x faster than FAISS's range search, benchmarks/curriculum_bench.py);
    "auto": faiss on a GPU, else blas. d_c: exact over all pairs up to KNN_ALL_PAIRS_MAX samples,
    else from KNN_PAIR_SAMPLE random pairs. With n <= anchors every sample is an anchor and rho
    is the exact count (float32 distances)."""
    if search not in ("auto", "faiss", "blas"):
        raise ValueError(f"unknown search {search!r}; use auto, faiss or blas")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        return np.zeros(n), 0.0
    cut = pair_quantile(x, t)[0] if n <= KNN_ALL_PAIRS_MAX else sampled_cutoff(x, t, KNN_PAIR_SAMPLE, seed)
    rng = np.random.default_rng([seed, n, 0xA7])
    a = np.arange(n) if n <= anchors else np.sort(rng.choice(n, anchors, replace=False))
    xc = x - x.mean(0)
    counts = np.zeros(n, np.int64)
    step = 8192
    gpu = faiss_gpus() > 0
    if search == "faiss" or (search == "auto" and gpu):
        import faiss

        index = faiss.IndexFlatL2(x.shape[1])
        index = faiss.index_cpu_to_all_gpus(index) if gpu else index
        index.add(xc[a])
        for s in range(0, n, step):
            if gpu:
                d, _ = index.search(xc[s:s + step], len(a))
                counts[s:s + step] = (d < cut).sum(1)
            else:
                counts[s:s + step] = np.diff(index.range_search(xc[s:s + step], cut)[0])
    else:
        xa = xc[a]
        sq, sqa, xa2 = np.einsum("ij,ij->i", xc, xc), np.einsum("ij,ij->i", xa, xa), np.float32(-2) * xa.T
        for s in range(0, n, step):
            _count_rows_kernel(xc[s:s + step] @ xa2, sq[s:s + step], sqa, np.float32(cut), counts[s:s + step])
    is_anchor = np.zeros(n, bool)
    is_anchor[a] = True
    counts = np.maximum(counts - is_anchor, 0)  # itself, at distance ~0
    return counts * ((n - 1) / (len(a) - is_anchor)), float(np.sqrt(max(cut, 0.0)))


# ---------------------------------------------------------------- 1-D k-means, solved exactly


@numba.njit(cache=True)
def _kmeans_dp(w, s1, s2, k):  # pragma: no cover - compiled
    """Optimal k-segmentation of sorted weighted values (prefix sums w, s1, s2 with a leading 0):
    D[q, i] = min_j D[q-1, j-1] + cost(j, i), by divide and conquer (the argmin is monotone)."""
    u = w.shape[0] - 1
    big = np.inf
    dp = np.full((k, u), big)
    arg = np.zeros((k, u), np.int64)
    for i in range(u):
        c = s2[i + 1] - s1[i + 1] ** 2 / w[i + 1]
        dp[0, i] = c
    for q in range(1, k):
        stack = [(q, u - 1, q, u - 1)]  # (i_lo, i_hi, j_lo, j_hi)
        while len(stack):
            i_lo, i_hi, j_lo, j_hi = stack.pop()
            if i_lo > i_hi:
                continue
            mid = (i_lo + i_hi) // 2
            best, best_j = big, j_lo
            for j in range(j_lo, min(j_hi, mid) + 1):
                cw = w[mid + 1] - w[j]
                cost = s2[mid + 1] - s2[j] - (s1[mid + 1] - s1[j]) ** 2 / cw
                v = dp[q - 1, j - 1] + cost
                if v < best:
                    best, best_j = v, j
            dp[q, mid], arg[q, mid] = best, best_j
            stack.append((i_lo, mid - 1, j_lo, best_j))
            stack.append((mid + 1, i_hi, best_j, j_hi))
    return dp, arg


def kmeans_1d(values: np.ndarray, k: int) -> np.ndarray:
    """Optimal k-means of 1-D values (minimum within-cluster sum of squares, no random init):
    cluster ids 0..k-1 in order of decreasing centre. With fewer than k distinct values, each
    distinct value is its own cluster (ids 0..u-1, the highest value first)."""
    values = np.asarray(values, dtype=np.float64)
    uniq, inv, cnt = np.unique(values, return_inverse=True, return_counts=True)
    u = len(uniq)
    if u <= k:
        return (u - 1 - inv).astype(np.int64)
    z = (uniq - uniq.mean()) / (uniq.std() or 1.0)  # well-conditioned prefix sums
    w = np.r_[0.0, np.cumsum(cnt.astype(np.float64))]
    s1 = np.r_[0.0, np.cumsum(cnt * z)]
    s2 = np.r_[0.0, np.cumsum(cnt * z * z)]
    _, arg = _kmeans_dp(w, s1, s2, k)
    starts = np.zeros(k, np.int64)
    i = u - 1
    for q in range(k - 1, 0, -1):
        starts[q] = arg[q, i]
        i = starts[q] - 1
    cluster_of_unique = np.searchsorted(starts, np.arange(u), side="right") - 1
    return (k - 1 - cluster_of_unique[inv]).astype(np.int64)
