"""Object storage: the build from a bucket into a bucket, and the loader reading from a bucket,
each beside the same work on the local disk, same run, same cores (loader rows: best of 2, interleaved).

The S3 endpoint is moto's standalone server on this machine (the one the tests use): no network
latency or bandwidth limit, but every object operation is a real HTTP request through s3fs and
botocore, and the server takes CPU from the same cores. It measures what the store path costs
in requests and CPU, not what a cloud bucket would give.

1. `wvdata build SRC -o OUT --resize-short 256 --workers W` (whole CLI) on a folder crawl of
   web-size JPEGs: local -> local against s3://crawl -> s3://dataset.
2. The torch loader, one eval epoch (decode + resize + centre crop 224, W workers), over that
   dataset on disk (page cache warm) against the same dataset in the bucket (byte-range reads);
   the DALI loader likewise where it can read the bucket.

    python -m benchmarks.store_bench [--scale small|full] [--images N] [--workers W]

--scale full: 2,000 images; small: 400.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common
from benchmarks._common import cpu_seconds, failed, load, parse_scaled, read_all, result
from benchmarks._crawl import make_crawl
from wvdata.synth.s3 import s3_env, start_s3_server

RESULTS = Path(__file__).resolve().parent / "results" / "store-cpu.txt"
OUT = Path(__file__).resolve().parent / "out" / "store-bench"
SIZES = {"small": {"images": 400}, "full": {"images": 2000}}


def _cli_build(src: str, out: str, workers: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    subprocess.run([sys.executable, "-m", "wvdata.cli", "build", src, "-o", out, "--resize-short", "256",
                    "--workers", str(workers), "-q"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, cpu_seconds() - c0


def _epoch(ds: str, backend: str, workers: int) -> tuple[float, int]:
    import wvdata

    t0 = time.perf_counter()
    ld = wvdata.loader(ds, backend=backend, train=False, batch_size=64, image_size=224, num_workers=workers,
                       rank=0, world_size=1)
    n = sum(len(k) for _, _, k in ld)
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, help="full: 2000")
    p.add_argument("--workers", type=int, default=2)
    args = parse_scaled(p, argv, SIZES)
    crawl = make_crawl(args.images, workers=args.workers)
    read_all(sorted(str(f) for f in crawl.rglob("*.jpg")))
    proc, endpoint = start_s3_server()
    os.environ.update(s3_env(endpoint, "bench", "bench"))
    lines = ["wvdata object-storage benchmark", _common.machine(), load(),
             f"crawl: {crawl.name}, {args.images} JPEGs; S3 = moto server on 127.0.0.1 (same cores); "
             f"{args.workers} workers"]
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(str(crawl), "bench/crawl", recursive=True)
        lines.append(f"upload of the crawl to the bucket (not timed below): {time.perf_counter() - t0:.1f} s")
        local = OUT / "ds-local"
        shutil.rmtree(local, ignore_errors=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        rows = {}
        rows["build local -> local"] = _cli_build(str(crawl), str(local), args.workers)
        rows["build s3 -> s3"] = _cli_build("s3://bench/crawl", "s3://bench/ds", args.workers)
        for name, (wall, cpu) in rows.items():
            lines.append(f"  {name:<34} {args.images / wall:>8.1f} img/s  ({wall:.2f} s wall, {cpu:.2f} s CPU "
                         "of this process and its children; the server's CPU not included)")
        (lw, _), (sw, _) = rows["build local -> local"], rows["build s3 -> s3"]
        lines.append(f"build into the bucket: {lw / sw:.2f}x the images/sec of the local build")
        result("store", "build s3 -> s3 (whole CLI)", args.images / sw, "img/s", baseline="build local -> local",
               baseline_value=args.images / lw)
        read_all(sorted(str(f) for f in local.rglob("*.tar")))
        for backend in ("torch", "dali"):
            try:
                dw = bw = float("inf")
                for _ in range(2):  # best of 2, interleaved (the first pays imports and start-up)
                    w, n = _epoch(str(local), backend, args.workers)
                    dw = min(dw, w)
                    w, n2 = _epoch("s3://bench/ds", backend, args.workers)
                    bw = min(bw, w)
            except Exception as e:  # e.g. DALI not installed
                lines.append(f"  loader ({backend}): not measured: {type(e).__name__}: {str(e)[:200]}")
                failed("store", f"{backend} loader from the bucket", e)
                continue
            assert n == n2
            lines.append(f"  {backend} loader eval epoch, disk     {n / dw:>8.1f} img/s  ({dw:.2f} s)")
            lines.append(f"  {backend} loader eval epoch, bucket   {n / bw:>8.1f} img/s  ({bw:.2f} s)  "
                         f"{dw / bw:.2f}x of disk")
            result("store", f"{backend} loader eval epoch from the bucket", n / bw, "img/s",
                   baseline="same loader from the local disk", baseline_value=n / dw)
    finally:
        proc.terminate()
        proc.wait(10)
    lines.append(load())
    text = "\n".join(lines)
    print(text)
    if args.scale == "full":
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
