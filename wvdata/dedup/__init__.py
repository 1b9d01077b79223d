"""`wvdata dedup`: exact and near-duplicate clusters, keep flags and train/val/test leakage.

Pipeline (the measurements behind every default are in docs/dedup.md):

1. Hash every stored image once (process pool or Ray tasks over shard chunks): a 64-bit
   pHash of the whole image and of 6 border crops ("views": centre 95% and 90%, and 5% off
   each single side), and the verification signature: 256-bit pHashes of the whole image
   and of 32 border crops (up to 6% a side), mean chroma, gray mean/std (flatness).
2. Candidates: equal `sha1`; Hamming distance <= radius (default 10 of 64 bits) between an
   image's whole-image hash and any view of another image. Dense regions (many identical
   or near-identical hashes) are collapsed first: their images, densest first, query as
   representatives and whatever verifies against one joins its cluster without querying
   itself; every other image goes through the batched exact range search (FAISS flat for
   small sets, our compiled multi-index hashing `dedup._mih` for large ones).
3. Verification, arithmetic on the stored signatures (no decode): two colourful images must
   agree in mean chroma, and the 256-bit pHash of one image's whole frame must be within
   20 bits of the other's whole frame or of one of its border crops (either way). True copies
   <= 16 bits, distinct digits >= 33, icons >= 28, other look-alikes >= 90. A pair whose
   images already share a cluster is not checked, so a cluster of n costs ~n checks.
4. Flat images (thumbnail std < 4 gray levels) have hashes made of rounding noise; they are
   left out of the hash search and are duplicates of each other when their mean gray
   levels are within 8 (sorted-sweep chaining).
5. Union-find over the joins gives clusters. One `keep` per cluster: the highest
   resolution (width*height), then the largest file (`bytes`), then the smallest key. A
   train image whose cluster holds a val or test image is a `leak` and never kept.

Output `annotations/dedup.parquet`, one row per sample of the covered splits: key, split,
hash (hex of the whole-image search hash; equal to str(imagehash.phash(img)) with
`exact=True`; null if undecodable), cluster (id >= 0 shared by the members of a cluster of
2 or more, ids numbered by each cluster's smallest key; -1 for an image with no duplicate),
cluster_size (1 for those), keep, leak, nearest_key / nearest_distance (the closest other
sample the search reported, verified or not, by search-hash distance, min over views; null
when none; inside a collapsed dense region that is usually its representative). Shards are
never modified.
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
    build_table,
    components,
    flat_pairs,
    leaks,
    pairs_frame,
    sha1_pairs,
)
from .hashing import FULL, HASHES, Hashes, hash_images
from .search import DENSE_MIN, link

__all__ = ["dedup", "find_duplicates", "save", "write_table", "format_summary", "DedupResult",
           "OUT_SCHEMA", "CHROMA_TOL", "FLAT_STD", "SEARCH_VIEWS", "DEFAULT_RADIUS", "add_cli"]

SEARCH_VIEWS = (FULL, (0.025,) * 4, (0.05,) * 4, (0.05, 0.0, 0.0, 0.0),
                (0.0, 0.05, 0.0, 0.0), (0.0, 0.0, 0.05, 0.0), (0.0, 0.0, 0.0, 0.05))
DEFAULT_BITS = 64
DEFAULT_RADIUS = {("phash", 64): 10, ("phash", 256): 20, ("dhash", 64): 10, ("dhash", 256): 24}
VERIFY_RADIUS = 20  # of 256 pHash bits, min over the signature's border crops
CHUNK = 512  # images per hashing task


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


# ---------------------------------------------------------------- dedup


def _hash_all(ds: Dataset, samples: pl.DataFrame, hash: str, hash_size: int, exact: bool,
              engine: str, workers: int, progress: bool) -> Hashes:
    n, v = samples.height, len(SEARCH_VIEWS)
    nbytes = hash_size * hash_size // 8
    out = Hashes.zeros(n, v, nbytes)
    tasks = []
    idx = samples.with_row_index("_row").select("_row", "split", "shard", "data_offset", "bytes")
    for (split, shard), part in idx.group_by("split", "shard", maintain_order=True):
        rows = part.select("_row", "data_offset", "bytes").to_numpy().astype(np.int64)
        for s in range(0, len(rows), CHUNK):
            tasks.append(_HashTask(ds.root, split, shard, rows[s:s + CHUNK], hash, hash_size,
                                   exact, SEARCH_VIEWS))
    for rows, h in run_tasks(_hash_task, tasks, weights=[len(t.rows) for t in tasks], engine=engine,
                             workers=workers, desc="dedup: hash", progress=progress):
        out.bits[rows], out.vsig[rows] = h.bits, h.vsig
        out.mean[rows], out.std[rows], out.ok[rows] = h.mean, h.std, h.ok
        out.chroma[rows], out.colorful[rows] = h.chroma, h.colorful
    return out


def find_duplicates(dataset: str | os.PathLike | Dataset, splits: Sequence[str] = ("train", "val", "test"),
                    radius: int | None = None, hash: str = "phash", bits: int | None = None,
                    engine: str = "local", workers: int | None = None, progress: bool = True,
                    exact: bool = False, verify: bool = True, verify_radius: int = VERIFY_RADIUS,
                    method: str = "auto", dense_min: int | None = DENSE_MIN) -> DedupResult:
    """Find exact and near duplicates and leaks without writing anything: the table, the
    accepted pairs and the statistics the CLI summarises (`format_summary`).

    dense_min: bucket size from which hash regions are collapsed to representatives before
    the batched search (None: every image queries, the plain pairwise path)."""
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

    t1 = time.perf_counter()
    keys = samples["key"].to_numpy()
    rank = np.argsort(np.argsort(keys, kind="stable"), kind="stable")
    lk = link(h, radius, method, flat_std=FLAT_STD, verify=verify, verify_radius=verify_radius,
              chroma_tol=CHROMA_TOL, rank=rank, dense_min=dense_min)
    sa, sb = sha1_pairs(samples)
    fa, fb = flat_pairs(h)
    ea = np.concatenate([sa, fa, lk.edges[:, 0]])
    eb = np.concatenate([sb, fb, lk.edges[:, 1]])
    reason = np.repeat(np.array(["sha1", "flat", "hash"]), [len(sa), len(fa), len(lk.edges)])
    roots = components(n, ea, eb)
    split_arr = samples["split"].to_numpy()
    leak, leaks_by = leaks(split_arr, roots, covered)
    table = build_table(samples, h, roots, leak, lk.near_j, lk.near_d, np.concatenate([sa, fa]),
                        np.concatenate([sb, fb]))
    pairs = pairs_frame(samples, h, ea, eb, reason)
    stats = {"samples": n, "splits": covered, "hash": hash, "bits": bits, "radius": radius,
             "verify": verify, "verify_radius": verify_radius, "exact": exact,
             **lk.stats, "accepted_pairs": len(ea), "leaks": leaks_by,
             "undecodable": int((~h.ok).sum()), "flat": int((h.ok & (h.std < FLAT_STD)).sum()),
             "hash_seconds": t_hash, "link_seconds": time.perf_counter() - t1,
             "seconds": time.perf_counter() - t0}
    return DedupResult(table, pairs, stats)


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
    signature check of near-duplicate candidates (off only to inspect raw hash matches).
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
                     f"{stats['candidates']} candidate pairs, {stats['checks']} signature checks, "
                     f"{stats['representatives']} dense representatives, {stats['flat']} flat images; "
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
                   help="accept raw hash matches (no 256-bit signature check)")
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
