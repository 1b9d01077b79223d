"""`wvdata build`, per image: EXIF orientation, conversion to RGB JPEG, resizing, original bytes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _crawls import (
    check_dataset,
    crop,
    decode,
    encode,
    exif_jpeg,
    manifest,
    photo,
    quiet_build,
    samples,
    sha1,
    stored_image,
    write,
)
from wvdata.cli import main

W, H = 180, 120  # landscape, so a wrong rotation shows up in the size already


def _upright() -> np.ndarray:
    return crop("chelsea", W, H, seed=5)


def _inputs() -> dict[str, tuple[bytes, np.ndarray | None]]:
    """file name -> (bytes, the RGB image a viewer would show), for every input kind."""
    up = _upright()
    rgb = crop("coffee", W, H)
    gray = crop("astronaut", W, H)[..., 1]
    rgba = np.dstack([crop("rocket", W, H), np.full((H, W), 255, np.uint8)])
    rgba[:, : W // 2, 3] = 0  # left half fully transparent
    pal = Image.fromarray(crop("astronaut", W, H)).quantize(16)
    pal_idx = np.asarray(pal).copy()
    pal_idx[: H // 2] = 0  # top half: palette entry 0, declared transparent
    pal_img = Image.fromarray(pal_idx, "P")
    pal_img.putpalette(pal.getpalette())
    pal_rgb = np.asarray(pal_img.convert("RGB")).copy()
    pal_rgb[: H // 2] = 255
    rgba_rgb = rgba[..., :3].copy()
    rgba_rgb[:, : W // 2] = 255
    ramp = np.tile(np.linspace(2000, 40000, W), (H, 1)).astype(np.uint16)  # not full range
    cmyk = Image.fromarray(rgb).convert("CMYK")
    return {
        "rgb.jpg": (encode(rgb), None),  # None: must be the file's own bytes
        "exif6.jpg": (exif_jpeg(up, 6), up),
        "exif8.jpg": (exif_jpeg(up, 8), up),
        "exif3.jpg": (exif_jpeg(up, 3), up),
        "cmyk.jpg": (encode(cmyk, "JPEG", quality=95), np.asarray(cmyk.convert("RGB"))),
        "gray.jpg": (encode(gray, "JPEG", quality=95), np.dstack([gray] * 3)),
        "palette.png": (encode(pal_img, "PNG", transparency=0), pal_rgb),
        "rgba.png": (encode(rgba, "PNG"), rgba_rgb),
        "gray16.png": (encode(Image.fromarray(ramp), "PNG"), np.dstack([np.round(ramp / 257)] * 3)),
        "rgb.png": (encode(rgb, "PNG"), rgb),
        "rgb.webp": (encode(rgb, "WEBP", lossless=True), rgb),
        "rgb.bmp": (encode(rgb, "BMP"), rgb),
        "rgb.tif": (encode(rgb, "TIFF"), rgb),
        "rgb.gif": (encode(Image.fromarray(rgb).quantize(256), "GIF"),
                    np.asarray(Image.fromarray(rgb).quantize(256).convert("RGB"))),
    }


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    inputs = _inputs()
    for name, (data, _) in inputs.items():
        write(root / "src" / "kinds" / name, data)
    quiet_build(root / "src", root / "ds", shard_samples=4)
    check_dataset(root / "ds")
    rows = {Path(r["src_path"]).name: r for r in samples(root / "ds").to_dicts()}
    return root, inputs, rows


def test_every_kind_is_accepted_and_stored_as_rgb_jpeg(formats):
    root, inputs, rows = formats
    assert sorted(rows) == sorted(inputs)  # nothing rejected
    for name, (_, shown) in inputs.items():
        row = rows[name]
        stored = stored_image(root / "ds", row)
        pixels = decode(stored)  # asserts JPEG, RGB
        assert (row["width"], row["height"]) == (W, H) == (pixels.shape[1], pixels.shape[0]), name
        if shown is None:
            continue
        assert row["reencoded"], name
        err = np.abs(pixels - shown).mean()
        assert err < 6, (name, err)


def test_exif_orientation_is_applied(formats):
    root, _, rows = formats
    up = _upright().astype(np.int64)
    for name in ("exif6.jpg", "exif8.jpg", "exif3.jpg"):
        pixels = decode(stored_image(root / "ds", rows[name]))
        right = np.abs(pixels - up).mean()
        upside_down = np.abs(pixels - up[::-1, ::-1]).mean()
        assert right < 4 and upside_down > 4 * right, (name, right, upside_down)
        # the stored JPEG carries no orientation left for a reader to apply a second time
        with Image.open(io.BytesIO(stored_image(root / "ds", rows[name]))) as im:
            assert im.getexif().get(0x0112, 1) == 1


def test_transparency_is_composited_on_white(formats):
    root, _, rows = formats
    rgba = decode(stored_image(root / "ds", rows["rgba.png"]))
    assert rgba[:, : W // 2 - 8].min() >= 245  # transparent half: white (JPEG-close)
    pal = decode(stored_image(root / "ds", rows["palette.png"]))
    assert pal[: H // 2 - 8].min() >= 245
    assert pal[H // 2 + 8:].mean() < 200  # the opaque part is the picture, not white


def test_an_rgb_jpeg_needing_no_change_keeps_its_bytes(formats):
    root, inputs, rows = formats
    row = rows["rgb.jpg"]
    assert not row["reencoded"]
    assert row["sha1"] == sha1(inputs["rgb.jpg"][0]) == sha1(stored_image(root / "ds", row))
    assert all(rows[n]["reencoded"] for n in rows if n != "rgb.jpg")


def _expected_size(w: int, h: int, short: int | None, side: int | None) -> tuple[int, int]:
    scale = min([1.0] + ([short / min(w, h)] if short else []) + ([side / max(w, h)] if side else []))
    return (round(w * scale), round(h * scale)) if scale < 1 else (w, h)


@pytest.mark.parametrize("flag,value", [("--resize-short", 100), ("--max-side", 150)])
def test_resize_keeps_aspect_and_never_upscales(tmp_path, flag, value):
    up = crop("astronaut", 300, 200, seed=1)
    files = {
        "land.jpg": encode(up),                               # 300x200: shrinks
        "port.jpg": encode(crop("rocket", 160, 240, seed=2)),  # 160x240: shrinks
        "exif6.jpg": exif_jpeg(up, 6),                         # stored 200x300, shown 300x200
        "small.jpg": encode(crop("coffee", 90, 60, seed=3)),  # below both limits: untouched
        "small.png": encode(crop("coffee", 90, 60, seed=3), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(up).convert("CMYK")),
    }
    shown = {"land.jpg": (300, 200), "port.jpg": (160, 240), "exif6.jpg": (300, 200),
             "small.jpg": (90, 60), "small.png": (90, 60), "cmyk.jpg": (300, 200)}
    for name, data in files.items():
        write(tmp_path / "src" / "c" / name, data)
    out = tmp_path / "ds"
    assert main(["build", str(tmp_path / "src"), "-o", str(out), flag, str(value),
                 "--workers", "1", "--shard-samples", "4", "-q"]) == 0
    check_dataset(out)
    rows = {Path(r["src_path"]).name: r for r in samples(out).to_dicts()}
    assert sorted(rows) == sorted(files)
    short, side = (value, None) if flag == "--resize-short" else (None, value)
    assert (manifest(out)["build"]["resize_short"], manifest(out)["build"]["max_side"]) == (short, side)
    for name, (w, h) in shown.items():
        want = _expected_size(w, h, short, side)
        row = rows[name]
        assert (row["width"], row["height"]) == want, name
        assert abs(want[0] / want[1] - w / h) < 0.02, name
        assert max(want) <= max(w, h)
        assert row["reencoded"] == (name != "small.jpg"), name
    assert rows["small.jpg"]["sha1"] == sha1(files["small.jpg"])
    # the rotated and resized image is upright: compare with the upright original, resized
    pixels = decode(stored_image(out, rows["exif6.jpg"]))
    want = np.asarray(Image.fromarray(up).resize(pixels.shape[1::-1], Image.Resampling.BICUBIC))
    assert np.abs(pixels - want).mean() < 6
    assert np.abs(pixels - want[::-1, ::-1]).mean() > 20


def test_resize_of_a_large_jpeg_matches_a_full_decode(tmp_path):
    big = photo("astronaut")  # 512x512; DCT-scaled decoding must not change what is stored
    write(tmp_path / "src" / "c" / "big.jpg", encode(big, quality=95))
    quiet_build(tmp_path / "src", tmp_path / "ds", resize_short=100)
    row = samples(tmp_path / "ds").row(0, named=True)
    assert (row["width"], row["height"]) == (100, 100)
    want = np.asarray(Image.fromarray(big).resize((100, 100), Image.Resampling.BICUBIC))
    assert np.abs(decode(stored_image(tmp_path / "ds", row)) - want).mean() < 6


@pytest.mark.parametrize("tiles", [1, 6])  # 6x6 chelseas: an image in several memory blocks (copied)
def test_resize_without_copies_gives_the_same_pixels_and_jpeg(tiles):
    torch = pytest.importorskip("torch")
    from wvdata.build.image import resize_rgb

    img = Image.fromarray(np.tile(photo("chelsea"), (tiles, tiles, 1)))
    w, h = img.width * 2 // 5, img.height * 2 // 5
    x = torch.from_numpy(np.array(img)).unsqueeze(0).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).contiguous().numpy()[0]
    got = resize_rgb(img, w, h)
    assert got.size == (w, h) and np.array_equal(np.asarray(got.convert("RGB")), want)
    jpeg, ref = io.BytesIO(), io.BytesIO()
    got.save(jpeg, format="JPEG", quality=90)
    Image.fromarray(want).save(ref, format="JPEG", quality=90)
    assert jpeg.getvalue() == ref.getvalue()
