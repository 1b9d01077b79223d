"""Streaming benchmark: wvdata's loaders against what a user would otherwise run, same cores.

All rows read the same dataset, built by `wvdata.build(crawl, resize_short=256)` from a cached
crawl of web-size JPEGs (benchmarks/_crawl.py), with W workers each, from a warm page cache
(everything is read once first; caches are never dropped, as that would disturb other jobs):

1. raw read: the torch backend's byte-range reads (`stream._Files`, one seek + read per sample,
   in epoch order, batches dealt round-robin to W processes as DataLoader does), no decode,
   against `cat shard*.tar > /dev/null` (images/sec = samples / seconds). Target >= 0.8x.
2. torch backend: `loader(backend="torch", batch_size=64, image_size=224, num_workers=W)`:
   decode + RandomResizedCrop + flip + RandAugment(2, 9), uint8 batches (normalised later on the
   device), against the webdataset pipeline from its README: WebDataset(shards).shuffle(1000)
   .decode("pil").to_tuple("jpg", "cls").map_tuple(v2 Compose(RRC, flip, RandAugment, ToImage,
   ToDtype, Normalize), int).batched(64) in WebLoader(num_workers=W), each sample once per epoch
   (split_by_worker is WebDataset's default). Target >= 1.5x.
3. DALI backend on the CPU (num_threads=W), same settings, against the same baseline.
4. DALI "mixed" (GPU) decode, only when CUDA is present.
5. The peers a user would pick instead, each over a copy of the same JPEG bytes, with the
   baseline's transforms, batch and workers (benchmarks/_stream_peers.py): LitData 0.2.x
   (`optimize`, then StreamingDataset + StreamingDataLoader) and MosaicML streaming 0.13
   (MDSWriter, then StreamingDataset + StreamingDataLoader). A peer that is not installed is
   skipped with a note (`make bench` installs them).

Rows run interleaved, one epoch each per round, so that other jobs on the machine hit all rows
alike. Two measures: images/sec of wall time (each epoch drops its first W batches, i.e. worker
start-up; best epoch), and CPU ms per image (user + sys of the process and its workers over a
whole epoch; best epoch), which other jobs on a shared machine barely move.

    python -m benchmarks.stream_bench [--scale small|full] [--images N] [--workers W] [--epochs E]

--scale full: 2,000 images, 3 rounds; small: 800 images, 2 rounds (about two minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common
from benchmarks._common import cpu_seconds, load, read_all
from benchmarks._crawl import OUT, make_crawl

BATCH, SIZE, SHORT = 64, 224, 256
RESULTS = Path(__file__).resolve().parent / "results" / "stream-cpu.txt"
Measure = tuple[int, float, int, float]  # timed images, wall seconds, all images, CPU seconds


def prepare(images: int, shard_samples: int, workers: int) -> Path:
    """The built dataset for this crawl (cached under benchmarks/out/; built when missing)."""
    import wvdata

    crawl = make_crawl(images, workers=workers)
    out = OUT / "stream-bench" / f"ds-{crawl.name}-s{shard_samples}"
    if not (out / "dataset.json").is_file():  # the manifest is written last
        print(f"building {out} ...", flush=True)
        wvdata.build(crawl, out, resize_short=SHORT, shard_samples=shard_samples, workers=workers,
                     overwrite=True, progress=False)
    return out


def warm(paths: Iterable[str]) -> int:
    """Read every shard once, so that all rows read from the page cache."""
    return read_all(paths)


# ---------------------------------------------------------------- row 1: raw reads

def _read_batches(args: tuple[list[str], Any, Any, Any, list[np.ndarray]]) -> tuple[int, float]:
    from wvdata.stream.base import ShardFiles as _Files

    paths, shard_id, offset, size, batches = args
    c0, n = time.process_time(), 0
    files = _Files(paths)
    for positions in batches:
        for p in positions:
            files.read(shard_id[p], offset[p], size[p])
        n += len(positions)
    files.close()
    return n, time.process_time() - c0


def raw_epoch(pool, ld, epochs: list[int], workers: int) -> Measure:
    """Byte-range reads of every entry for each of `epochs`, batches dealt to W processes."""
    src = ld.entries
    jobs: list[list[np.ndarray]] = [[] for _ in range(workers)]
    for e in epochs:
        pos = ld.positions(e)
        for i in range(0, len(pos), BATCH):
            jobs[(i // BATCH) % workers].append(pos[i:i + BATCH])
    args = [(src.paths, src.shard_id, src.offset, src.size, j) for j in jobs]
    c0, t0 = cpu_seconds(), time.perf_counter()
    done = pool.map(_read_batches, args)
    t, n = time.perf_counter() - t0, sum(k for k, _ in done)
    return n, t, n, cpu_seconds() - c0 + sum(c for _, c in done)


def cat_epoch(paths: list[str], samples: int, repeat: int) -> Measure:
    cmd = " ".join(["cat"] + paths) + " > /dev/null"
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeat):
        subprocess.run(cmd, shell=True, check=True)
    return samples * repeat, time.perf_counter() - t0, samples * repeat, cpu_seconds() - c0


# ---------------------------------------------------------------- rows 2-4: decode + augment

def timed(batches: Iterable, skip: int) -> Measure:
    """One epoch; the clock starts when batch skip-1 lands and counts the images after it."""
    n = total = 0
    t0 = None
    c0 = cpu_seconds()
    for i, batch in enumerate(batches):
        total += len(batch[0])
        if i == skip - 1:
            t0 = time.perf_counter()
        elif i >= skip:
            n += len(batch[0])
    if t0 is None:
        raise ValueError("an epoch shorter than the warm-up: use more --images")
    return n, time.perf_counter() - t0, total, cpu_seconds() - c0


def wds_baseline(urls: list[str], workers: int, seed: int):
    """The webdataset README pipeline, with torchvision v2 transforms on PIL images."""
    import torch
    import webdataset as wds
    from torchvision.transforms import v2

    from wvdata.stream.transforms import IMAGENET_MEAN, IMAGENET_STD

    transform = v2.Compose([v2.RandomResizedCrop(SIZE), v2.RandomHorizontalFlip(),
                            v2.RandAugment(2, 9), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed)
          .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int)
          .batched(BATCH))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def dali_loader(ds: Path, workers: int, gpu: bool):
    from wvdata import loader

    return loader(ds, backend="dali", batch_size=BATCH, image_size=SIZE, num_workers=workers, rank=0,
                  world_size=1, device="gpu" if gpu else "cpu")


def quiet_dali_deprecations() -> None:
    """DALI warns about its own deprecated aliases (used by its auto_aug) under simplefilter
    ("default"), which no filter can silence; drop those messages at display time."""
    show = warnings.showwarning

    def showwarning(message, category, *a: Any, **k: Any) -> None:
        if not (category is DeprecationWarning and "is now deprecated" in str(message)):
            show(message, category, *a, **k)
    warnings.showwarning = showwarning


# ---------------------------------------------------------------- report

SIZES = {"small": {"images": 800, "epochs": 2, "raw_repeat": 5, "raw_tries": 2},
         "full": {"images": 2000, "epochs": 3, "raw_repeat": 20, "raw_tries": 5}}
PEERS = {"litdata": ("litdata", "litdata_loader"), "mosaic streaming": ("streaming", "mosaic_loader")}


def machine() -> list[str]:
    import torch

    v = _common.versions(["torch", "torchvision", "pillow", "nvidia-dali-cuda130", "webdataset", "litdata",
                          "mosaicml-streaming"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [_common.machine(gpu=gpu), "versions: " + ", ".join(f"{k}={x}" for k, x in v.items())]


def peer_rows(ds: Path, w: int, say: Callable[..., None]) -> list[tuple[str, Any]]:
    """(name, loader) of each installed peer; a note for each that is not installed or fails to set up."""
    import importlib.util

    from benchmarks import _stream_peers

    out = []
    for name, (module, make) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            say(f"{name}: skipped, {module} is not installed (`make bench` installs the peers)")
            continue
        try:
            out.append((name, getattr(_stream_peers, make)(ds, BATCH, SIZE, w)))
        except Exception as e:  # a peer's own failure must not take the other rows down
            say(f"{name}: skipped, setting it up failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--epochs", type=int, help="rounds; each row runs one epoch a round")
    ap.add_argument("--shard-samples", type=int, default=250)
    ap.add_argument("--raw-repeat", type=int, help="epochs per raw-read measurement")
    ap.add_argument("--raw-tries", type=int, help="raw-read measurements a round (cheap)")
    ap.add_argument("--no-dali", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="leave out LitData and MosaicML streaming")
    ap.add_argument("--out", help="text copy of the output (default: results/stream-cpu.txt at --scale full)")
    args = _common.parse_scaled(ap, argv, SIZES)
    w, r = max(1, args.workers), args.raw_repeat
    out = args.out or (str(RESULTS) if args.scale == "full" else None)
    lines: list[str] = []

    def say(*msg: str) -> None:
        for m in msg:
            print(m, flush=True)
            lines.append(m)

    import torch

    from wvdata import loader

    quiet_dali_deprecations()
    ds = prepare(args.images, args.shard_samples, w)
    urls = sorted(glob.glob(str(ds / "train" / "shard-*.tar")))
    ld = loader(ds, backend="torch", batch_size=BATCH, image_size=SIZE, num_workers=w, rank=0,
                world_size=1)
    n = len(ld.view)
    gpu = torch.cuda.is_available()
    say(*machine())
    peers = [] if args.no_peers else peer_rows(ds, w, say)
    mb = warm(urls + [str(f) for f in ds.parent.glob(f"*-{ds.name}/*") if f.is_file()]) / 1e6
    say(f"dataset: {ds.relative_to(OUT.parent.parent)}: {n} train samples (web-size JPEGs built with "
        f"resize_short={SHORT}), {len(urls)} shards; the peers' copies hold the same JPEG bytes",
        f"settings: workers={w} for every row (DALI: num_threads={w}), batch={BATCH}, image={SIZE}, "
        f"train (RandomResizedCrop + flip + RandAugment(2, 9)), {args.epochs} rounds, rows "
        f"interleaved; wall: first {w} batches of each epoch dropped, best epoch; CPU: whole epoch, "
        f"best epoch; raw reads: {r} epochs a measurement, best of {args.raw_tries} a round",
        f"page cache: warmed by reading all shards and copies once ({mb:.0f} MB; not dropped: shared "
        f"machine); start {load()}")

    Row = tuple[str, Callable[[int], Measure]]
    pool = mp.get_context("fork").Pool(w)
    e_ = ld.entries
    pool.map(_read_batches, [(e_.paths, e_.shard_id, e_.offset, e_.size, [])] * w)
    raw: list[Row] = [("cat", lambda e: cat_epoch(urls, n, r)),
                      ("torch reads", lambda e: raw_epoch(pool, ld, list(range(e * r, e * r + r)), w))]
    base = wds_baseline(urls, w, seed=0)

    def epoch_of(it: Any, sync: bool = False) -> Callable[[int], Measure]:
        def synced() -> Iterable:
            for b in it:
                torch.cuda.synchronize()  # mixed decode outputs are on the GPU
                yield b

        def run(e: int) -> Measure:
            if hasattr(it, "set_epoch"):
                it.set_epoch(e)
            return timed(synced() if sync else it, w)
        return run
    rows: list[Row] = [("webdataset", epoch_of(base)), ("torch", epoch_of(ld))]
    for name, on_gpu in [] if args.no_dali else [("dali cpu", False)] + [("dali mixed", True)] * gpu:
        try:
            rows.append((name, epoch_of(dali_loader(ds, w, gpu=on_gpu), sync=on_gpu)))
        except Exception as e:  # a backend failing leaves the other rows standing
            _common.failed("stream", f"decode+RRC+RandAugment, {name}", e)
    rows += [(name, epoch_of(it)) for name, it in peers]

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    seen: dict[str, set[int]] = {}  # images in each whole epoch, per row: each sample once
    for e in range(args.epochs):
        for group, tries in ((raw, args.raw_tries), (rows, 1)):
            for _ in range(tries):
                for name, run in list(group):
                    try:
                        k, sec, total, c = run(e + 1)
                    except Exception as err:
                        _common.failed("stream", f"decode+RRC+RandAugment, {name}", err)
                        group.remove((name, run))
                        continue
                    wall[name] = max(wall.get(name, 0.0), k / sec)
                    spread.setdefault(name, []).append(k / sec)
                    cpu[name] = min(cpu.get(name, float("inf")), c / total * 1e3)
                    if tries == 1:
                        seen.setdefault(name, set()).add(total)
                        say(f"  round {e + 1}: {name:16} {k:5d} img {sec:7.3f} s {k / sec:7.1f} img/s, "
                            f"{c / total * 1e3:6.2f} CPU ms/img [{load()}]")
            if tries > 1:
                say(f"  round {e + 1}: raw reads, best so far: " + ", ".join(
                    f"{name} {wall[name]:.0f} img/s {cpu[name] * 1e3:.1f} CPU us/img" for name, _ in group)
                    + f" [{load()}]")
    pool.close()
    say(f"images in each whole epoch: {', '.join(f'{k} {sorted(v)}' for k, v in seen.items())} (view: {n})")
    say("", *table(wall, cpu, spread, gpu), "",
        "ratio = this row / its baseline (row 1: cat; rows 2-5: webdataset); for CPU, baseline ms / "
        "this row's ms. The baseline and the peers yield normalised float32 batches (what a user writes), "
        "wvdata uint8 (normalised on the device).",
        "Wall-time rates move with other jobs on a shared machine (see the load averages and the "
        "range over epochs); CPU ms/img is the contention-robust comparison.", f"end: {load()}")
    results(wall, cpu)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


def table(wall: dict[str, float], cpu: dict[str, float], spread: dict[str, list[float]], gpu: bool) -> list[str]:
    head = (f"{'row':32} {'images/s':>9} {'range, epochs':>17} {'ratio':>6} {'CPU ms/img':>11} {'ratio':>6} "
            f"{'target':>7}")
    out = [head, "-" * len(head)]

    def row(label: str, name: str, baseline: str | None = None, target: float | None = None) -> None:
        if name not in wall:
            return
        rw = f"{wall[name] / wall[baseline]:.2f}x" if baseline else "-"
        rc = f"{cpu[baseline] / cpu[name]:.2f}x" if baseline else "-"
        tgt = f">={target}x" if target else "-"
        ok = "" if not target else "  (wall {}, CPU {})".format(
            *("met" if v >= target else "MISSED" for v in (wall[name] / wall[baseline],
                                                           cpu[baseline] / cpu[name])))
        rng = f"{min(spread[name]):.0f}-{max(spread[name]):.0f}"
        out.append(f"{label:32} {wall[name]:9.1f} {rng:>17} {rw:>6} {cpu[name]:11.4f} {rc:>6} {tgt:>7}{ok}")
    row("1. cat shard*.tar", "cat")
    row("1. torch byte-range reads", "torch reads", "cat", 0.8)
    row("2. webdataset + torchvision", "webdataset")
    row("2. wvdata torch", "torch", "webdataset", 1.5)
    row("3. wvdata dali (cpu)", "dali cpu", "webdataset")
    row("4. wvdata dali (mixed)", "dali mixed", "webdataset")
    if not gpu:
        out.append(f"{'4. wvdata dali (mixed)':32} skipped (no GPU)")
    row("5. litdata StreamingDataLoader", "litdata", "webdataset")
    row("5. mosaic StreamingDataset", "mosaic streaming", "webdataset")
    return out


def results(wall: dict[str, float], cpu: dict[str, float]) -> None:
    """The headline figures as RESULT lines (collected by `python -m benchmarks`)."""
    res = _common.result
    if "torch reads" in wall:
        res("stream", "raw byte-range reads", wall["torch reads"], "img/s", baseline="cat", baseline_value=wall["cat"],
            target=0.8)
    aug = "decode+RRC+RandAugment"
    for name, label, target in (("torch", "torch backend", 1.5), ("dali cpu", "DALI backend, CPU", None),
                                ("dali mixed", "DALI backend, mixed (GPU)", None)):
        if name in wall:
            res("stream", f"{aug}, {label}", wall[name], "img/s", baseline="webdataset+torchvision",
                baseline_value=wall["webdataset"], target=target)
    res("stream", f"{aug}, torch backend, CPU per image", cpu["torch"], "CPU ms/img",
        baseline="webdataset+torchvision", baseline_value=cpu["webdataset"], higher_is_better=False)
    for peer, label in (("litdata", "LitData StreamingDataLoader"), ("mosaic streaming", "MosaicML StreamingDataset")):
        if peer in wall:
            res("stream", f"{aug}, torch backend", wall["torch"], "img/s", baseline=label,
                baseline_value=wall[peer])


if __name__ == "__main__":
    main(sys.argv[1:])
