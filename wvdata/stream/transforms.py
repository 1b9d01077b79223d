"""Decode + augment one stored JPEG for the torch backend (PIL only).

Train: RandomResizedCrop -> horizontal flip -> RandAugment(n, m) (`RandAugment`: torchvision's
operations and magnitudes, written on PIL). Eval: resize the short side
to size/crop_ratio, then a centre crop, 5 crops or 10 crops (5 + their mirrors). JPEGs are
decoded at reduced size (libjpeg DCT scaling) whenever the crop still gets enough pixels.
Outputs are uint8 HWC arrays; normalisation happens on the device (see stream.normalize).
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    train: bool = True
    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug_n: int = 2
    randaug_m: int = 9
    hflip: bool = True
    eval_crops: int = 1
    crop_ratio: float = 0.875


def rrc_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (x, y, w, h): 10 tries at a random area/aspect, then centre."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _open_scaled(data: bytes, need_w: int, need_h: int) -> tuple[Image.Image, float, float]:
    """Open a JPEG decoded at the smallest DCT scale whose size is >= (need_w, need_h)."""
    img = Image.open(io.BytesIO(data))
    full_w, full_h = img.size
    if img.format == "JPEG" and (need_w * 2 <= img.width and need_h * 2 <= img.height):
        img.draft("RGB", (max(1, need_w), max(1, need_h)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()
    return img, img.width / full_w, img.height / full_h


def train_image(data: bytes, width: int, height: int, cfg: TransformConfig, rng: random.Random,
                randaug) -> np.ndarray:
    """One training view of a width x height JPEG: RandomResizedCrop + flip + RandAugment."""
    x, y, w, h = rrc_box(width, height, rng, cfg.scale, cfg.ratio)
    s = cfg.image_size
    # the decoded crop must keep >= s pixels per side, so scale down by at most w/s, h/s
    factor = min(w / s, h / s)
    img, kx, ky = _open_scaled(data, math.ceil(width / max(factor, 1.0)), math.ceil(height / max(factor, 1.0)))
    box = (x * kx, y * ky, min(img.width, (x + w) * kx), min(img.height, (y + h) * ky))
    img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaug is not None:
        img = randaug(img, rng)
    return np.asarray(img)


def eval_images(data: bytes, width: int, height: int, cfg: TransformConfig) -> np.ndarray:
    """Eval views: resize short side to size/crop_ratio, then 1, 5 or 10 crops (K x HWC)."""
    s = cfg.image_size
    short = int(round(s / cfg.crop_ratio))
    k = short / min(width, height)
    tw, th = max(s, round(width * k)), max(s, round(height * k))
    img, _, _ = _open_scaled(data, tw, th)
    img = img.resize((tw, th), Image.Resampling.BILINEAR)
    if cfg.eval_crops == 1:
        boxes = [((tw - s) // 2, (th - s) // 2)]
    elif cfg.eval_crops in (5, 10):
        boxes = [(0, 0), (tw - s, 0), (0, th - s), (tw - s, th - s), ((tw - s) // 2, (th - s) // 2)]
    else:
        raise ValueError(f"eval_crops must be 1, 5 or 10, got {cfg.eval_crops}")
    arr = np.asarray(img)
    crops = [arr[y:y + s, x:x + s] for x, y in boxes]
    if cfg.eval_crops == 10:
        crops += [c[:, ::-1] for c in crops]
    return np.stack(crops)


class RandAugment:
    """RandAugment (Cubuk et al., 2020) on PIL images: `n` operations, each drawn uniformly from
    the 14 below, at magnitude `m` of `bins` levels; the signed ones (shears, translations,
    rotation, enhancements) take a random sign. The operation list and the magnitude ranges are
    torchvision's (v2.RandAugment: shear 0-0.3, translation 0-150/331 of the side, rotation
    0-30 degrees, enhancement factor 1 +- 0-0.9, posterize 8-4 bits, solarize threshold 255-0),
    applied with PIL only: importing torchvision costs a loader seconds of start-up (it imports
    torch._dynamo), and the draws come from the sample's own `random.Random`, so an image is a
    function of its seed without seeding torch's generator."""

    OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
           "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
    SIGNED = frozenset(OPS[1:10])

    def __init__(self, n: int = 2, m: int = 9, bins: int = 31):
        if n < 0 or not 0 <= m < bins:
            raise ValueError(f"RandAugment needs n >= 0 and 0 <= m < {bins}, got n={n}, m={m}")
        self.n, self.m, self.bins = n, m, bins

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.n):
            op = self.OPS[rng.randrange(len(self.OPS))]
            sign = -1.0 if op in self.SIGNED and rng.random() < 0.5 else 1.0
            img = self.apply(img, op, sign)
        return img

    def apply(self, img: Image.Image, op: str, sign: float = 1.0) -> Image.Image:
        """One operation at this magnitude (`sign` -1 mirrors the signed ones)."""
        from PIL import ImageEnhance, ImageOps

        f = self.m / (self.bins - 1)  # 0..1 along each operation's range
        w, h = img.size
        affine = {"shear_x": (1, sign * 0.3 * f, 0, 0, 1, 0), "shear_y": (1, 0, 0, sign * 0.3 * f, 1, 0),
                  "translate_x": (1, 0, sign * 150 / 331 * w * f, 0, 1, 0),
                  "translate_y": (1, 0, 0, 0, 1, sign * 150 / 331 * h * f)}.get(op)
        if affine is not None:
            return img.transform(img.size, Image.Transform.AFFINE, affine, Image.Resampling.NEAREST, fillcolor=0)
        if op == "rotate":
            return img.rotate(sign * 30 * f, Image.Resampling.NEAREST, fillcolor=0)
        enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
                   "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}.get(op)
        if enhance is not None:
            return enhance(img).enhance(1 + sign * 0.9 * f)
        if op == "posterize":
            return ImageOps.posterize(img, 8 - round(4 * f))
        if op == "solarize":
            return ImageOps.solarize(img, 255 * (1 - f))
        if op == "autocontrast":
            return ImageOps.autocontrast(img)
        if op == "equalize":
            return ImageOps.equalize(img)
        return img  # identity


def make_randaug(cfg: TransformConfig) -> RandAugment | None:
    """RandAugment(n, m) for training (None when n == 0 or not training)."""
    if not cfg.train or cfg.randaug_n <= 0:
        return None
    return RandAugment(cfg.randaug_n, cfg.randaug_m)
