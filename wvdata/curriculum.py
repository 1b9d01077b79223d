"""`wvdata curriculum`: CurriculumNet subsets by density clustering of image features, per class.

Per class (the samples' labels in the split): features (from `wvdata embed`, PCA-reduced to
`pca_dim` dimensions when wider, one PCA for all classes), Euclidean distances, cut-off d_c =
the `density_t` quantile of the class's pair distances, density rho_i = the number of samples
of the class closer than d_c (itself excluded), k-means with k = `subsets` on the 1-D
densities (solved exactly), the densest cluster = subset 1 (mostly clean), the next = 2,
the sparsest = `subsets` (highly noisy). Methods (see `wvdata._density`):
- `exact`: the reference, blocked (never the n x n matrix); d_c from all pairs up to 20,000
  samples in a class, from 4M seeded random pairs above;
- `knn`: the same density measured against 2,048 seeded anchors of the class (a FAISS index on
  a GPU with faiss-gpu, BLAS on the CPU), d_c from 1M sampled pairs: O(n) instead of O(n^2);
- `auto` (default): `exact` up to 20,000 samples in a class, `knn` above.

Output `annotations/curriculum.parquet`, one row per sample of the split: key, label, subset
(Int8: 1 = cleanest .. `subsets`; null where the sample has no features, e.g. features
embedded from a view, or it could not be read, and where its label is unknown (< 0)), density
(Float64; null with subset). A class with fewer samples than subsets cannot be split: all its
samples go to subset 1 (counted in the summary). Errors: feature keys that are not samples of
the split, duplicate keys, NaN or infinite features.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from . import _density
from .dataset import Dataset, open_dataset
from .lock import dataset_lock

METHODS = ("auto", "exact", "knn")
AUTO_EXACT_MAX = _density.ALL_PAIRS_MAX  # auto: exact up to this class size, knn above
PCA_DIM = 256
PCA_FIT_MAX = 200_000  # rows the PCA is fitted on (a seeded sample above)
SCHEMA = {"key": pl.String, "label": pl.Int64, "subset": pl.Int8, "density": pl.Float64}


def fit_pca(features: np.ndarray, dim: int = PCA_DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, D x dim axes) of the top `dim` principal axes of N x D features (fitted on up to
    PCA_FIT_MAX seeded rows); None when D <= dim (the features are used as they are)."""
    n, d = features.shape
    if d <= dim:
        return None
    rng = np.random.default_rng([seed, 0x9CA])
    fit = np.sort(rng.choice(n, PCA_FIT_MAX, replace=False)) if n > PCA_FIT_MAX else np.arange(n)
    sample = np.asarray(features[fit], dtype=np.float64)
    mean = sample.mean(0)
    _, vecs = np.linalg.eigh(np.cov(sample - mean, rowvar=False))
    return mean.astype(np.float32), np.ascontiguousarray(vecs[:, ::-1][:, :dim], dtype=np.float32)


