"""`python -m wvdata.demo`: the data layer alone, end to end, on a small realistic crawl made on the spot
(`make demo` runs the whole recipe, `python -m trainer.recipe demo`, whose crawl `make_crawl` writes).

Generates a WebVision-layout crawl (real handwritten digits over real photos, label noise,
re-uploaded near duplicates, val images leaked into train, broken files), builds it, shows
`wvdata info`, finds duplicates and leaks, writes a clean class-balanced view and streams one
epoch of it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .build import build, format_summary
from .dedup import dedup
from .dedup import format_summary as dedup_summary
from .info import format_info, info
from .synth import WEB_SIZES, digits, jpeg, make_webvision_crawl, photos
from .views import view


def clear_digit(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A real handwritten digit filling most of a darkened real photo, in a bright random colour: what a
    2-core CPU learns in a few minutes (synth's digit_image, small and low-contrast, takes far longer)."""
    w, h = size
    pool = photos()
    bg = pool[rng.integers(len(pool))]
    ph, pw = bg.shape[:2]
    cw, ch = int(pw * rng.uniform(0.3, 1.0)), int(ph * rng.uniform(0.3, 1.0))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = Image.fromarray((bg[y:y + ch, x:x + cw] * 0.45).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    imgs, labels = digits()
    glyph = imgs[rng.choice(np.flatnonzero(labels == label))]
    side = int(min(w, h) * rng.uniform(0.75, 0.95))
    mask = Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 80))
    jx, jy = (w - side) // 4, (h - side) // 4
    ox = (w - side) // 2 + int(rng.integers(-jx, jx + 1))
    oy = (h - side) // 2 + int(rng.integers(-jy, jy + 1))
    img.paste(Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(170, 256, 3))), (ox, oy), mask)
    return img


def _redraw(crawl, sizes: Sequence[tuple[int, int]], seed: int) -> None:
    """Every image of the crawl drawn again with `clear_digit` (its true label), re-uploads as smaller,
    lower-quality copies of their redrawn original, as make_webvision_crawl makes them."""
    rng = np.random.default_rng([seed, 18])
    for split in ("train", "val", "test"):
        folder = {"train": "", "val": "val_images_256/", "test": "test_images_256/"}[split]
        for rel, true, _ in crawl.items[split]:
            path = crawl.root / f"{folder}{rel}"
            if split == "train" and rel.endswith("d.jpg"):  # a re-upload of the previous file
                with Image.open(crawl.root / f"{rel[:-5]}.jpg") as orig:
                    small = orig.convert("RGB").resize((orig.width * 3 // 4, orig.height * 3 // 4))
                path.write_bytes(jpeg(small, 70))
                continue
            size = (341, 256) if split == "val" else (256, 341) if split == "test" else sizes[rng.integers(len(sizes))]
            path.write_bytes(jpeg(clear_digit(true % 10, rng, size), int(rng.integers(75, 96))))


def make_crawl(crawl_dir: str | os.PathLike, per_class: int | tuple[int, int] = (20, 60), *, val_per_class: int = 10,
               test: int = 50, label_noise: float = 0.1, duplicates: float = 0.05,
               sizes: Sequence[tuple[int, int]] = WEB_SIZES, seed: int = 0) -> int:
    """A WebVision-layout crawl: real digits over real photos (`clear_digit`; `per_class` train images per class,
    a range for imbalance), `label_noise` of the train labels wrong, `duplicates` of them re-uploaded,
    3 val images re-found by the crawl (leaks), a truncated and a missing file. Returns the inputs listed."""
    crawl_dir = Path(crawl_dir)
    crawl = make_webvision_crawl(crawl_dir, train_per_class=per_class, val_per_class=val_per_class, test=test,
                                 label_noise=label_noise, duplicates=duplicates, sizes=sizes, seed=seed)
    _redraw(crawl, sizes, seed)
    google = crawl_dir / "google" / "q0001"
    (google / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    lines = ["google/q0001/broken.jpg 0", "google/q0001/missing.jpg 0"]
    for rel, label, _ in crawl.items["val"][:3]:  # a crawl re-finds some val images: leaks
        shutil.copy(crawl_dir / "val_images_256" / rel, google / f"leak-{rel}")
        lines.append(f"google/q0001/leak-{rel} {label}")
    with open(crawl_dir / "info" / "train_filelist_google.txt", "a") as f:
        f.write("".join(line + "\n" for line in lines))
    n = crawl.count("train") + len(lines)
    print(f"    {n} train, {crawl.count('val')} val, {crawl.count('test')} test inputs in {crawl_dir}")
    return n + crawl.count("val") + crawl.count("test")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo-out", help="working folder (replaced)")
    p.add_argument("--per-class", type=int, default=60, help="train images per class (max; imbalanced)")
    p.add_argument("--crawl-only", action="store_true", help="only write the crawl, to OUT itself")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    if args.crawl_only:
        make_crawl(out, (args.per_class // 3, args.per_class))
        return 0
    crawl_dir, dataset = out / "crawl", out / "dataset"
    print(f"1/6 a WebVision-layout crawl in {crawl_dir}: real handwritten digits over real photos, "
          "10% label noise, re-uploads, leaked val images, broken files")
    make_crawl(crawl_dir, (args.per_class // 3, args.per_class))
    print(f"2/6 wvdata build {crawl_dir} -o {dataset} --resize-short 256 --shard-samples 128")
    print(format_summary(build(crawl_dir, dataset, resize_short=256, shard_samples=128)))
    print(f"3/6 wvdata info {dataset}")
    print(format_info(info(dataset)), end="")
    print(f"4/6 wvdata dedup {dataset} --report {out}/dedup.html")
    table = dedup(dataset, report=str(out / "dedup.html"))
    print(dedup_summary(table))
    print(f"5/6 wvdata view {dataset} clean --drop-duplicates --drop-leaks --per-class 30")
    v = view(dataset, "clean", drop_duplicates=True, drop_leaks=True, per_class=30)
    print(f"    {len(v)} entries, {v.entries['key'].n_unique()} unique samples, 10 classes x 30")
    print("6/6 one epoch of the clean view through wvdata.loader (torch backend, RandAugment)")
    from .stream import loader

    ld = loader(dataset, view="clean", batch_size=32, image_size=128, num_workers=2, rank=0, world_size=1)
    t0, n = time.perf_counter(), 0
    shape = None
    for images, _, keys in ld:
        n, shape = n + len(keys), tuple(images.shape[1:])
    print(f"    {n} images in {len(ld)} batches of {shape} uint8, "
          f"{n / (time.perf_counter() - t0):.0f} img/s (including worker start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
