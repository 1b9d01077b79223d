"""`make demo`: the data layer end to end on a small realistic crawl made on the spot.

Generates a WebVision-layout crawl (real handwritten digits over real photos, label noise,
re-uploaded near duplicates, val images leaked into train, broken files), builds it, shows
`wvdata info`, finds duplicates and leaks, writes a clean class-balanced view and streams one
epoch of it. `make demo` then trains a small model on that view with `trainer.train`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .build import build, format_summary
from .dedup import dedup
from .dedup import format_summary as dedup_summary
from .info import format_info, info
from .synth import make_webvision_crawl
from .views import view


def make_crawl(crawl_dir: Path, per_class: int) -> None:
    crawl = make_webvision_crawl(crawl_dir, train_per_class=(per_class // 3, per_class), val_per_class=10,
                                 test=50, label_noise=0.1, duplicates=0.05)
    google = crawl_dir / "google" / "q0001"
    (google / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    lines = ["google/q0001/broken.jpg 0", "google/q0001/missing.jpg 0"]
    for rel, label, _ in crawl.items["val"][:3]:  # a crawl re-finds some val images: leaks
        shutil.copy(crawl_dir / "val_images_256" / rel, google / f"leak-{rel}")
        lines.append(f"google/q0001/leak-{rel} {label}")
    with open(crawl_dir / "info" / "train_filelist_google.txt", "a") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"    {crawl.count('train') + len(lines)} train, {crawl.count('val')} val, "
          f"{crawl.count('test')} test inputs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo-out", help="working folder (replaced)")
    p.add_argument("--per-class", type=int, default=60, help="train images per class (max; imbalanced)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    crawl_dir, dataset = out / "crawl", out / "dataset"
    print(f"1/6 a WebVision-layout crawl in {crawl_dir}: real handwritten digits over real photos, "
          "10% label noise, re-uploads, leaked val images, broken files")
    make_crawl(crawl_dir, args.per_class)
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
