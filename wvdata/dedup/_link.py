"""Compiled (numba) clustering of near-duplicate candidates without quadratic work in a cluster.

Every check is arithmetic on per-image signatures computed once while hashing (`hashing.Hashes`):
the colour check on mean chroma and the crop-tolerant 256-bit pHash distance (min over the
stored border-crop views of one image against the other's whole image, both ways). Union-find
skips a candidate whose two images are already in one cluster, so a cluster of n images costs
about n checks, not n^2/2.

`leaders` is the collapse of dense regions (identical and near-identical hashes) before the
batched range search: the images whose whole-image hash falls into crowded buckets of the
multi-index tables are taken densest first; each one not yet in a cluster becomes a
representative, queries the tables itself (whole hash against every view, its views against
every whole hash) and the candidates that verify against it join its cluster and never query.
`link_pairs` runs the same join rule over the pairs of the batched search.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def ctpop(typingctx, x):  # the CPU's popcount instruction
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return sig, codegen


@njit(inline="always")
def pop(x):
    return np.int64(ctpop(x))


@njit(cache=True)
def sig_distance(vsig, a, b):
    """Min over views v of d(a_v, b_whole) and d(a_whole, b_v), 256-bit pHash bits."""
    best = 1 << 30
    nv, nw = vsig.shape[1], vsig.shape[2]
    for v in range(nv):
        d1 = 0
        d2 = 0
        for w in range(nw):
            d1 += pop(vsig[a, v, w] ^ vsig[b, 0, w])
            d2 += pop(vsig[a, 0, w] ^ vsig[b, v, w])
        if d1 < best:
            best = d1
        if d2 < best:
            best = d2
    return best


@njit(inline="always")
def colour_ok(chroma, colorful, a, b, tol):
    if not (colorful[a] and colorful[b]):
        return True
    return abs(chroma[a, 0] - chroma[b, 0]) <= tol and abs(chroma[a, 1] - chroma[b, 1]) <= tol


@njit(inline="always")
def find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(inline="always")
def handle(i, j, d, st, vsig, chroma, colorful, rank, parent, size, done, near_d, near_j,
           edges, stats):
    """One candidate pair: nearest neighbours, then join if not joined yet and verified."""
    vr, tol, verify = st[0], st[1], st[2]
    stats[0] += 1
    if d < near_d[i] or (d == near_d[i] and rank[j] < rank[near_j[i]]):
        near_d[i] = d
        near_j[i] = j
    if d < near_d[j] or (d == near_d[j] and rank[i] < rank[near_j[j]]):
        near_d[j] = d
        near_j[j] = i
    ri = find(parent, i)
    rj = find(parent, j)
    if ri == rj:
        return
    if verify > 0:
        stats[1] += 1
        if not colour_ok(chroma, colorful, i, j, tol):
            stats[2] += 1
            return
        if sig_distance(vsig, i, j) > vr:
            return
    if size[ri] < size[rj]:
        ri, rj = rj, ri
    parent[rj] = ri
    size[ri] += size[rj]
    done[j] = True
    k = stats[3]
    edges[k, 0] = i
    edges[k, 1] = j
    stats[3] = k + 1


@njit(cache=True)
def link_pairs(pi, pj, pd, st, vsig, chroma, colorful, rank, parent, size, done, near_d, near_j,
               edges, stats):
    for k in range(pi.shape[0]):
        if pi[k] != pj[k]:
            handle(pi[k], pj[k], pd[k], st, vsig, chroma, colorful, rank, parent, size, done,
                   near_d, near_j, edges, stats)


@njit(inline="always")
def earlier_table(x, t, b, f, rm):
    """True when a table before t already qualifies the pair x = a ^ b: table u qualifies when
    its substring distance is <= f (u <= rm) or <= f - 1 (u > rm); see `_mih`."""
    keymask = np.uint64((1 << b) - 1)
    for u in range(t):
        if pop((x >> np.uint64(u * b)) & keymask) <= (f if u <= rm else f - 1):
            return True
    return False


@njit(cache=True)
def leaders(order, whole, views, vt_codes, vt_ids, vt_off, wt_codes, wt_ids, wt_off, masks,
            masks_lo, b, f, rm, radius, st, vsig, chroma, colorful, rank, parent, size, done,
            near_d, near_j, edges, stats):
    """Dense images in `order`: each one not yet joined queries both indexes and joins its
    verified candidates (see the module docstring). Tables t <= rm are probed with `masks`
    (up to f flips), the others with `masks_lo` (up to f - 1), as in `_mih`."""
    keymask = np.uint64((1 << b) - 1)
    nhash = vt_off.shape[0]
    nv = views.shape[1]
    for i in order:
        if done[i]:
            continue
        done[i] = True
        stats[4] += 1
        q = whole[i]
        for t in range(nhash):  # whole(i) against every view of every image
            key = (q >> np.uint64(t * b)) & keymask
            for m in (masks if t <= rm else masks_lo):
                kk = np.int64(key ^ m)
                for s in range(vt_off[t, kk], vt_off[t, kk + 1]):
                    x = q ^ vt_codes[t, s]
                    d = pop(x)
                    if d > radius or earlier_table(x, t, b, f, rm):
                        continue
                    j = vt_ids[t, s] // nv
                    if j != i:
                        handle(i, j, d, st, vsig, chroma, colorful, rank, parent, size, done,
                               near_d, near_j, edges, stats)
        for v in range(1, nv):  # every view of i against every whole-image hash
            q = views[i, v]
            for t in range(nhash):
                key = (q >> np.uint64(t * b)) & keymask
                for m in (masks if t <= rm else masks_lo):
                    kk = np.int64(key ^ m)
                    for s in range(wt_off[t, kk], wt_off[t, kk + 1]):
                        x = q ^ wt_codes[t, s]
                        d = pop(x)
                        if d > radius or earlier_table(x, t, b, f, rm):
                            continue
                        j = wt_ids[t, s]
                        if j != i:
                            handle(i, j, d, st, vsig, chroma, colorful, rank, parent, size,
                                   done, near_d, near_j, edges, stats)


@njit(cache=True)
def _bucket_sort(keys, nbuckets):
    """Counting sort: (order, offsets) of integer keys in [0, nbuckets)."""
    counts = np.zeros(nbuckets + 1, np.int64)
    for k in keys:
        counts[k + 1] += 1
    for k in range(nbuckets):
        counts[k + 1] += counts[k]
    pos = counts[:-1].copy()
    order = np.empty(keys.shape[0], np.int64)
    for r in range(keys.shape[0]):
        k = keys[r]
        order[pos[k]] = r
        pos[k] += 1
    return order, counts


@njit(cache=True)
def _sig_distances(vsig, a, b):
    out = np.empty(a.shape[0], np.int64)
    for k in range(a.shape[0]):
        out[k] = sig_distance(vsig, a[k], b[k])
    return out


@njit(cache=True)
def _sort_table(codes, shift, b, out, ids, off):
    keymask = np.uint64((1 << b) - 1)
    off[:] = 0
    for x in codes:
        off[np.int64((x >> np.uint64(shift)) & keymask) + 1] += 1
    for k in range(off.shape[0] - 1):
        off[k + 1] += off[k]
    pos = off[:-1].copy()
    for r in range(codes.shape[0]):
        k = np.int64((codes[r] >> np.uint64(shift)) & keymask)
        out[pos[k]] = codes[r]
        ids[pos[k]] = r
        pos[k] += 1


@njit(parallel=True, cache=True)
def sort_tables(codes, tables, b):
    """For each t in `tables`: the codes sorted by their b-bit substring t (a counting sort),
    their rows and the bucket offsets, as (len(tables), n), (len(tables), n), (len(tables), 2^b+1)."""
    nt, n = tables.shape[0], codes.shape[0]
    out = np.empty((nt, n), np.uint64)
    ids = np.empty((nt, n), np.int64)
    off = np.empty((nt, (1 << b) + 1), np.int64)
    for i in prange(nt):  # one table per thread
        _sort_table(codes, tables[i] * b, b, out[i], ids[i], off[i])
    return out, ids, off


@njit(parallel=True, cache=True)
def mih_join(t, q_sorted, q_ids, q_off, b_sorted, b_ids, b_off, masks, b, f, rm, radius,
             chunks, per, starts, caps, counts, out_q, out_i, out_d):
    """Table t of the multi-index search: the queries of each chunk of substring groups (one key
    k each) against the base codes of the buckets k ^ mask, gathered into one contiguous run
    per group so that the distance loop over it vectorises. Chunk chunks[c] writes up to
    caps[c] pairs from starts[c] and its full count to counts[c] (more than caps[c]: redo it)."""
    ngroups = q_off.shape[0] - 1
    for c in prange(chunks.shape[0]):
        ch = chunks[c]
        found = 0
        at, cap = starts[c], caps[c]
        buf = np.empty(4096, np.uint64)
        bid = np.empty(4096, np.int64)
        for k in range(ch * per, min(ngroups, (ch + 1) * per)):
            q0, q1 = q_off[k], q_off[k + 1]
            if q0 == q1:
                continue
            nb = 0
            for m in masks:
                kk = np.int64(np.uint64(k) ^ m)
                nb += b_off[kk + 1] - b_off[kk]
            if nb > buf.shape[0]:
                buf = np.empty(2 * nb, np.uint64)
                bid = np.empty(2 * nb, np.int64)
            nb = 0
            for m in masks:
                kk = np.int64(np.uint64(k) ^ m)
                for s in range(b_off[kk], b_off[kk + 1]):
                    buf[nb] = b_sorted[s]
                    bid[nb] = b_ids[s]
                    nb += 1
            for r in range(q0, q1):
                qc = q_sorted[r]
                hit = 0
                for s in range(nb):  # vectorised: almost every query has no hit at all
                    hit += pop(buf[s] ^ qc) <= radius
                if hit == 0:
                    continue
                for s in range(nb):
                    x = buf[s] ^ qc
                    d = pop(x)
                    if d > radius or earlier_table(x, t, b, f, rm):
                        continue
                    if found < cap:
                        out_q[at + found] = q_ids[r]
                        out_i[at + found] = bid[s]
                        out_d[at + found] = d
                    found += 1
        counts[c] = found


def kernels() -> dict:
    """The compiled kernels (compiled on first use, cached on disk by numba)."""
    return {"pop": pop, "link_pairs": link_pairs, "leaders": leaders, "bucket_sort": _bucket_sort,
            "sig_distances": _sig_distances, "mih_join": mih_join, "sort_tables": sort_tables}


def sig_distances(vsig: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Crop-tolerant 256-bit distance of each pair (a[k], b[k]) from (n, views, 4) uint64 signatures."""
    return _sig_distances(vsig, np.asarray(a, np.int64), np.asarray(b, np.int64))


def bucket_sort(keys: np.ndarray, nbuckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): a stable counting sort of int64 keys in [0, nbuckets)."""
    return _bucket_sort(np.asarray(keys, np.int64), nbuckets)
