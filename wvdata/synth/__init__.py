"""Small realistic crawls for demos, tests and benchmarks, made from real bundled data.

Each class is one of scikit-learn's bundled handwritten digits (real scans, 8x8), drawn in a
random colour over a crop of one of scikit-image's bundled photographs, at typical web sizes.
The result is a real, learnable 10-class set with WebVision's problems switchable on: class
imbalance, label noise and near-duplicate re-uploads. Needs the `synth` extra.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

WEB_SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (600, 800))
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
           "immunohistochemistry", "camera", "moon", "page", "text", "brick", "grass", "gravel")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"wvdata.synth needs {module}: pip install 'wvdata[synth]'") from None


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photographs as HxWx3 uint8 (shipped with the package)."""
    data = _need("skimage.data")
    out = []
    for name in _PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return tuple(out)


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (N x 8 x 8 float in [0, 1], N labels)."""
    ds = _need("sklearn.datasets").load_digits()
    return ds.images.astype(np.float32) / 16.0, ds.target.astype(np.int64)


def digit_image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A web-size photo of a real handwritten digit `label` in a random colour."""
    w, h = size
    pool = photos()
    photo = pool[rng.integers(len(pool))]
    ph, pw = photo.shape[:2]
    cw, chh = int(pw * rng.uniform(0.4, 1.0)), int(ph * rng.uniform(0.4, 1.0))
    x, y = rng.integers(0, pw - cw + 1), rng.integers(0, ph - chh + 1)
    bg = Image.fromarray(photo[y:y + chh, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR)
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


def jpeg(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Crawl:
    """What a generated crawl holds: per split, (relative path, true label, given label)."""

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.items.get(split, []))


def _plan(classes: int, train_per_class: int | tuple[int, int], rng: np.random.Generator) -> list[int]:
    lo, hi = (train_per_class, train_per_class) if isinstance(train_per_class, int) else train_per_class
    return [int(rng.integers(lo, hi + 1)) for _ in range(classes)]


def _label_noise(label: int, classes: int, noise: float, rng: np.random.Generator) -> int:
    if rng.random() < noise:
        return int((label + rng.integers(1, classes)) % classes)
    return label


def make_webvision_crawl(root: str | os.PathLike, *, classes: int = 10,
                         train_per_class: int | tuple[int, int] = 20, val_per_class: int = 5,
                         test: int = 20, label_noise: float = 0.0, duplicates: float = 0.0,
                         sizes=WEB_SIZES, seed: int = 0) -> Crawl:
    """A crawl in the official WebVision layout (info/ filelists, meta JSON, google/flickr)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    wnids = [f"n{9000000 + c:08d}" for c in range(classes)]
    names = [DIGIT_NAMES[c % 10] for c in range(classes)]
    (info / "synsets.txt").write_text("".join(f"{w} digit {n}\n" for w, n in zip(wnids, names)))
    crawl = Crawl(root, wnids, {"train": [], "val": [], "test": []})
    counts = _plan(classes, train_per_class, rng)
    for source, qoffset in (("google", 0), ("flickr", classes)):
        (info / f"queries_{source}.txt").write_text(
            "".join(f"{qoffset + c + 1} handwritten {names[c]}\n" for c in range(classes)))
        flist, mlist = [], []
        for c in range(classes):
            qid = f"q{qoffset + c + 1:04d}"
            n = counts[c] // 2 if source == "google" else counts[c] - counts[c] // 2
            records = []
            for i in range(n):
                rel = f"{source}/{qid}/{source[0]}{c:03d}{i:05d}.jpg"
                given = _label_noise(c, classes, label_noise, rng)
                img = digit_image(c, rng, sizes[rng.integers(len(sizes))])
                _write(root / rel, jpeg(img, int(rng.integers(75, 96))))
                flist.append(f"{rel} {given}\n")
                mlist.append(f"{source}/{qid}.json {i + 1}\n")
                records.append({"id": f"{source}{c}{i}", "title": f"{names[c]} #{i}",
                                "description": f"a photo of the digit {names[c]}",
                                "tags": [names[c], "digit", source]})
                crawl.items["train"].append((rel, c, given))
                if duplicates and rng.random() < duplicates:  # a re-upload under another query
                    drel = f"{source}/{qid}/{source[0]}{c:03d}{i:05d}d.jpg"
                    small = img.resize((img.width * 3 // 4, img.height * 3 // 4))
                    _write(root / drel, jpeg(small, 70))
                    flist.append(f"{drel} {given}\n")
                    mlist.append(f"{source}/{qid}.json {i + 1}\n")
                    crawl.items["train"].append((drel, c, given))
            _write(root / "meta" / source / f"{qid}.json", json.dumps(records).encode())
        (info / f"train_filelist_{source}.txt").write_text("".join(flist))
        (info / f"train_meta_list_{source}.txt").write_text("".join(mlist))
    val = []
    for c in range(classes):
        for _ in range(val_per_class):
            rel = f"val{len(val) + 1:06d}.jpg"
            _write(root / "val_images_256" / rel, jpeg(digit_image(c, rng, (341, 256))))
            val.append(f"{rel} {c}\n")
            crawl.items["val"].append((rel, c, c))
    (info / "val_filelist.txt").write_text("".join(val))
    tests = []
    for i in range(test):
        c = int(rng.integers(classes))
        rel = f"test{i + 1:06d}.jpg"
        _write(root / "test_images_256" / rel, jpeg(digit_image(c, rng, (256, 341))))
        tests.append(f"{rel}\n")
        crawl.items["test"].append((rel, c, -1))
    (info / "test_filelist.txt").write_text("".join(tests))
    return crawl


def make_folder_crawl(root: str | os.PathLike, *, classes: int = 10, train_per_class: int = 10,
                      val_per_class: int = 0, sizes=WEB_SIZES, seed: int = 0) -> Crawl:
    """A crawl as `root/[split/]<class name>/<image>.jpg` (split folders when val is asked)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = [DIGIT_NAMES[c % 10] + ("" if c < 10 else str(c)) for c in range(classes)]
    crawl = Crawl(root, sorted(names))
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        if not n:
            continue
        base = root / split if val_per_class else root
        crawl.items[split] = []
        for c in range(classes):
            for i in range(n):
                rel = f"{names[c]}/{i:05d}.jpg"
                _write(base / rel, jpeg(digit_image(c, rng, sizes[rng.integers(len(sizes))])))
                crawl.items[split].append((str((base / rel).relative_to(root)), c, c))
    return crawl


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_digits_folder(root: str | os.PathLike, *, size: int = 32, val_fraction: float = 0.2,
                       limit: int | None = None, seed: int = 0) -> Crawl:
    """scikit-learn's 1,797 real handwritten digits as coloured JPEGs, `root/{train,val}/<digit>/`.

    A real, clean, labelled 10-class set small enough to train on a CPU in a test; the val
    split is stratified.
    """
    rng = np.random.default_rng(seed)
    imgs, labels = digits()
    order = rng.permutation(len(labels))[:limit]
    root = Path(root)
    crawl = Crawl(root, sorted(DIGIT_NAMES), {"train": [], "val": []})
    seen: dict[int, int] = {}
    per_class = np.bincount(labels[order], minlength=10)
    for i in order:
        c = int(labels[i])
        seen[c] = seen.get(c, 0) + 1
        split = "val" if seen[c] <= round(per_class[c] * val_fraction) else "train"
        fg = rng.integers(128, 256, 3)
        bg = rng.integers(0, 100, 3)
        glyph = Image.fromarray((imgs[i] * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        a = np.asarray(glyph, dtype=np.float32)[..., None] / 255.0
        rgb = (a * fg + (1 - a) * bg).clip(0, 255).astype(np.uint8)
        rel = f"{split}/{DIGIT_NAMES[c]}/{i:05d}.jpg"
        _write(root / rel, jpeg(Image.fromarray(rgb), 92))
        crawl.items[split].append((rel, c, c))
    return crawl