def _rows(features: np.ndarray, idx: np.ndarray, pca: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """One class's rows (idx ascending), projected: one class at a time, the reduced matrix is never whole."""
    x = np.asarray(features[idx], dtype=np.float32)
    return x if pca is None else (x - pca[0]) @ pca[1]


def class_subsets(x: np.ndarray, subsets: int = 3, method: str = "exact", density_t: float = 0.6,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(subset 1..subsets per row, density per row, method used) for the features of one class."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    n = len(x)
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX else "knn"
    if method == "exact":
        rho, _ = _density.exact_density(x, density_t, seed)
    else:
        rho, _ = _density.knn_density(x, density_t, seed=seed)
    if n < subsets:
        return np.ones(n, np.int8), rho.astype(np.float64), method
    return (_density.kmeans_1d(rho, subsets) + 1).astype(np.int8), rho.astype(np.float64), method


def _check_features(feats: np.ndarray, keys: pl.Series, split_keys: pl.Series, name: str, split: str) -> None:
    if keys.n_unique() != keys.len():
        dup = keys.filter(keys.is_duplicated())[0]
        raise ValueError(f"features {name!r}: {keys.len() - keys.n_unique()} duplicate keys, e.g. {dup!r}")
    unknown = keys.filter(~keys.is_in(split_keys.implode()))
    if unknown.len():
        raise KeyError(f"features {name!r}: {unknown.len()} keys are not samples of split {split!r}, "
                       f"e.g. {unknown[0]!r} (embedded from another split or dataset?)")
    bad = np.zeros(len(feats), bool)
    for s in range(0, len(feats), 1 << 16):
        bad[s:s + (1 << 16)] = ~np.isfinite(np.asarray(feats[s:s + (1 << 16)], dtype=np.float32)).all(1)
    if bad.any():
        raise ValueError(f"features {name!r}: {int(bad.sum())} rows hold NaN or infinite values, e.g. key "
                         f"{keys[int(np.flatnonzero(bad)[0])]!r}; re-run `wvdata embed` (a diverged model?)")


@dataclass
class CurriculumResult:
    """The annotation table plus what the summary reports."""

    table: pl.DataFrame  # key, label, subset, density: one row per sample of the split
    stats: dict[str, Any] = field(default_factory=dict)


def find_subsets(dataset: str | os.PathLike | Dataset, features: str, *, split: str = "train", subsets: int = 3,
                 method: str = "auto", density_t: float = 0.6, pca_dim: int = PCA_DIM, seed: int = 0,
                 progress: bool = True) -> CurriculumResult:
    """Density subsets per class from DATASET/features/FEATURES, without writing anything."""
    from tqdm import tqdm

    from .embed import load_features

    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 0 < density_t < 1:
        raise ValueError(f"density_t must be in (0, 1), got {density_t}")
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    samples = ds.samples(split).select("key", "label")
    feats, keys = load_features(ds, features)
    _check_features(feats, keys, samples["key"], features, split)
    rows = pl.DataFrame({"key": keys, "row": np.arange(keys.len())}).join(samples, on="key", how="left")
    rows = rows.filter(pl.col("label") >= 0).sort(["label", "row"])
    pca = fit_pca(feats, pca_dim, seed)
    row_idx, labels = rows["row"].to_numpy(), rows["label"].to_numpy()
    subset, density = np.zeros(len(feats), np.int8), np.full(len(feats), np.nan)
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else np.zeros(0, np.int64)
    by_method: dict[str, int] = {}
    small = 0
    with tqdm(total=len(labels), unit="img", desc="curriculum", disable=not progress, dynamic_ncols=True) as bar:
        for s, e in zip(starts, np.r_[starts[1:], len(labels)]):
            idx = row_idx[s:e]
            x = _rows(feats, idx, pca)
            sub, rho, used = class_subsets(x, subsets, method, density_t, seed * 100003 + int(labels[s]))
            subset[idx], density[idx] = sub, rho
            by_method[used] = by_method.get(used, 0) + 1
            small += int(e - s < subsets)
            bar.update(int(e - s))
    got = pl.DataFrame({"key": keys, "subset": subset, "density": density}).filter(pl.col("subset") > 0)
    table = samples.join(got, on="key", how="left", maintain_order="left").select(
        "key", pl.col("label").cast(pl.Int64), pl.col("subset").cast(pl.Int8), pl.col("density").cast(pl.Float64))
    stats = {"samples": table.height, "with_features": keys.len(), "classes": len(starts),
             "classes_by_method": by_method, "small_classes": small, "subsets": subsets, "method": method,
             "density_t": density_t, "dims": feats.shape[1] if pca is None else pca_dim,
             "seconds": time.perf_counter() - t0}
    return CurriculumResult(table, stats)


def curriculum(dataset: str | os.PathLike | Dataset, features: str, *, split: str = "train", subsets: int = 3,
               method: str = "auto", density_t: float = 0.6, pca_dim: int = PCA_DIM, seed: int = 0,
               report: str | None = None, progress: bool = True) -> pl.DataFrame:
    """Density subsets per class from DATASET/features/FEATURES; write annotations/curriculum.parquet
    (and the `report` grid, .png or .html); return the table."""
    res = find_subsets(dataset, features, split=split, subsets=subsets, method=method, density_t=density_t,
                       pca_dim=pca_dim, seed=seed, progress=progress)
    save(dataset, res.table)
    if report:
        render_report(dataset, split, res.table, report, seed=seed)
    return res.table


def save(dataset: str | os.PathLike | Dataset, table: pl.DataFrame) -> str:
    """Write annotations/curriculum.parquet (temporary name, then rename) under the dataset's lease."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    with dataset_lock(ds.root, "wvdata curriculum"):
        return ds.write_annotation("curriculum", table)


def format_summary(table: pl.DataFrame, stats: dict[str, Any] | None = None) -> str:
    """Count and share per subset (and of samples without one), as printed by the CLI."""
    n = max(table.height, 1)
    lines = [f"curriculum: {table.height} samples"]
    counts = dict(table.group_by("subset").len().iter_rows())
    for s in sorted(k for k in counts if k is not None):
        d = table.filter(pl.col("subset") == s)["density"]
        lines.append(f"  subset {s}: {counts[s]:>9} ({counts[s] / n:6.1%})  density median {d.median():.4g}")
    if counts.get(None):
        lines.append(f"  no subset: {counts[None]:>8} ({counts[None] / n:6.1%})  (no features, or label unknown)")
    if stats:
        methods = ", ".join(f"{v} {k}" for k, v in sorted(stats["classes_by_method"].items()))
        lines.append(f"  {stats['classes']} classes ({methods}); {stats['small_classes']} with fewer samples "
                     f"than subsets (all in subset 1); {stats['seconds']:.1f}s")
    return "\n".join(lines)


def render_report(dataset: str | os.PathLike | Dataset, split: str, table: pl.DataFrame, path: str,
                  classes: int = 4, per_row: int = 8, seed: int = 0) -> str:
    """A grid (PNG or HTML, wvdata.grid) of sample images of each subset for a few seeded classes."""
    from .grid import dataset_tile, render, short_key

    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    loc = ds.samples(split).select("key", "shard", "data_offset", "bytes", "class_name")
    t = table.filter(pl.col("subset").is_not_null()).join(loc, on="key", how="left")
    labels = t["label"].unique().sort().to_list()
    rng = np.random.default_rng([seed, 0x6E9])
    chosen = sorted(rng.choice(labels, min(classes, len(labels)), replace=False).tolist()) if labels else []
    rows = []
    tones = {1: "good", 2: "normal"}
    for c in chosen:
        part = t.filter(pl.col("label") == c)
        for s in sorted(part["subset"].unique().to_list()):
            sub = part.filter(pl.col("subset") == s)
            pick = sub.sample(min(per_row, sub.height), seed=seed).sort("density", descending=True)
            tiles = [dataset_tile(ds, split, r["shard"], r["data_offset"], r["bytes"], short_key(r["key"]),
                                  f"rho {r['density']:.4g}", tones.get(s, "bad")) for r in pick.iter_rows(named=True)]
            rows.append((f"class {c} ({sub['class_name'][0]}) - subset {s}: {sub.height} of {part.height}", tiles))
    return render(rows, path, f"wvdata curriculum: sample images per subset ({ds.root})")


# ---------------------------------------------------------------- quota batches


# ---------------------------------------------------------------- CLI


def _cli(args: argparse.Namespace) -> int:
    res = find_subsets(args.dataset, args.features, split=args.split, subsets=args.subsets, method=args.method,
                       density_t=args.density_t, pca_dim=args.pca_dim, seed=args.seed, progress=not args.no_progress)
    path = save(args.dataset, res.table)
    if args.report:
        render_report(args.dataset, args.split, res.table, args.report, seed=args.seed)
    print(format_summary(res.table, res.stats))
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `wvdata curriculum`."""
    p = subparsers.add_parser("curriculum", help="CurriculumNet subsets (1 = clean) by feature density per class",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("--features", required=True, help="features/NAME written by `wvdata embed`")
    p.add_argument("--split", default="train", help="split the features are of")
    p.add_argument("--subsets", type=int, default=3, help="subsets per class")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help=f"exact (blocked O(n^2)), knn (anchored, O(n); FAISS on a GPU) or auto: exact up to "
                        f"{AUTO_EXACT_MAX} samples in a class, knn above")
    p.add_argument("--density-t", type=float, default=0.6, help="d_c = this quantile of the pair distances")
    p.add_argument("--pca-dim", type=int, default=PCA_DIM, help="PCA (one for all classes) to this many dimensions")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled pairs and anchors")
    p.add_argument("--report", default=None, help="write sample images per subset to a .png or .html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
