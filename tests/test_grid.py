"""wvdata.grid: the image grids every report shows (PNG and self-contained HTML)."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

from wvdata.grid import THUMB, Tile, render, short_key, thumbnail
from wvdata.synth import encode, photo


def test_png_and_html_show_every_tile(tmp_path):
    cat, rocket = encode(photo("chelsea")), encode(photo("rocket"))
    rows = [("cats", [Tile(thumbnail(cat), "KEEP", "chelsea", "good"), Tile(thumbnail(cat), "drop")]),
            ("rockets", [Tile(thumbnail(rocket), "LEAK", "rocket", "bad")])]
    png = Image.open(render(rows, tmp_path / "g.png", "two rows"))
    assert THUMB < png.height < 2 * THUMB and png.width >= 3 * THUMB  # small rows share a line
    page = (tmp_path / "g.html")
    render(rows, page, "two rows")
    many = [(f"cluster {i}", [Tile(thumbnail(cat))] * 5) for i in range(4)]  # 5 tiles: one per line
    assert Image.open(render(many, tmp_path / "m.png", "four")).height > 4 * THUMB
    text = page.read_text()
    assert len(re.findall(r"<img src='data:image/jpeg;base64,", text)) == 3  # inlined: readable offline
    assert "<h4>cats</h4>" in text and "class='bad'>LEAK" in text


def test_unreadable_bytes_give_a_gray_tile():
    tile = np.asarray(thumbnail(b"not an image"))
    assert tile.shape == (THUMB, THUMB, 3) and (tile == 128).all()
    wide = np.asarray(thumbnail(encode(photo("rocket"))))  # 640x427: letterboxed on white
    assert (wide[0] == 255).all() and not (wide[THUMB // 2] == 255).all()


def test_short_key_keeps_the_readable_middle():
    assert short_key("train_dog_001_ab12cd34") == "dog_001"
    assert len(short_key("train_" + "x" * 40 + "_ab12cd34")) == 21
