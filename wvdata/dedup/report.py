"""Render dedup results for a person to judge the threshold by eye: the largest clusters and
every leak pair as rows of thumbnails, to a PNG image or a self-contained HTML page."""
from __future__ import annotations

import base64
import html
import io
import os

import polars as pl
from PIL import Image, ImageDraw, ImageFont

THUMB = 128
MAX_CLUSTERS = 12
MAX_PER_ROW = 8
MAX_LEAKS = 200


def _thumb(ds, loc) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(ds.read_image_bytes(*loc)))
        img.draft("RGB", (THUMB, THUMB))
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
    except Exception:  # noqa: BLE001 - show a gray tile for an unreadable image
        img = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
    tile = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return tile


def _short(key: str) -> str:
    """The readable middle of a key (split prefix and hash suffix dropped), for captions."""
    core = key.split("_", 1)[-1].rsplit("_", 1)[0]
    return core if len(core) <= 21 else core[:10] + "~" + core[-10:]


def _rows(ds, res) -> list[tuple[str, list[tuple[str, str, Image.Image]]]]:
    """[(row title, [(caption line 1, caption line 2, thumbnail)])] for clusters then leaks."""
    table = res.table
    samples = pl.concat([ds.samples(s) for s in table["split"].unique(maintain_order=True)])
    info = samples.join(table, on=["key", "split"], how="inner")
    loc = {k: (s, sh, o, b) for k, s, sh, o, b in
           info.select("key", "split", "shard", "data_offset", "bytes").iter_rows()}
    rows = []
    clusters = (info.filter(pl.col("cluster") >= 0).group_by("cluster").len()
                .sort(["len", "cluster"], descending=[True, False]).head(MAX_CLUSTERS))
    for cid, size in clusters.iter_rows():
        members = info.filter(pl.col("cluster") == cid).sort(["keep", "key"], descending=[True, False])
        items = []
        for key, split, keep, leak, w, h in members.select(
                "key", "split", "keep", "leak", "width", "height").head(MAX_PER_ROW).iter_rows():
            flag = "KEEP" if keep else ("LEAK" if leak else "drop")
            items.append((f"{flag} {split} {w}x{h}", _short(key), _thumb(ds, loc[key])))
        rows.append((f"cluster {cid}: {size} images", items))
    leaks = res.pairs.filter(((pl.col("split_a") == "train") & pl.col("split_b").is_in(["val", "test"]))
                             | ((pl.col("split_b") == "train") & pl.col("split_a").is_in(["val", "test"])))
    for ka, kb, sa, sb, d, why in leaks.head(MAX_LEAKS).iter_rows():
        rows.append((f"leak {sa}/{sb}: distance {d} ({why})",
                     [(sa, _short(ka), _thumb(ds, loc[ka])), (sb, _short(kb), _thumb(ds, loc[kb]))]))
    return rows


def _png(rows, path: str, title: str) -> None:
    font = ImageFont.load_default()
    cap, head = 28, 18
    width = max([len(items) for _, items in rows] + [4]) * (THUMB + 6) + 12
    height = 30 + sum(head + THUMB + cap + 8 for _ in rows)
    sheet = Image.new("RGB", (width, max(height, 60)), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 8), title, fill=(0, 0, 0), font=font)
    y = 30
    for name, items in rows:
        draw.text((6, y + 2), name, fill=(0, 0, 128), font=font)
        y += head
        for k, (line1, line2, tile) in enumerate(items):
            x = 6 + k * (THUMB + 6)
            sheet.paste(tile, (x, y))
            color = (0, 120, 0) if line1.startswith("KEEP") else (160, 0, 0) if "LEAK" in line1 else (0, 0, 0)
            draw.text((x, y + THUMB + 2), line1, fill=color, font=font)
            draw.text((x, y + THUMB + 14), line2, fill=(60, 60, 60), font=font)
        y += THUMB + cap + 8
    sheet.save(path)


def _html(rows, path: str, title: str) -> None:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font:13px sans-serif}figure{display:inline-block;margin:3px;"
             f"width:{THUMB}px}}figcaption{{font-size:11px;word-break:break-all}}</style>",
             f"<h2>{html.escape(title)}</h2>"]
    for name, items in rows:
        parts.append(f"<h4>{html.escape(name)}</h4><div>")
        for line1, line2, tile in items:
            buf = io.BytesIO()
            tile.save(buf, format="JPEG", quality=85)
            src = base64.b64encode(buf.getvalue()).decode()
            parts.append(f"<figure><img src='data:image/jpeg;base64,{src}'>"
                         f"<figcaption>{html.escape(line1)}<br>{html.escape(line2)}</figcaption></figure>")
        parts.append("</div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def render_report(ds, res, path: str | os.PathLike) -> str:
    """Write the largest clusters and every leak pair (up to 200) to a .png or .html file."""
    path = str(path)
    s = res.stats
    title = (f"wvdata dedup {ds.root}: {s['hash']} {s['bits']} bits, radius {s['radius']}, "
             f"verify <= {s['verify_radius']} of 256 bits")
    rows = _rows(ds, res)
    if not rows:
        rows = [("no duplicates and no leaks found", [])]
    if path.lower().endswith((".html", ".htm")):
        _html(rows, path, title)
    else:
        _png(rows, path, title)
    return path
