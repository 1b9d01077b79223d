"""Images made from data bundled with scikit-image and scikit-learn (nothing is downloaded).

One loader for the bundled photographs (`photo`), crops of them, encoding in any format PIL
writes (`encode`, `jpeg`), JPEGs stored rotated under an EXIF Orientation, and web-size photos
of real handwritten digits (`digit_image`): the raw material of every crawl, test input and
benchmark image in wvdata. Needs the `synth` extra (`pip install 'wvdata[synth]'`).
"""
from __future__ import annotations

import io
from functools import cache
from types import ModuleType

import numpy as np
from PIL import Image, ImageFilter

WEB_SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (600, 800))
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the backgrounds of digit_image, in this order (a seeded choice indexes it)
BACKGROUNDS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "camera", "moon", "page", "text", "brick", "grass", "gravel")
JPEG_QUALITY = 92  # encode's default

# EXIF orientation -> the transpose that turns an upright image into the stored pixels
# (a viewer applies the inverse to show it upright).
STORED_FROM_UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,   # stored rotated 90 counter-clockwise, shown rotated clockwise
    8: Image.Transpose.ROTATE_270,  # stored rotated 90 clockwise, shown rotated counter-clockwise
}


def _need(module: str) -> ModuleType:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"wvdata.synth needs {module}: pip install 'wvdata[synth]'") from None


@cache
def photo(name: str) -> np.ndarray:
    """scikit-image's bundled photograph `name` (`skimage.data.<name>`) as HxWx3 uint8, read-only.

    Grayscale photos are repeated over the three channels, an alpha channel is dropped.
    """
    img = np.asarray(getattr(_need("skimage.data"), name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    arr = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    arr.setflags(write=False)
    return arr


def photos() -> tuple[np.ndarray, ...]:
    """The photos behind `digit_image`, in `BACKGROUNDS` order."""
    return tuple(photo(name) for name in BACKGROUNDS)


def crop(name: str, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A `width` x `height` view of a photo: a seeded crop, resized when the photo is smaller."""
    arr = photo(name)
    h, w = arr.shape[:2]
    if width > w or height > h:
        return np.asarray(Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR))
    rng = np.random.default_rng(seed)
    y, x = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    return np.ascontiguousarray(arr[y:y + height, x:x + width])


def encode(img: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    """`img` written in format `fmt`; `kw` are PIL's save options (a JPEG's quality defaults to 92)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if fmt == "JPEG":
        kw.setdefault("quality", JPEG_QUALITY)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(img: np.ndarray | Image.Image, quality: int = 88) -> bytes:
    """`img` as a JPEG of this quality (88: the crawls' default)."""
    return encode(img, "JPEG", quality=quality)


def exif_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose pixels are stored rotated, with the EXIF Orientation that undoes it."""
    stored = Image.fromarray(upright).transpose(STORED_FROM_UPRIGHT[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (N x 8 x 8 float in [0, 1], N labels)."""
    ds = _need("sklearn.datasets").load_digits()
    return ds.images.astype(np.float32) / 16.0, ds.target.astype(np.int64)


def digit_image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A web-size photo of a real handwritten digit `label` in a random colour over a photo crop."""
    w, h = size
    pool = photos()
    bg_photo = pool[rng.integers(len(pool))]
    ph, pw = bg_photo.shape[:2]
    cw, chh = int(pw * rng.uniform(0.4, 1.0)), int(ph * rng.uniform(0.4, 1.0))
    x, y = rng.integers(0, pw - cw + 1), rng.integers(0, ph - chh + 1)
    bg = Image.fromarray(bg_photo[y:y + chh, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR)
    bg = Image.blend(bg, Image.new("RGB", (w, h), (128, 128, 128)), 0.5)
    imgs, labels = digits()
    choices = np.flatnonzero(labels == label)
    glyph = imgs[choices[rng.integers(len(choices))]]
    side = int(min(w, h) * rng.uniform(0.5, 0.9))
    mask = Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 60))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    ox, oy = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
    bg.paste(Image.new("RGB", (side, side), colour), (int(ox), int(oy)), mask)
    return bg
