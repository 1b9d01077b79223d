"""`wvdata dedup`: exact and near-duplicate clusters, keep flags and train/val/test leakage.

Pipeline (the measurements behind every default are in docs/dedup.md):

1. Hash every stored image once (process pool or Ray tasks over shard chunks): a 64-bit
   pHash of the whole image and of 6 border crops ("views": centre 95% and 90%, and 5% off
   each single side), a 256-bit pHash of the whole image, and its gray mean/std.
2. Candidates: equal `sha1`; Hamming distance <= radius (default 10 of 64 bits) between an
   image's whole-image hash and any view of another image, found with FAISS's exhaustive
   IndexBinaryFlat up to 200k indexed hashes and, above, an exact multi-index hashing search
   (`wvdata._mih`, compiled; FAISS's IndexBinaryMultiHash is available as `--method multihash`
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

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import polars as pl

from ._dedup_index import UnionFind, range_pairs
from ._phash import FULL, HASHES, Hashes, aligned_distance, hamming, hash_images, to_hex
from .dataset import Dataset, is_url, open_dataset, open_file

SEARCH_VIEWS = (FULL, (0.025,) * 4, (0.05,) * 4, (0.05, 0.0, 0.0, 0.0),
                (0.0, 0.05, 0.0, 0.0), (0.0, 0.0, 0.05, 0.0), (0.0, 0.0, 0.0, 0.05))
DEFAULT_BITS = 64
DEFAULT_RADIUS = {("phash", 64): 10, ("phash", 256): 20, ("dhash", 64): 10, ("dhash", 256): 24}
VERIFY_RADIUS = 20  # of 256 pHash bits, after crop alignment
MAX_CROP = 0.06  # per side, crop alignment search range
FLAT_STD = 4.0
FLAT_MEAN_TOL = 8.0
CHROMA_TOL = 12.0  # max |mean Cb or Cr difference| between two colourful copies
CHUNK = 512  # images per hashing task
PAIR_CHUNK = 256  # pairs per verification task
OUT_SCHEMA = {"key": pl.String, "split": pl.String, "hash": pl.String, "cluster": pl.Int64,
              "cluster_size": pl.Int64, "keep": pl.Boolean, "leak": pl.Boolean,
              "nearest_key": pl.String, "nearest_distance": pl.Int64}


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


def _run(fn: Callable, tasks: list, weights: list[int], engine: str, workers: int,
         bar) -> Iterable[Any]:
    """Yield fn(task) for every task (any order) on the chosen engine, advancing the bar."""
    if engine == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                     log_to_driver=False)
        remote = ray.remote(fn)
        refs = {remote.remote(t): w for t, w in zip(tasks, weights)}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                yield ray.get(ref)
                bar.update(refs.pop(ref))
    elif engine == "local":
        if workers <= 1 or len(tasks) <= 1:
            for t, w in zip(tasks, weights):
                yield fn(t)
                bar.update(w)
            return
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for w, res in pool.imap_unordered(_Weighted(fn), list(zip(weights, tasks))):
                yield res
                bar.update(w)
    else:
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")


class _Weighted:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, item):
        w, task = item
        return w, self.fn(task)


# ---------------------------------------------------------------- dedup


def _hash_all(ds: Dataset, samples: pl.DataFrame, hash: str, hash_size: int, exact: bool,
              engine: str, workers: int, progress: bool) -> Hashes:
    from tqdm import tqdm

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
    with tqdm(total=n, unit="img", desc="dedup: hash", disable=not progress,
              dynamic_ncols=True, smoothing=0.1) as bar:
        for rows, h in _run(_hash_task, tasks, [len(t.rows) for t in tasks], engine, workers, bar):
            out.bits[rows], out.vbits[rows] = h.bits, h.vbits
            out.mean[rows], out.std[rows], out.ok[rows] = h.mean, h.std, h.ok
            out.chroma[rows], out.colorful[rows] = h.chroma, h.colorful
    return out


def _candidates(h: Hashes, radius: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (i < j, distance) pairs: whole-image hash of one within radius of a view of the other."""
    n, v, _ = h.bits.shape
    rows = np.nonzero(h.ok & (h.std >= FLAT_STD))[0]
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


