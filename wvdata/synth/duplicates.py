"""Near-duplicate and look-alike image sets made from images bundled with scikit-image and
scikit-learn (nothing is downloaded): the ground truth behind dedup's defaults, its tests and
its benchmark (`pip install wvdata[synth]`)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from . import images

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock", "moon",
          "hubble_deep_field", "immunohistochemistry", "retina", "page", "text", "cell")


def photo(name: str) -> Image.Image:
    """`images.photo(name)` as a PIL RGB image, the form the transforms below (and callers) edit
    (`stereo_motorcycle`: the left view of the pair)."""
    if name == "stereo_motorcycle":
        return _stereo_left().copy()
    return Image.fromarray(images.photo(name))


@cache
def _stereo_left() -> Image.Image:
    import skimage.data

    return Image.fromarray(np.asarray(skimage.data.stereo_motorcycle()[0])[..., :3])


HEAVY_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle",
                "immunohistochemistry")


def photo_crops(n: int, names: Iterable[str] = HEAVY_PHOTOS, sides: tuple[int, int] = (400, 1024),
                scales: tuple[float, float] = (1.0, 1.6), quality: tuple[int, int] = (80, 95),
                seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """A duplicate-heavy crawl: n web-size JPEGs, each a random crop of one of a few photos,
    (photo name, JPEG). The photo is scaled by U(scales), a crop of U(sides) px a side (at most
    the scaled photo) taken at a random place, saved at a random JPEG quality in `quality`.
    Popular images in a web crawl recur like this: re-framed, re-sized, re-encoded copies."""
    rng = np.random.default_rng(seed)
    names = tuple(names)
    srcs = [photo(p) for p in names]
    for i in range(n):
        k = i % len(names)
        im = srcs[k]
        s = float(rng.uniform(*scales))
        sw, sh = int(im.width * s), int(im.height * s)
        cw = min(int(rng.integers(sides[0], sides[1] + 1)), sw)
        ch = min(int(rng.integers(sides[0], sides[1] + 1)), sh)
        x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        box = (x / s, y / s, (x + cw) / s, (y + ch) / s)
        crop = im.resize((cw, ch), Image.Resampling.BICUBIC, box=box)
        yield names[k], jpeg(crop, int(rng.integers(quality[0], quality[1] + 1)))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """`img` converted to RGB (a grayscale copy too) as a JPEG, quality 90 by default."""
    return images.jpeg(img.convert("RGB"), quality)


def _crop(img: Image.Image, left: float = 0.0, top: float = 0.0, right: float = 0.0,
          bottom: float = 0.0) -> Image.Image:
    w, h = img.size
    return img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "resize50": lambda im: jpeg(im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC)),
    "jpeg_q30": lambda im: jpeg(im, 30),
    "crop5_all_sides": lambda im: jpeg(_crop(im, .05, .05, .05, .05)),
    "crop3_all_sides": lambda im: jpeg(_crop(im, .03, .03, .03, .03)),
    "crop5_left": lambda im: jpeg(_crop(im, left=.05)),
    "crop5_bottom": lambda im: jpeg(_crop(im, bottom=.05)),
    "brightness+10%": lambda im: jpeg(ImageEnhance.Brightness(im).enhance(1.1)),
    "grayscale": lambda im: jpeg(im.convert("L")),
    "combo": lambda im: jpeg(ImageEnhance.Brightness(_crop(im, left=.02, bottom=.04)).enhance(.9)
                             .resize((im.width // 2, im.height // 2)), 40),
}


def near_duplicates(names: Iterable[str] = PHOTOS,
                    transforms: Iterable[str] = tuple(TRANSFORMS)) -> list[tuple[str, bytes, dict[str, bytes]]]:
    """(photo name, original JPEG, {transform: copy JPEG}) per photo."""
    out = []
    for n in names:
        im = photo(n)
        out.append((n, jpeg(im), {t: TRANSFORMS[t](im) for t in transforms}))
    return out


def digits(per_class: int = 12, size: int = 64) -> list[tuple[int, bytes]]:
    """sklearn's 8x8 handwritten digits upscaled to size² (low entropy): (digit, JPEG)."""
    imgs, labels = images.digits()
    out = []
    for digit in range(10):
        for i in np.where(labels == digit)[0][:per_class]:
            a = (255 - imgs[i] * 256).clip(0, 255).astype(np.uint8)
            out.append((digit, jpeg(Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST))))
    return out


def look_alikes(seed: int = 0) -> dict[str, list[bytes]]:
    """Groups of distinct images that look alike (hard negatives): tiles of one texture,
    regions of one photo, handwritten digits of one class, icons on flat backgrounds."""
    groups: dict[str, list[bytes]] = {}
    for t in ("brick", "grass", "gravel"):
        im = photo(t)
        groups[f"{t}_tiles"] = [jpeg(im.crop((x, y, x + 256, y + 256)))
                                for x, y in ((0, 0), (256, 0), (0, 256), (256, 256), (128, 128))]
    for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "retina"):
        im = photo(n)
        cw, ch = int(im.width * .6), int(im.height * .6)
        g = []
        for fx, fy in ((0, 0), (1, 0), (0, 1), (1, 1), (.5, .5)):
            x, y = int(fx * (im.width - cw)), int(fy * (im.height - ch))
            g.append(jpeg(im.crop((x, y, x + cw, y + ch))))
        groups[f"{n}_regions"] = g
    for digit, data in digits():
        groups.setdefault(f"digit{digit}", []).append(data)
    groups["icons"] = icons(12, seed)
    return groups


def icons(n: int, seed: int = 0) -> list[bytes]:
    """Small filled shapes on light flat backgrounds (low entropy look-alikes)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        im = Image.new("RGB", (256, 256), bg)
        draw = ImageDraw.Draw(im)
        x, y = (int(v) for v in rng.integers(60, 160, 2))
        r = int(rng.integers(15, 40))
        col = tuple(int(v) for v in rng.integers(0, 120, 3))
        (draw.ellipse if k % 2 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=col)
        out.append(jpeg(im))
    return out


def flat(value: int, size: tuple[int, int] = (120, 90)) -> bytes:
    """A blank image of one gray level (its perceptual hash is rounding noise)."""
    return jpeg(Image.new("RGB", size, (value, value, value)))
