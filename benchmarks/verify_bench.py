"""What integrity checking costs: `wvdata verify` and the loader's `verify=True`, each beside the
same work without the check, same run, same dataset (the stream benchmark's: a cached crawl of
web-size JPEGs built with --resize-short 256), warm page cache.

1. `wvdata verify` (tar header + sha1 + .idx of every sample, W processes) against `cat` of the
   shards (the floor of any full read) and against a plain sha1 of every shard file.
2. The torch loader, eval transform (decode + resize + centre crop 224, W workers), with and
   without `verify=True`: the overhead is one sha1 per image.

    python -m benchmarks.verify_bench [--scale small|full] [--images N] [--workers W] [--rounds R]

--scale full: 2,000 images, best of 3 rounds; small: 800 images, best of 2.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import time
from pathlib import Path

from benchmarks import _common
from benchmarks._common import cpu_seconds, load, parse_scaled, read_all, result
from benchmarks.stream_bench import prepare

RESULTS = Path(__file__).resolve().parent / "results" / "verify-cpu.txt"
SIZES = {"small": {"images": 800, "rounds": 2}, "full": {"images": 2000, "rounds": 3}}


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, help="full: 2000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, help="best of R rounds, rows interleaved (full: 3)")
    args = parse_scaled(p, argv, SIZES)
    import wvdata
    from wvdata.verify import verify

    ds = prepare(args.images, 250, args.workers)
    shards = sorted(ds.glob("train/*.tar"))
    read_all(shards)
    n = wvdata.open_dataset(ds).samples("train").height

    def cat():
        subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)

    def sha1_files():
        for s in shards:
            h = hashlib.sha1()
            with open(s, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)

    def run_verify():
        assert verify(ds, ["train"], workers=args.workers, progress=False).ok

    def epoch(check: bool):
        def go():
            ld = wvdata.loader(ds, train=False, batch_size=64, image_size=224, num_workers=args.workers,
                               rank=0, world_size=1, verify=check)
            assert sum(len(k) for _, _, k in ld) == n
        return go

    rows = {"cat shards (1 process)": cat, "sha1 of every shard file (1 process)": sha1_files,
            f"wvdata verify ({args.workers} processes)": run_verify,
            "loader eval epoch, verify=False": epoch(False), "loader eval epoch, verify=True": epoch(True)}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            wall, cpu = timed(fn)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    lines = ["wvdata integrity benchmark", _common.machine(), load(),
             f"dataset: {n} samples, {sum(s.stat().st_size for s in shards) / 1e6:.0f} MB in {len(shards)} shards"
             f" (resize-short 256); best of {args.rounds} rounds, warm page cache"]
    for name, (wall, cpu) in best.items():
        lines.append(f"  {name:<44} {n / wall:>9.0f} img/s  ({wall:.2f}s wall, {cpu:.2f}s CPU)")
    v, c, s = (best[f"wvdata verify ({args.workers} processes)"][0], best["cat shards (1 process)"][0],
               best["sha1 of every shard file (1 process)"][0])
    off, on = best["loader eval epoch, verify=False"][0], best["loader eval epoch, verify=True"][0]
    lines.append(f"wvdata verify: {c / v:.2f}x the speed of cat, {s / v:.2f}x a plain sha1 of the files")
    lines.append(f"loader verify=True: {off / on:.3f}x the images/sec of verify=False "
                 f"({(on / off - 1) * 100:+.1f}% time per epoch)")
    text = "\n".join(lines)
    print(text)
    if args.scale == "full":
        RESULTS.write_text(text + "\n")
    result("verify", f"wvdata verify ({args.workers} processes)", n / v, "img/s", baseline="cat of the shards",
           baseline_value=n / c)
    result("verify", f"wvdata verify ({args.workers} processes) vs sha1 of the files", n / v, "img/s",
           baseline="sha1 of every shard file", baseline_value=n / s)
    result("verify", "loader eval epoch, verify=True", n / on, "img/s", baseline="verify=False",
           baseline_value=n / off)


if __name__ == "__main__":
    main()
