"""From joins to the annotation table: connected components as clusters, one keep per
cluster, train/val/test leaks, each image's nearest neighbour; plus the cheap pair sources
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


def flat_pairs(h: Hashes) -> tuple[np.ndarray, np.ndarray]:
    """Flat images whose mean gray levels chain within FLAT_MEAN_TOL (and whose colour agrees)."""
    rows = np.nonzero(h.ok & (h.std < FLAT_STD))[0]
    rows = rows[np.argsort(h.mean[rows], kind="stable")]
    a, b = rows[:-1], rows[1:]
    ok = (h.mean[b] - h.mean[a] <= FLAT_MEAN_TOL) & colour_ok(h, a, b)
    return a[ok].astype(np.int64), b[ok].astype(np.int64)


def sha1_pairs(samples: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each image with the sha1 of an earlier one, joined to the first of its group."""
    sha = samples["sha1"].to_numpy()
    _, first, inv = np.unique(sha, return_index=True, return_inverse=True)
    b = np.nonzero(first[inv] != np.arange(len(sha)))[0]
    return first[inv][b].astype(np.int64), b.astype(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) component label of each row under the joins (a[k], b[k])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def leaks(split: np.ndarray, roots: np.ndarray, covered) -> tuple[np.ndarray, dict[str, int]]:
    """A train image is a leak when its cluster holds a val or test image; also how many per split."""
    train = split == "train"
    out = np.zeros(len(split), bool)
    by: dict[str, int] = {}
    for s in ("val", "test"):
        held = np.isin(roots, np.unique(roots[split == s]))
        hit = train & held
        out |= hit
        if s in covered:
            by[s] = int(hit.sum())
    return out, by


def build_table(samples: pl.DataFrame, h: Hashes, roots: np.ndarray, leak: np.ndarray,
                near_j: np.ndarray, near_d: np.ndarray, xa: np.ndarray, xb: np.ndarray) -> pl.DataFrame:
    """The annotation table. near_j/near_d: each row's closest search candidate (-1: none);
    (xa, xb): further pairs (equal sha1, flat) that count for the nearest neighbour too."""
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
    # nearest: the search's closest candidate per row, plus the sha1 / flat pairs
    xd = hamming(h.bits[xa, 0], h.bits[xb, 0]).astype(np.int64) if len(xa) else np.zeros(0, np.int64)
    seen = np.nonzero(near_j >= 0)[0]
    rows = np.concatenate([seen, xa, xb]).astype(np.int64)
    other = np.concatenate([near_j[seen], xb, xa]).astype(np.int64)
    near = pl.DataFrame({"_row": rows, "okey": keys[other] if len(other) else np.zeros(0, str),
                         "d": np.concatenate([near_d[seen], xd, xd]).astype(np.int64)},
                        schema={"_row": pl.Int64, "okey": pl.String, "d": pl.Int64})
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


def pairs_frame(samples: pl.DataFrame, h: Hashes, a: np.ndarray, b: np.ndarray,
                reason: np.ndarray) -> pl.DataFrame:
    """The joins as (key_a, key_b, split_a, split_b, distance, reason), key_a < key_b."""
    keys, splits = samples["key"].to_numpy(), samples["split"].to_numpy()
    swap = keys[a] > keys[b]
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    d = hamming(h.bits[a, 0], h.bits[b, 0]) if len(a) else np.zeros(0, np.int64)
    return pl.DataFrame({"key_a": keys[a], "key_b": keys[b], "split_a": splits[a], "split_b": splits[b],
                         "distance": np.asarray(d, np.int64), "reason": reason},
                        schema={"key_a": pl.String, "key_b": pl.String, "split_a": pl.String,
                                "split_b": pl.String, "distance": pl.Int64, "reason": pl.String})
