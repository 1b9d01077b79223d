"""Small realistic crawls, as a crawler would leave them on disk, made from `images`' digit photos.

Each class is one of scikit-learn's handwritten digits drawn over a crop of a scikit-image
photograph at typical web sizes: a real, learnable 10-class set with WebVision's problems
switchable on (class imbalance, label noise, near-duplicate re-uploads), in the WebVision
layout, a class-folder layout, or as the benchmarks' crawl of grainy web-size JPEGs.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import DIGIT_NAMES, WEB_SIZES, digit_image, digits, encode, jpeg


@dataclass
class Crawl:
    """What a generated crawl holds: per split, (relative path, true label, given label)."""

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.items.get(split, []))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


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
                         sizes: Sequence[tuple[int, int]] = WEB_SIZES, seed: int = 0) -> Crawl:
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
                img = digit_image(c % 10, rng, sizes[rng.integers(len(sizes))])
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
            _write(root / "val_images_256" / rel, jpeg(digit_image(c % 10, rng, (341, 256))))
            val.append(f"{rel} {c}\n")
            crawl.items["val"].append((rel, c, c))
    (info / "val_filelist.txt").write_text("".join(val))
    tests = []
    for i in range(test):
        c = int(rng.integers(classes))
        rel = f"test{i + 1:06d}.jpg"
        _write(root / "test_images_256" / rel, jpeg(digit_image(c % 10, rng, (256, 341))))
        tests.append(f"{rel}\n")
        crawl.items["test"].append((rel, c, -1))
    (info / "test_filelist.txt").write_text("".join(tests))
    return crawl


def make_folder_crawl(root: str | os.PathLike, *, classes: int = 10, train_per_class: int = 10,
                      val_per_class: int = 0, sizes: Sequence[tuple[int, int]] = WEB_SIZES,
                      seed: int = 0) -> Crawl:
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
                _write(base / rel, jpeg(digit_image(c % 10, rng, sizes[rng.integers(len(sizes))])))
                crawl.items[split].append((str((base / rel).relative_to(root)), c, c))
    return crawl


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
        _write(root / rel, jpeg(rgb, 92))
        crawl.items[split].append((rel, c, c))
    return crawl


def make_noisy_digits(root: str | os.PathLike, *, flip: float = 0.2, size: int = 32, seed: int = 0) -> Crawl:
    """`make_digits_folder` plus `root/manifest.csv` in which a `flip` share of the train labels
    is replaced by another class (val stays clean): the ground truth for label-noise methods
    (AUM, curriculum). The manifest's `true_label` column keeps the real class, so it reaches
    each sample's KEY.json; `Crawl.items` holds (path, true label, given label)."""
    crawl = make_digits_folder(root, size=size, seed=seed)
    rng = np.random.default_rng([seed, 1])
    lines = ["path,label,split,class_name,true_label\n"]
    for split, items in crawl.items.items():
        noisy = []
        for rel, c, _ in items:
            given = int((c + rng.integers(1, 10)) % 10) if split == "train" and rng.random() < flip else c
            noisy.append((rel, c, given))
            lines.append(f"{rel},{given},{split},{DIGIT_NAMES[given]},{c}\n")
        crawl.items[split] = noisy
    (crawl.root / "manifest.csv").write_text("".join(lines))
    crawl.classes = list(DIGIT_NAMES)
    return crawl


# ---------------------------------------------------------------- the benchmarks' crawl

def _grainy_name(label: int) -> str:
    return f"{DIGIT_NAMES[label % 10]}{label // 10 or ''}"


def _grainy_rel(i: int, classes: int) -> str:
    return f"{_grainy_name(i % classes)}/{i:07d}.jpg"


def _grainy_jpeg(job: tuple[Path, int, int, float, float, int]) -> None:
    """Write image i of the grainy crawl; everything about it is drawn from rng(seed, i)."""
    root, i, classes, progressive, grain, seed = job
    rng = np.random.default_rng([seed, i])
    img = digit_image(i % classes % 10, rng, WEB_SIZES[rng.integers(len(WEB_SIZES))])
    sigma = rng.uniform(0, grain)
    if sigma > 0:
        noisy = np.asarray(img, np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
        img = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    _write(root / _grainy_rel(i, classes), encode(img, "JPEG", quality=int(rng.integers(75, 96)),
                                                  progressive=bool(rng.random() < progressive), optimize=False))


def make_grainy_crawl(root: str | os.PathLike, images: int, *, classes: int = 10, progressive: float = 0.15,
                      grain: float = 12.0, seed: int = 0, workers: int | None = None) -> Crawl:
    """A folder crawl `root/<class name>/<i>.jpg` of `images` web-size JPEGs, made in a process pool.

    Each is a `digit_image` at one of `WEB_SIZES`, with camera-like grain of a random strength
    up to `grain` (the digit photos alone are smoother than real ones, ~0.8 bits/pixel against
    ~1.5-4 for web photos, and entropy decoding is a large part of JPEG decode time), JPEG
    quality 75-95, a share `progressive` of them progressive. Image i depends only on (seed, i),
    so the crawl is the same whatever the number of `workers` (default: one per CPU).
    """
    root = Path(root)
    jobs = [(root, i, classes, progressive, grain, seed) for i in range(images)]
    with mp.get_context("fork").Pool(workers or os.cpu_count() or 1) as pool:
        pool.map(_grainy_jpeg, jobs, chunksize=16)
    return Crawl(root, sorted(_grainy_name(c) for c in range(classes)),
                 {"train": [(_grainy_rel(i, classes), i % classes, i % classes) for i in range(images)]})
