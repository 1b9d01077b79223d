"""From accepted pairs to the annotation table: union-find clusters, one keep per cluster,
train/val/test leaks, and each image's nearest neighbour; plus the cheap pair sources
(equal sha1, flat images) and the colour check."""
from __future__ import annotations

import numpy as np
import polars as pl

from .hashing import Hashes, hamming, to_hex

FLAT_STD = 4.0  # thumbnail gray std below which an image is flat (its hash is rounding noise)
FLAT_MEAN_TOL = 8.0
CHROMA_TOL = 12.0  # max |mean Cb or Cr difference| between two colourful copies
OUT_SCHEMA = {"key": pl.String, "split": pl.String, "hash": pl.String, "cluster": pl.Int64,
              "cluster_size": pl.Int64, "keep": pl.Boolean, "leak": pl.Boolean,
              "nearest_key": pl.String, "nearest_distance": pl.Int64}


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def colour_ok(h: Hashes, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """pHash is blind to colour: two colourful images must also agree in mean chroma
    (a grayscale copy of a colour image passes, as one of the two is not colourful)."""
    close = np.abs(h.chroma[a] - h.chroma[b]).max(axis=-1) <= CHROMA_TOL
    return close | ~h.colorful[a] | ~h.colorful[b]


def flat_pairs(h: Hashes) -> list[tuple[int, int]]:
    rows = np.nonzero(h.ok & (h.std < FLAT_STD))[0]
    rows = rows[np.argsort(h.mean[rows], kind="stable")]
    a, b = rows[:-1], rows[1:]
    ok = (h.mean[b] - h.mean[a] <= FLAT_MEAN_TOL) & colour_ok(h, a, b)
    return [(int(x), int(y)) for x, y in zip(a[ok], b[ok])]


def sha1_pairs(samples: pl.DataFrame) -> list[tuple[int, int]]:
    groups = (samples.with_row_index("_row").group_by("sha1").agg(pl.col("_row"))
              .filter(pl.col("_row").list.len() > 1))
    out = []
    for members in groups["_row"].to_list():
        out += [(members[0], m) for m in members[1:]]
    return out


def build_table(samples: pl.DataFrame, h: Hashes, roots: np.ndarray, leak: np.ndarray,
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


def pairs_frame(samples: pl.DataFrame, h: Hashes, accepted: dict) -> pl.DataFrame:
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
