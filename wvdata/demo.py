"""`make demo`: generate a small realistic WebVision-style crawl, build it, show what it holds."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .build import build, format_summary
from .info import format_info, info
from .synth import make_webvision_crawl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo-out", help="working folder (replaced)")
    p.add_argument("--per-class", type=int, default=60, help="train images per class (max; imbalanced)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    crawl_dir, dataset = out / "crawl", out / "dataset"
    print(f"1/3 generating a WebVision-layout crawl in {crawl_dir} "
          "(real handwritten digits over real photos, 10% label noise, re-uploads, one broken file)")
    crawl = make_webvision_crawl(crawl_dir, train_per_class=(args.per_class // 3, args.per_class),
                                 val_per_class=10, test=50, label_noise=0.1, duplicates=0.05)
    (crawl_dir / "google" / "q0001" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with open(crawl_dir / "info" / "train_filelist_google.txt", "a") as f:
        f.write("google/q0001/broken.jpg 0\ngoogle/q0001/missing.jpg 0\n")
    print(f"    {crawl.count('train')} train, {crawl.count('val')} val, {crawl.count('test')} test images")
    print(f"2/3 wvdata build {crawl_dir} -o {dataset} --resize-short 256 --shard-samples 128")
    summary = build(crawl_dir, dataset, resize_short=256, shard_samples=128)
    print(format_summary(summary))
    print(f"3/3 wvdata info {dataset}")
    print(format_info(info(dataset)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