def _colour_ok(h: Hashes, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """pHash is blind to colour: two colourful images must also agree in mean chroma
    (a grayscale copy of a colour image passes, as one of the two is not colourful)."""
    close = np.abs(h.chroma[a] - h.chroma[b]).max(axis=-1) <= CHROMA_TOL
    return close | ~h.colorful[a] | ~h.colorful[b]


def _flat_pairs(h: Hashes) -> list[tuple[int, int]]:
    rows = np.nonzero(h.ok & (h.std < FLAT_STD))[0]
    rows = rows[np.argsort(h.mean[rows], kind="stable")]
    a, b = rows[:-1], rows[1:]
    ok = (h.mean[b] - h.mean[a] <= FLAT_MEAN_TOL) & _colour_ok(h, a, b)
    return [(int(x), int(y)) for x, y in zip(a[ok], b[ok])]


def _sha1_pairs(samples: pl.DataFrame) -> list[tuple[int, int]]:
    groups = (samples.with_row_index("_row").group_by("sha1").agg(pl.col("_row"))
              .filter(pl.col("_row").list.len() > 1))
    out = []
    for members in groups["_row"].to_list():
        out += [(members[0], m) for m in members[1:]]
    return out


def _dedup(dataset: str | os.PathLike | Dataset, splits: Sequence[str] = ("train", "val", "test"),
           radius: int | None = None, hash: str = "phash", bits: int | None = None,
           engine: str = "local", workers: int | None = None, progress: bool = True,
           exact: bool = False, verify: bool = True, verify_radius: int = VERIFY_RADIUS,
           method: str = "auto") -> DedupResult:
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
    ci, cj, cd = _candidates(h, radius, method)
    accepted: dict[tuple[int, int], str] = {}
    for a, b in _sha1_pairs(samples):
        accepted[(min(a, b), max(a, b))] = "sha1"
    for a, b in _flat_pairs(h):
        accepted.setdefault((a, b), "flat")
    need = []
    if len(ci):
        close = hamming(h.vbits[ci], h.vbits[cj]) <= verify_radius
        colour = _colour_ok(h, ci, cj)
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
    table = _table(samples, h, roots, leak, ci, cj, cd, accepted)
    pairs = _pairs_frame(samples, h, accepted)
    stats = {"samples": n, "splits": covered, "hash": hash, "bits": bits, "radius": radius,
             "verify": verify, "verify_radius": verify_radius, "exact": exact,
             "candidates": int(len(ci)),
             "colour_rejected": int((~_colour_ok(h, ci, cj)).sum()) if len(ci) else 0,
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
    from tqdm import tqdm

    loc = samples.select("split", "shard", "data_offset", "bytes").rows()
    items = [(p, loc[a], loc[b]) for p, (a, b) in enumerate(need)]
    tasks = [_VerifyTask(ds.root, items[s:s + PAIR_CHUNK], verify_radius)
             for s in range(0, len(items), PAIR_CHUNK)]
    n_ok = 0
    with tqdm(total=len(items), unit="pair", desc="dedup: verify", disable=not progress,
              dynamic_ncols=True) as bar:
        for res in _run(_verify_task, tasks, [len(t.pairs) for t in tasks], engine, workers, bar):
            for pid, d in res:
                if d <= verify_radius:
                    accepted[need[pid]] = "aligned"
                    n_ok += 1
    return n_ok


def _table(samples: pl.DataFrame, h: Hashes, roots: np.ndarray, leak: np.ndarray,
           ci: np.ndarray, cj: np.ndarray, cd: np.ndarray, accepted: dict) -> pl.DataFrame:
    n = samples.height
    keys = samples["key"].to_numpy()
    df = pl.DataFrame({"_row": np.arange(n), "root": roots, "leak": leak,
                       "area": (samples["width"].cast(pl.Int64) * samples["height"].cast(pl.Int64)),
                       "bytes": samples["bytes"], "key": samples["key"]})
    df = df.with_columns(pl.len().over("root").alias("cluster_size"))
    # one keep per cluster: not leaked, then highest resolution, largest file, smallest key
    best = (df.sort(["leak", "area", "bytes", "key"], descending=[False, True, True, False])
            .group_by("root", maintain_order=True).first().select("root", pl.col("_row").alias("_best")))
    ids = (df.filter(pl.col("cluster_size") > 1).group_by("root").agg(pl.col("key").min())
           .sort("key").with_row_index("cluster").select("root", pl.col("cluster").cast(pl.Int64)))
    df = (df.join(best, on="root", how="left").join(ids, on="root", how="left")
          .with_columns(keep=(pl.col("_row") == pl.col("_best")) & ~pl.col("leak"),
                        cluster=pl.col("cluster").fill_null(-1)).sort("_row"))
    # nearest: over search candidates plus the sha1 / flat pairs
    extra = [(a, b) for (a, b), why in accepted.items() if why in ("sha1", "flat")]
    ea = np.array([e[0] for e in extra], np.int64)
    eb = np.array([e[1] for e in extra], np.int64)
    ed = hamming(h.bits[ea, 0], h.bits[eb, 0]).astype(np.int64) if extra else np.zeros(0, np.int64)
    pa, pb, pd = (np.concatenate([ci, ea]), np.concatenate([cj, eb]), np.concatenate([cd, ed]))
    near = pl.DataFrame({"_row": np.concatenate([pa, pb]), "other": np.concatenate([pb, pa]),
                         "d": np.concatenate([pd, pd])}, schema={"_row": pl.Int64, "other": pl.Int64, "d": pl.Int64})
    near = near.with_columns(okey=pl.Series(keys[near["other"].to_numpy()] if near.height else [], dtype=pl.String))
    near = (near.sort(["_row", "d", "okey"]).group_by("_row", maintain_order=True).first()
            .select("_row", pl.col("okey").alias("nearest_key"), pl.col("d").alias("nearest_distance")))
    df = df.with_columns(pl.col("_row").cast(pl.Int64)).join(near, on="_row", how="left").sort("_row")
    hexes = to_hex(h.bits[:, 0])
    return pl.DataFrame({
        "key": samples["key"], "split": samples["split"],
        "hash": pl.Series([x if ok else None for x, ok in zip(hexes, h.ok)], dtype=pl.String),
        "cluster": df["cluster"], "cluster_size": df["cluster_size"].cast(pl.Int64),
        "keep": df["keep"], "leak": df["leak"], "nearest_key": df["nearest_key"],
        "nearest_distance": df["nearest_distance"],
    }, schema=OUT_SCHEMA)


def _pairs_frame(samples: pl.DataFrame, h: Hashes, accepted: dict) -> pl.DataFrame:
    keys, splits = samples["key"].to_list(), samples["split"].to_list()
    items = sorted(accepted.items())
    a = np.array([p[0][0] for p in items], np.int64)
    b = np.array([p[0][1] for p in items], np.int64)
    d = hamming(h.bits[a, 0], h.bits[b, 0]) if items else np.zeros(0, np.int64)
    return pl.DataFrame({"key_a": [keys[i] for i in a], "key_b": [keys[i] for i in b],
                         "split_a": [splits[i] for i in a], "split_b": [splits[i] for i in b],
                         "distance": d.astype(np.int64), "reason": [p[1] for p in items]},
                        schema={"key_a": pl.String, "key_b": pl.String, "split_a": pl.String,
                                "split_b": pl.String, "distance": pl.Int64, "reason": pl.String})


def write_table(ds: Dataset, table: pl.DataFrame) -> str:
    """Write annotations/dedup.parquet: to a temporary name, then rename into place."""
    path = ds.annotation_path("dedup")
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_url(path):
        import fsspec

        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        with fs.open(p + ".tmp", "wb") as f:
            table.write_parquet(f)
        fs.mv(p + ".tmp", p)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.write_parquet(tmp)
    os.replace(tmp, path)
    return path


def dedup(dataset: str | os.PathLike | Dataset, splits: Sequence[str] = ("train", "val", "test"),
          radius: int | None = None, hash: str = "phash", bits: int | None = None,
          engine: str = "local", workers: int | None = None, report: str | None = None,
          progress: bool = True, *, exact: bool = False, verify: bool = True,
          verify_radius: int = VERIFY_RADIUS, method: str = "auto") -> pl.DataFrame:
    """Find exact and near duplicates and train/val/test leaks; write annotations/dedup.parquet.

    radius: search radius in bits of the search hash (default 8 of 64, 20 of 256).
    exact: decode at full size so hashes equal imagehash's (slower). verify: the 256-bit
    crop-aligned check of near-duplicate candidates (off only to inspect raw hash matches).
    method: "auto", "flat", "multihash" or "mih" (see _dedup_index.range_pairs). report: a .png or .html to render.
    """
    res = _dedup(dataset, splits, radius, hash, bits, engine, workers, progress, exact,
                 verify, verify_radius, method)
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    write_table(ds, res.table)
    if report:
        from ._dedup_report import render_report

        render_report(ds, res, report)
    return res.table


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
                     f"{stats['seconds']:.1f}s ({stats['samples'] / max(stats['hash_seconds'], 1e-9):.0f} img/s hashing)")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def _cli(args) -> int:
    splits = [s for s in args.splits.split(",") if s]
    res = _dedup(args.dataset, splits, args.radius, args.hash, args.bits, args.engine,
                 args.workers, not args.no_progress, args.exact, not args.no_verify,
                 args.verify_radius, args.method)
    ds = open_dataset(args.dataset)
    path = write_table(ds, res.table)
    if args.report:
        from ._dedup_report import render_report

        render_report(ds, res, args.report)
    print(format_summary(res.table, res.stats))
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def add_cli(subparsers) -> None:
    """Register `dedup` on an argparse subparsers object (func=callable(args) -> exit code)."""
    p = subparsers.add_parser("dedup", help="find duplicates, near duplicates and split leaks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory (or fsspec URL)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits to cover")
    p.add_argument("--radius", type=int, default=None,
                   help="Hamming search radius (default 8 for 64 bits, 20 for 256)")
    p.add_argument("--hash", choices=HASHES, default="phash")
    p.add_argument("--bits", type=int, choices=(64, 256), default=None,
                   help="search hash length (default 64)")
    p.add_argument("--exact", action="store_true",
                   help="full-size decode: hashes bit-equal to imagehash (slower)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept raw hash matches (no 256-bit crop-aligned check)")
    p.add_argument("--verify-radius", type=int, default=VERIFY_RADIUS)
    p.add_argument("--method", choices=("auto", "flat", "multihash", "mih"), default="auto",
                   help="near-duplicate search: FAISS flat / IndexBinaryMultiHash, or compiled "
                        "multi-index hashing (auto: flat for small sets, mih for large ones)")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=None, help="local processes (default: all cores)")
    p.add_argument("--report", default=None, help="render clusters and leaks to a .png or .html")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)
