"""Build benchmark: `wvdata.build` against the plain PIL + webdataset loop a user would write.

Both sides turn the same cached crawl of web-size JPEGs (benchmarks/_crawl.py) into WebDataset
shards of JPEGs resized to a short side of 256, on the same cores, from a warm page cache:

- wvdata build: `wvdata.build(crawl, out, resize_short=256, workers=W)`, end to end (scan,
  decode check, resize, encode, tar + DALI index + sample tables, manifest);
- baseline: per image `Image.open -> convert("RGB") -> resize(BICUBIC) -> save(JPEG, q=90)`
  into `webdataset.TarWriter`, the same number of images per shard, run in 1 process (what a
  user writes first) and in a W-process Pool over shards (the fair, same-cores comparison:
  the headline ratio).

Each side runs --repeat times, interleaved, and the best time counts. wvdata runs in a fresh
interpreter (its import not timed), killed if it hangs (--timeout): its fork-started pool can
deadlock inside polars. Shards are cut every --shard-samples images on both sides, so that a
small crawl gives enough shards for W cores, as a real crawl of millions of images does
(0: wvdata's default cut, 256 MB of input per shard, i.e. one shard for this crawl).

    python -m benchmarks.build_bench [--images N] [--workers W] [--repeat R] [--out FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import _common
from benchmarks._common import cpu_seconds
from benchmarks._crawl import OUT, image_paths, make_crawl, warm_cache

SHORT = 256
QUALITY = 90
Shard = tuple[str, list[tuple[str, str, int]]]  # (tar path, [(key, image path, label)])
Run = tuple[float, float, int] | None  # (wall s, CPU s, images); None: it hung, was killed


def baseline_shard(shard: Shard) -> int:
    """What a user writes: PIL open/convert/resize/save into webdataset's TarWriter."""
    import webdataset as wds
    from PIL import Image

    tar_path, items = shard
    with wds.TarWriter(tar_path) as sink:
        for key, path, label in items:
            img = Image.open(path).convert("RGB")
            w, h = img.size
            s = SHORT / min(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=QUALITY)
            sink.write({"__key__": key, "jpg": buf.getvalue(), "cls": label})
    return len(items)


def plan_baseline(crawl: Path, out: Path, per_shard: int, seed: int = 0) -> list[Shard]:
    items = [(f"{Path(p).parent.name}_{Path(p).stem}", p, label) for p, label in image_paths(crawl)]
    random.Random(seed).shuffle(items)
    per_shard = per_shard or len(items)
    return [(str(out / f"shard-{i // per_shard:06d}.tar"), items[i:i + per_shard])
            for i in range(0, len(items), per_shard)]


def run_baseline(shards: list[Shard], workers: int) -> int:
    if workers <= 1:
        return sum(baseline_shard(s) for s in shards)
    with mp.get_context("fork").Pool(workers) as pool:
        return sum(pool.imap_unordered(baseline_shard, shards))


_CHILD = f"""
import json, sys, time
import wvdata
from benchmarks._common import cpu_seconds
crawl, out, workers, shard_samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0, c0 = time.perf_counter(), cpu_seconds()
s = wvdata.build(crawl, out, resize_short={SHORT}, quality={QUALITY}, workers=workers,
                 shard_samples=shard_samples or None, progress=False)
print(json.dumps([time.perf_counter() - t0, cpu_seconds() - c0, sum(s.samples.values())]))
"""


def run_wvdata(crawl: Path, out: Path, workers: int, shard_samples: int, timeout: float) -> Run:
    """wvdata.build timed inside a fresh interpreter (imports excluded), killed on a hang."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(crawl), str(out), str(workers),
                             str(shard_samples)], stdout=subprocess.PIPE, preexec_fn=os.setpgrp,
                            cwd=Path(__file__).resolve().parent.parent)
    # its own process group (to kill it and its workers on a hang), not its own session: with
    # sched_autogroup a new session is scheduled as a separate group and gets another CPU share
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the build's own process group: it and its workers
        proc.wait()
        return None
    if proc.returncode:
        raise RuntimeError(f"wvdata build failed with exit status {proc.returncode}")
    seconds, cpu, n = json.loads(stdout.decode().strip().splitlines()[-1])
    return seconds, cpu, n


def timed(out: Path, fn: Callable[[], int]) -> Run:
    """Wall and CPU time of fn (its output directory emptied first) and the images it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = fn()
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.tar")) / 1e6


