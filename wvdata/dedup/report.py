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
    """Rows for the largest clusters, then for the leak pairs."""
    table = res.table
    samples = pl.concat([ds.samples(s) for s in table["split"].unique(maintain_order=True)])
    info = samples.join(table, on=["key", "split"], how="inner")
    loc = {k: (s, sh, o, b) for k, s, sh, o, b in
           info.select("key", "split", "shard", "data_offset", "bytes").iter_rows()}
    rows: list[Row] = []
    clusters = (info.filter(pl.col("cluster") >= 0).group_by("cluster").len()
                .sort(["len", "cluster"], descending=[True, False]).head(MAX_CLUSTERS))
    for cid, size in clusters.iter_rows():
        members = info.filter(pl.col("cluster") == cid).sort(["keep", "key"], descending=[True, False])
        tiles: list[Tile] = []
        for key, split, keep, leak, w, h in members.select(
                "key", "split", "keep", "leak", "width", "height").head(MAX_PER_ROW).iter_rows():
            flag, tone = ("KEEP", "good") if keep else ("LEAK", "bad") if leak else ("drop", "normal")
            tiles.append(dataset_tile(ds, *loc[key], f"{flag} {split} {w}x{h}", short_key(key), tone))
        rows.append((f"cluster {cid}: {size} images", tiles))
    leaks = res.pairs.filter(((pl.col("split_a") == "train") & pl.col("split_b").is_in(["val", "test"]))
                             | ((pl.col("split_b") == "train") & pl.col("split_a").is_in(["val", "test"])))
    for ka, kb, sa, sb, d, why in leaks.head(MAX_LEAKS).iter_rows():
        rows.append((f"leak {sa}/{sb}: distance {d} ({why})",
                     [dataset_tile(ds, *loc[ka], sa, short_key(ka)), dataset_tile(ds, *loc[kb], sb, short_key(kb))]))
    return rows


def render_report(ds, res, path: str | os.PathLike) -> str:
    """Write the largest clusters and every leak pair (up to 200) to a .png or .html file."""
    s = res.stats
    title = (f"wvdata dedup {ds.root}: {s['hash']} {s['bits']} bits, radius {s['radius']}, "
             f"verify <= {s['verify_radius']} of 256 bits")
    rows = _rows(ds, res) or [("no duplicates and no leaks found", [])]
    return render(rows, path, title)
