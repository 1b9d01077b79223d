"""`wvdata dedup`: exact and near-duplicate clusters, keep flags and train/val/test leakage.

Pipeline (the measurements behind every default are in docs/dedup.md):

1. Hash every stored image once (process pool or Ray tasks over shard chunks): a 64-bit
   pHash of the whole image and of 6 border crops ("views": centre 95% and 90%, and 5% off
   each single side), a 256-bit pHash of the whole image, and its gray mean/std.
2. Candidates: equal `sha1`; Hamming distance <= radius (default 10 of 64 bits) between an
   image's whole-image hash and any view of another image, found with FAISS's exhaustive
   IndexBinaryFlat up to 200k indexed hashes and, above, an exact multi-index hashing search
   (`dedup._mih`, compiled; FAISS's IndexBinaryMultiHash is available as `--method multihash`
   but measured ~100x slower at 1M hashes, radius 10).
   The views bring copies with up to ~5% cut off any border to <= 8 bits of their original;
   without them a 5% crop lands 6-18 bits away.
3. Verification, which fixes the false duplicates of low-entropy images (digits, icons,
   drawings on flat backgrounds collide at 0-6 bits of 64): a candidate is kept only if the
   256-bit pHashes agree to <= 20 bits, either as they are or, for crops, after aligning
   one image to a border crop (<= 6% a side) of the other (images re-read for those pairs
   only). Measured: true copies <= 14 bits, distinct digits >= 26, other look-alikes >= 68.
4. Flat images (thumbnail std < 4 gray levels) have hashes made of rounding noise; they are
   left out of the hash search and are duplicates of each other when their mean gray
   levels are within 8 (sorted-sweep chaining).
5. Union-find over accepted pairs gives clusters. One `keep` per cluster: the highest
   resolution (width*height), then the largest file (`bytes`), then the smallest key. A
   train image matched to a val or test image is a `leak` and never kept.

Output `annotations/dedup.parquet`, one row per sample of the covered splits: key, split,
hash (hex of the whole-image search hash; equal to str(imagehash.phash(img)) with
`exact=True`; null if undecodable), cluster (id >= 0 shared by the members of a cluster of
2 or more, ids numbered by each cluster's smallest key; -1 for an image with no duplicate),
cluster_size (1 for those), keep, leak, nearest_key / nearest_distance (the closest other
sample found within the search radius, verified or not, by search-hash distance, min over
views; null when none). Shards are never modified.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from .._args import non_negative_int, parse_list, positive_int
from ..dataset import Dataset, open_dataset, open_file
from ..engine import ENGINES, run_tasks
from ..lock import dataset_lock
from .cluster import (
    CHROMA_TOL,
    FLAT_STD,
    OUT_SCHEMA,
    UnionFind,
    build_table,
    colour_ok,
    flat_pairs,
    pairs_frame,
    sha1_pairs,
)
from .hashing import FULL, HASHES, Hashes, aligned_distance, hamming, hash_images
from .search import candidate_pairs

__all__ = ["dedup", "find_duplicates", "save", "write_table", "format_summary", "DedupResult",
           "OUT_SCHEMA", "CHROMA_TOL", "FLAT_STD", "SEARCH_VIEWS", "DEFAULT_RADIUS", "add_cli"]

SEARCH_VIEWS = (FULL, (0.025,) * 4, (0.05,) * 4, (0.05, 0.0, 0.0, 0.0),
                (0.0, 0.05, 0.0, 0.0), (0.0, 0.0, 0.05, 0.0), (0.0, 0.0, 0.0, 0.05))
DEFAULT_BITS = 64
DEFAULT_RADIUS = {("phash", 64): 10, ("phash", 256): 20, ("dhash", 64): 10, ("dhash", 256): 24}
VERIFY_RADIUS = 20  # of 256 pHash bits, after crop alignment
MAX_CROP = 0.06  # per side, crop alignment search range
CHUNK = 512  # images per hashing task
PAIR_CHUNK = 256  # pairs per verification task


@dataclass
class DedupResult:
    """The annotation table plus what a person needs to judge it."""

    table: pl.DataFrame
    pairs: pl.DataFrame  # accepted pairs: key_a, key_b, split_a, split_b, distance, reason
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- tasks (run in workers)


@dataclass
class _HashTask:
    root: str
    split: str
    shard: str
    rows: np.ndarray  # (n, 3) int64: global row, data_offset, bytes
    hash: str
    hash_size: int
    exact: bool
    views: tuple


def _hash_task(task: _HashTask) -> tuple[np.ndarray, Hashes]:
    """Read one chunk of a shard sequentially and hash its images."""
    ds = Dataset(task.root)
    order = np.argsort(task.rows[:, 1], kind="stable")
    rows = task.rows[order]
    datas = []
    with open_file(ds.shard_path(task.split, task.shard)) as f:
        for _, off, size in rows:
            f.seek(int(off))
            datas.append(f.read(int(size)))
    return rows[:, 0], hash_images(datas, task.hash, task.hash_size, task.exact, task.views)


@dataclass
class _VerifyTask:
    root: str
    pairs: list  # (pair id, (split, shard, off, size) a, (split, shard, off, size) b)
    verify_radius: int


def _verify_task(task: _VerifyTask) -> list[tuple[int, int]]:
    """Crop-aligned 256-bit pHash distance of each candidate pair."""
    ds = Dataset(task.root)
    out = []
    for pid, a, b in task.pairs:
        try:
            d = aligned_distance(ds.read_image_bytes(*a), ds.read_image_bytes(*b), 16, MAX_CROP)
        except Exception:  # noqa: BLE001 - unreadable: not verified
            d = 256
        out.append((pid, d))
    return out


# ---------------------------------------------------------------- dedup


def _hash_all(ds: Dataset, samples: pl.DataFrame, hash: str, hash_size: int, exact: bool,
              engine: str, workers: int, progress: bool) -> Hashes:
    n, v = samples.height, len(SEARCH_VIEWS)
    nbytes = hash_size * hash_size // 8
    out = Hashes(np.zeros((n, v, nbytes), np.uint8), np.zeros((n, 32), np.uint8),
                 np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros((n, 2), np.float32),
                 np.zeros(n, bool), np.zeros(n, bool))
    tasks = []
    idx = samples.with_row_index("_row").select("_row", "split", "shard", "data_offset", "bytes")
    for (split, shard), part in idx.group_by("split", "shard", maintain_order=True):
        rows = part.select("_row", "data_offset", "bytes").to_numpy().astype(np.int64)
        for s in range(0, len(rows), CHUNK):
            tasks.append(_HashTask(ds.root, split, shard, rows[s:s + CHUNK], hash, hash_size,
                                   exact, SEARCH_VIEWS))
    for rows, h in run_tasks(_hash_task, tasks, weights=[len(t.rows) for t in tasks], engine=engine,
                             workers=workers, desc="dedup: hash", progress=progress):
        out.bits[rows], out.vbits[rows] = h.bits, h.vbits
        out.mean[rows], out.std[rows], out.ok[rows] = h.mean, h.std, h.ok
        out.chroma[rows], out.colorful[rows] = h.chroma, h.colorful
    return out


def find_duplicates(dataset: str | os.PathLike | Dataset, splits: Sequence[str] = ("train", "val", "test"),
                    radius: int | None = None, hash: str = "phash", bits: int | None = None,
                    engine: str = "local", workers: int | None = None, progress: bool = True,
                    exact: bool = False, verify: bool = True, verify_radius: int = VERIFY_RADIUS,
                    method: str = "auto") -> DedupResult:
    """Find exact and near duplicates and leaks without writing anything: the table, the
    accepted pairs and the statistics the CLI summarises (`format_summary`)."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    if hash not in HASHES:
        raise ValueError(f"unknown hash {hash!r}; use one of {HASHES}")
    bits = bits or DEFAULT_BITS
    if bits not in (64, 256):
        raise ValueError("bits must be 64 or 256")
    radius = DEFAULT_RADIUS[(hash, bits)] if radius is None else int(radius)
    covered = [s for s in splits if s in ds.splits]
    if not covered:
        raise KeyError(f"none of the splits {list(splits)} is in {ds.root} (has {ds.splits})")
    samples = pl.concat([ds.samples(s) for s in covered], how="vertical").select(
        "key", "split", "shard", "data_offset", "bytes", "width", "height", "sha1")
    n = samples.height
    workers = workers or os.cpu_count() or 1
    h = _hash_all(ds, samples, hash, int(round(bits ** 0.5)), exact, engine, workers, progress)
    t_hash = time.perf_counter() - t0

    # candidates and their verification
    ci, cj, cd = candidate_pairs(h, radius, method, FLAT_STD)
    accepted: dict[tuple[int, int], str] = {}
    for a, b in sha1_pairs(samples):
        accepted[(min(a, b), max(a, b))] = "sha1"
    for a, b in flat_pairs(h):
        accepted.setdefault((a, b), "flat")
    need = []
    if len(ci):
        close = hamming(h.vbits[ci], h.vbits[cj]) <= verify_radius
        colour = colour_ok(h, ci, cj)
        for a, b, ok, col in zip(ci.tolist(), cj.tolist(), close.tolist(), colour.tolist()):
            if (a, b) in accepted or (verify and not col):
                continue
            if ok or not verify:
                accepted[(a, b)] = "hash"
            else:
                need.append((a, b))
    # a same-split pair already joined by cheaper evidence needs no crop-aligned check;
    # train x val/test pairs are always checked (a leak is a direct match)
    uf = UnionFind(n)
    for a, b in accepted:
        uf.union(a, b)
    split_arr = samples["split"].to_numpy()
    need = [(a, b) for a, b in need
            if split_arr[a] != split_arr[b] or uf.find(a) != uf.find(b)]
    n_aligned = _verify(ds, samples, need, verify_radius, engine, workers, progress, accepted)

    # clusters, keep, leak
    uf = UnionFind(n)
    for a, b in accepted:
        uf.union(a, b)
    roots = uf.roots()
    leak = np.zeros(n, bool)
    leaks_by: dict[str, set[int]] = {"val": set(), "test": set()}
    for a, b in accepted:
        for x, y in ((a, b), (b, a)):
            if split_arr[x] == "train" and split_arr[y] in leaks_by:
                leak[x] = True
                leaks_by[split_arr[y]].add(x)
    table = build_table(samples, h, roots, leak, ci, cj, cd, accepted)
    pairs = pairs_frame(samples, h, accepted)
    stats = {"samples": n, "splits": covered, "hash": hash, "bits": bits, "radius": radius,
             "verify": verify, "verify_radius": verify_radius, "exact": exact,
             "candidates": int(len(ci)),
             "colour_rejected": int((~colour_ok(h, ci, cj)).sum()) if len(ci) else 0,
             "aligned_checks": len(need),
             "aligned_accepted": n_aligned, "accepted_pairs": len(accepted),
             "leaks": {k: len(v) for k, v in leaks_by.items() if k in covered},
             "undecodable": int((~h.ok).sum()), "flat": int((h.ok & (h.std < FLAT_STD)).sum()),
             "hash_seconds": t_hash, "seconds": time.perf_counter() - t0}
    return DedupResult(table, pairs, stats)