def machine() -> str:
    import PIL
    import webdataset
    from PIL import features

    return (f"{_common.machine()}, pillow={PIL.__version__}, webdataset={webdataset.__version__}, "
            f"libjpeg-turbo={features.version('libjpeg_turbo')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shard-samples", type=int, default=250)
    ap.add_argument("--timeout", type=float, default=300.0, help="kill a build hung this long")
    ap.add_argument("--out", help="also write the printed report to this file")
    args = ap.parse_args(argv)
    w = max(1, args.workers)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and w < len(cpus):  # everything below (children included) runs on the same W cores
        os.sched_setaffinity(0, cpus[:w])

    crawl = make_crawl(args.images, workers=w)
    n_in = len(image_paths(crawl))
    mb = warm_cache(crawl) / 1e6
    work = OUT / "build-bench"
    lines = [machine(),
             f"crawl: {crawl.name}: {n_in} JPEGs, {mb:.0f} MB, web sizes 500x375..1024x768; "
             f"resize_short={SHORT}, quality={QUALITY}, workers={w}, "
             f"shard_samples={args.shard_samples or 'default (256 MB)'}, best of {args.repeat}",
             f"load average before: {os.getloadavg()[0]:.2f}"]
    for line in lines:
        say(line)

    names = ["wvdata build", "baseline 1 process", f"baseline {w} processes"]
    outs = [work / "wvdata", work / "baseline-1", work / "baseline-w"]
    shards = plan_baseline(crawl, outs[1], args.shard_samples)
    shards_w = plan_baseline(crawl, outs[2], args.shard_samples)
    wall, cpu, count, hung = [float("inf")] * 3, [float("inf")] * 3, [0] * 3, 0
    for _ in range(args.repeat):  # interleaved, so that drifting machine load hits all sides
        shutil.rmtree(outs[0], ignore_errors=True)
        results = [run_wvdata(crawl, outs[0], w, args.shard_samples, args.timeout),
                   timed(outs[1], lambda: run_baseline(shards, 1)),
                   timed(outs[2], lambda: run_baseline(shards_w, w))]
        hung += results[0] is None
        for i, r in enumerate(results):
            if r:
                wall[i], cpu[i], count[i] = min(wall[i], r[0]), min(cpu[i], r[1]), r[2]
    if hung:
        say(f"WARNING: wvdata build hung {hung} of {args.repeat} times (killed after "
            f"{args.timeout:.0f}s)")
    if not count[0]:
        sys.exit("wvdata build never finished")
    rate = [n / t for n, t in zip(count, wall)]
    cpu_rate = [n / c for n, c in zip(count, cpu)]
    say(f"{'':22} {'images':>6} {'wall s':>7} {'images/s':>9} {'CPU s':>7} {'img/CPU-s':>9} "
        f"{'out MB':>6}  {'wvdata/this':>11}  {'(CPU)':>6}")
    for i, name in enumerate(names):
        say(f"{name:22} {count[i]:6d} {wall[i]:7.2f} {rate[i]:9.1f} {cpu[i]:7.2f} "
            f"{cpu_rate[i]:9.1f} {dir_mb(outs[i]):6.1f}  {rate[0] / rate[i]:10.2f}x "
            f"{cpu_rate[0] / cpu_rate[i]:6.2f}x")
    headline = rate[0] / rate[2]
    say(f"headline: wvdata build is {headline:.2f}x the same-cores baseline ({w} processes), "
        f"{cpu_rate[0] / cpu_rate[2]:.2f}x per CPU-second; target >= 2x: "
        f"{'met' if headline >= 2 else 'NOT met'}")
    say(f"load average after: {os.getloadavg()[0]:.2f} (other processes on these cores skew "
        "wall times; CPU-seconds are less affected)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(_PRINTED) + "\n")


_PRINTED: list[str] = []


def say(line: str) -> None:
    _PRINTED.append(line)
    print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
