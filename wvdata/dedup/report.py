"""Render dedup results for a person to judge the threshold by eye: the largest clusters and
every leak pair as rows of thumbnails (wvdata.grid), to a PNG image or a self-contained HTML page."""
from __future__ import annotations

import os

import polars as pl

from ..grid import Row, Tile, dataset_tile, render, short_key

MAX_CLUSTERS = 12
MAX_PER_ROW = 8
MAX_LEAKS = 200


def _rows(ds, res) -> list[Row]:
    """The largest clusters first (with each member's distance), then the leak pairs, once each."""
    table = res.table
    samples = pl.concat([ds.samples(s) for s in table["split"].unique(maintain_order=True)])
    info = samples.join(table, on=["key", "split"], how="inner")
    loc = {k: (s, sh, o, b) for k, s, sh, o, b in
           info.select("key", "split", "shard", "data_offset", "bytes").iter_rows()}
    rows: list[Row] = []
    sizes = (info.filter(pl.col("cluster") >= 0).group_by("cluster").len()
             .sort(["len", "cluster"], descending=[True, False]))
    rows.append((f"CLUSTERS: showing the {min(MAX_CLUSTERS, sizes.height)} largest of {sizes.height} "
                 f"(up to {MAX_PER_ROW} members each); KEEP = the one kept, drop = removed as a duplicate, "
                 "LEAK = a train copy of a val/test image; d = hash bits to the nearest member", []))
    for cid, size in sizes.head(MAX_CLUSTERS).iter_rows():
        members = info.filter(pl.col("cluster") == cid).sort(["keep", "key"], descending=[True, False])
        tiles: list[Tile] = []
        for key, split, keep, leak, w, h, d in members.select(
                "key", "split", "keep", "leak", "width", "height", "nearest_distance").head(MAX_PER_ROW).iter_rows():
            flag, tone = ("KEEP", "good") if keep else ("LEAK", "bad") if leak else ("drop", "normal")
            dist = f" d={d}" if d is not None else ""
            tiles.append(dataset_tile(ds, *loc[key], f"{flag} {split} {w}x{h}{dist}", short_key(key), tone))
        shown = f", showing {MAX_PER_ROW}" if size > MAX_PER_ROW else ""
        rows.append((f"cluster {cid}: {size} images{shown}", tiles))
    # each leaked train image with a held-out image of its cluster (its nearest when that is one)
    held = (info.filter(pl.col("split").is_in(["val", "test"]) & (pl.col("cluster") >= 0))
            .sort("key").group_by("cluster", maintain_order=True)
            .agg(pl.col("key").first().alias("first_held"), pl.col("key").alias("held")))
    hexes = dict(zip(table["key"].to_list(), table["hash"].to_list()))
    leak_rows = (info.filter(pl.col("leak")).sort("key").join(held, on="cluster", how="left")
                 .with_columns(key_b=pl.when(pl.col("held").list.contains(pl.col("nearest_key")))
                               .then(pl.col("nearest_key")).otherwise(pl.col("first_held"))))
    split_of = dict(zip(table["key"].to_list(), table["split"].to_list()))
    items = []
    for ka, kb in leak_rows.head(MAX_LEAKS).select("key", "key_b").iter_rows():
        ha, hb = hexes.get(ka), hexes.get(kb)
        d = bin(int(ha, 16) ^ int(hb, 16)).count("1") if ha and hb else -1
        items.append((ka, kb, "train", split_of[kb], d, "cluster"))
    pairs = pl.DataFrame(items, schema={"key_a": pl.String, "key_b": pl.String, "split_a": pl.String,
                                        "split_b": pl.String, "distance": pl.Int64, "reason": pl.String},
                         orient="row")
    rows.append((f"LEAKS: {leak_rows.height} train/val-test pairs, showing {pairs.height} "
                 "(train copy, then the held-out image)", []))
    per_row = max(1, MAX_PER_ROW // 2)
    chunk: list[Tile] = []
    for ka, kb, sa, sb, d, why in pairs.head(MAX_LEAKS).select(
            "key_a", "key_b", "split_a", "split_b", "distance", "reason").iter_rows():
        if sa != "train":
            ka, kb, sa, sb = kb, ka, sb, sa
        chunk += [dataset_tile(ds, *loc[ka], f"LEAK {sa} d={d} {why}", short_key(ka), "bad"),
                  dataset_tile(ds, *loc[kb], sb, short_key(kb))]
        if len(chunk) == 2 * per_row:
            rows.append(("", chunk))
            chunk = []
    if chunk:
        rows.append(("", chunk))
    return rows


def render_report(ds, res, path: str | os.PathLike) -> str:
    """Write the largest clusters and the leak pairs (up to 200) to a .png or .html file."""
    s = res.stats
    title = (f"wvdata dedup {ds.root}: {s['hash']} {s['bits']} bits, radius {s['radius']}, "
             f"verify <= {s['verify_radius']} of 256 bits")
    return render(_rows(ds, res), path, title)