def _verify(ds: Dataset, samples: pl.DataFrame, need: list[tuple[int, int]], verify_radius: int,
            engine: str, workers: int, progress: bool, accepted: dict) -> int:
    """Crop-aligned check of the candidate pairs whose whole-image 256-bit hashes disagree."""
    if not need:
        return 0
    loc = samples.select("split", "shard", "data_offset", "bytes").rows()
    items = [(p, loc[a], loc[b]) for p, (a, b) in enumerate(need)]
    tasks = [_VerifyTask(ds.root, items[s:s + PAIR_CHUNK], verify_radius)
             for s in range(0, len(items), PAIR_CHUNK)]
    n_ok = 0
    for res in run_tasks(_verify_task, tasks, weights=[len(t.pairs) for t in tasks], engine=engine,
                         workers=workers, desc="dedup: verify", unit="pair", progress=progress):
        for pid, d in res:
            if d <= verify_radius:
                accepted[need[pid]] = "aligned"
                n_ok += 1
    return n_ok


def write_table(ds: Dataset, table: pl.DataFrame) -> str:
    """Write annotations/dedup.parquet: to a temporary name, then rename into place."""
    return ds.write_annotation("dedup", table)


def dedup(dataset: str | os.PathLike | Dataset, splits: Sequence[str] = ("train", "val", "test"),
          radius: int | None = None, hash: str = "phash", bits: int | None = None,
          engine: str = "local", workers: int | None = None, report: str | None = None,
          progress: bool = True, *, exact: bool = False, verify: bool = True,
          verify_radius: int = VERIFY_RADIUS, method: str = "auto") -> pl.DataFrame:
    """Find exact and near duplicates and train/val/test leaks; write annotations/dedup.parquet.

    radius: search radius in bits of the search hash (default 10 of 64, 20 of 256).
    exact: decode at full size so hashes equal imagehash's (slower). verify: the 256-bit
    crop-aligned check of near-duplicate candidates (off only to inspect raw hash matches).
    method: "auto", "flat", "multihash" or "mih" (see `search.range_pairs`). report: a .png
    or .html to render.
    """
    res = find_duplicates(dataset, splits, radius, hash, bits, engine, workers, progress, exact,
                          verify, verify_radius, method)
    save(dataset, res, report)
    return res.table


