"""Image grids for a person to judge a curation stage by eye: titled rows of captioned
thumbnails, written as one PNG or a self-contained HTML page (images inlined, readable
offline). Used by the dedup report, and by every stage that shows samples."""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

THUMB = 128


@dataclass
class Tile:
    """One thumbnail and its two caption lines; `tone` colours the first (for PNG and HTML)."""

    image: Image.Image
    line1: str = ""
    line2: str = ""
    tone: str = "normal"  # "normal", "good" (green) or "bad" (red)


Row = tuple[str, Sequence[Tile]]
_TONES = {"normal": (0, 0, 0), "good": (0, 120, 0), "bad": (160, 0, 0)}


def thumbnail(data: bytes | None, size: int = THUMB) -> Image.Image:
    """A size x size tile of encoded image bytes (reduced-size decode); gray if unreadable."""
    try:
        if data is None:
            raise ValueError("no image")
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        img.thumbnail((size, size))
    except Exception:  # noqa: BLE001 - an unreadable image shows as a gray tile
        img = Image.new("RGB", (size, size), (128, 128, 128))
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def short_key(key: str) -> str:
    """The readable middle of a key (split prefix and hash suffix dropped), for captions."""
    core = key.split("_", 1)[-1].rsplit("_", 1)[0]
    return core if len(core) <= 21 else core[:10] + "~" + core[-10:]


def dataset_tile(ds, split: str, shard: str, data_offset: int, nbytes: int, line1: str = "",
                 line2: str = "", tone: str = "normal") -> Tile:
    """A Tile of one stored sample, read by its byte range."""
    try:
        data = ds.read_image_bytes(split, shard, data_offset, nbytes)
    except Exception:  # noqa: BLE001
        data = None
    return Tile(thumbnail(data), line1, line2, tone)


def render(rows: Sequence[Row], path: str | os.PathLike, title: str) -> str:
    """Write the rows to `path`: HTML for .html/.htm, else an image (PNG by extension)."""
    path = str(path)
    rows = list(rows) or [("nothing to show", [])]
    if path.lower().endswith((".html", ".htm")):
        _html(rows, path, title)
    else:
        _png(rows, path, title)
    return path


def _wrap(text: str, width_px: int) -> list[str]:
    """Split text into lines of about width_px pixels (the default font is ~6 px a character)."""
    chars = max(20, width_px // 6)
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _png(rows: Sequence[Row], path: str, title: str, per_line: int = 8) -> None:
    """Rows flow left to right as blocks (a title over its tiles) and wrap at `per_line` tiles,
    so many small clusters share a line; a row without tiles is a section heading."""
    font = ImageFont.load_default()
    cell, cap, head, gap = THUMB + 6, 28, 16, 10
    width = per_line * cell + 12
    ops: list[tuple[str, int, int, object]] = []  # (kind, x, y, payload), laid out before drawing
    y = 8
    for line in _wrap(title, width - 12):
        ops.append(("text", 6, y, (line, (0, 0, 0))))
        y += 14
    y += 6
    x, line_h = 6, 0
    for name, tiles in rows:
        if not tiles:  # a section heading on its own line(s)
            y, x, line_h = y + line_h + (gap if line_h else 0), 6, 0
            for line in _wrap(name, width - 12):
                ops.append(("text", 6, y, (line, (0, 0, 128))))
                y += 14
            y += 4
            continue
        w = len(tiles) * cell
        if x > 6 and x + w > width:
            x, y, line_h = 6, y + line_h + gap, 0
        ops.append(("text", x, y + 2, (name, (0, 0, 128))))
        for k, t in enumerate(tiles):
            tx = x + (k % per_line) * cell
            ty = y + head + (k // per_line) * (THUMB + cap)
            ops.append(("tile", tx, ty, t))
        x += min(w, per_line * cell) + gap
        line_h = max(line_h, head + -(-len(tiles) // per_line) * (THUMB + cap))
    height = y + line_h + 12
    sheet = Image.new("RGB", (width + gap * 2, max(height, 60)), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for kind, ox, oy, payload in ops:
        if kind == "text":
            text, fill = payload  # type: ignore[misc]
            draw.text((ox, oy), text, fill=fill, font=font)
        else:
            t = payload  # type: ignore[assignment]
            img = t.image if t.image.size == (THUMB, THUMB) else t.image.resize((THUMB, THUMB))
            sheet.paste(img, (ox, oy))
            draw.text((ox, oy + THUMB + 2), t.line1, fill=_TONES.get(t.tone, (0, 0, 0)), font=font)
            draw.text((ox, oy + THUMB + 14), t.line2, fill=(60, 60, 60), font=font)
    sheet.save(path)


def _html(rows: Sequence[Row], path: str, title: str) -> None:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font:13px sans-serif}figure{display:inline-block;margin:3px;"
             f"width:{THUMB}px}}figcaption{{font-size:11px;word-break:break-all}}"
             ".good{color:#070}.bad{color:#a00}</style>",
             f"<h2>{html.escape(title)}</h2>"]
    for name, tiles in rows:
        if not tiles:  # a section heading
            parts.append(f"<h3 style='clear:both'>{html.escape(name)}</h3>")
            continue
        parts.append(f"<div style='display:inline-block;vertical-align:top;margin:0 12px 12px 0'>"
                     f"<h4>{html.escape(name)}</h4><div>")
        for t in tiles:
            buf = io.BytesIO()
            t.image.save(buf, format="JPEG", quality=85)
            src = base64.b64encode(buf.getvalue()).decode()
            parts.append(f"<figure><img src='data:image/jpeg;base64,{src}'><figcaption>"
                         f"<span class='{t.tone}'>{html.escape(t.line1)}</span><br>{html.escape(t.line2)}"
                         "</figcaption></figure>")
        parts.append("</div></div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