def save(dataset: str | os.PathLike | Dataset, res: DedupResult, report: str | None = None) -> str:
    """Write the table to annotations/dedup.parquet (and render `report`); return its path."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    with dataset_lock(ds.root, "wvdata dedup"):
        path = write_table(ds, res.table)
    if report:
        from .report import render_report

        render_report(ds, res, report)
    return path


def format_summary(table: pl.DataFrame, stats: dict[str, Any] | None = None) -> str:
    """Clusters, images removed and leaks by split, as printed by the CLI."""
    clusters = table.filter(pl.col("cluster") >= 0)
    n_clusters = clusters["cluster"].n_unique() if clusters.height else 0
    removed = table.filter(~pl.col("keep"))
    lines = [f"dedup: {table.height} images, {n_clusters} clusters holding {clusters.height} images, "
             f"{removed.height} removed (keep = false)"]
    for split, n in removed.group_by("split").len().sort("split").iter_rows():
        lines.append(f"  removed from {split}: {n}")
    leaks = table.filter(pl.col("leak"))
    lines.append(f"  leaks: {leaks.height} train images match a val or test image")
    for s, n in (stats or {}).get("leaks", {}).items():
        lines.append(f"    train images matching {s}: {n}")
    if stats:
        lines.append(f"  {stats['hash']} {stats['bits']} bits, radius {stats['radius']}; "
                     f"{stats['candidates']} candidate pairs, {stats['aligned_checks']} crop-aligned "
                     f"checks ({stats['aligned_accepted']} accepted), {stats['flat']} flat images; "
                     f"{stats['seconds']:.1f}s "
                     f"({stats['samples'] / max(stats['hash_seconds'], 1e-9):.0f} img/s hashing)")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def _cli(args: argparse.Namespace) -> int:
    res = find_duplicates(args.dataset, parse_list(args.splits), args.radius, args.hash, args.bits,
                          args.engine, args.workers, not args.no_progress, args.exact, not args.no_verify,
                          args.verify_radius, args.method)
    path = save(args.dataset, res, args.report)
    print(format_summary(res.table, res.stats))
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `dedup` on an argparse subparsers object (func=callable(args) -> exit code)."""
    p = subparsers.add_parser("dedup", help="find duplicates, near duplicates and split leaks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory (or fsspec URL)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits to cover")
    p.add_argument("--radius", type=non_negative_int, default=None,
                   help="Hamming search radius (default 10 for 64 bits, 20 for 256)")
    p.add_argument("--hash", choices=HASHES, default="phash", help="perceptual hash (default: phash)")
    p.add_argument("--bits", type=int, choices=(64, 256), default=None,
                   help="search hash length (default 64)")
    p.add_argument("--exact", action="store_true",
                   help="full-size decode: hashes bit-equal to imagehash (slower)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept raw hash matches (no 256-bit crop-aligned check)")
    p.add_argument("--verify-radius", type=int, default=VERIFY_RADIUS,
                   help=f"max 256-bit pHash distance of a verified pair (default: {VERIFY_RADIUS})")
    p.add_argument("--method", choices=("auto", "flat", "multihash", "mih"), default="auto",
                   help="near-duplicate search: FAISS flat / IndexBinaryMultiHash, or compiled "
                        "multi-index hashing (auto: flat for small sets, mih for large ones)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process pool or Ray tasks")
    p.add_argument("--workers", type=positive_int, default=None, help="local processes (default: all cores)")
    p.add_argument("--report", default=None, help="render clusters and leaks to a .png or .html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)
