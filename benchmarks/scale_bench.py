"""WebVision 2.0 scale on one node: 16M train entries x 5,000 long-tailed classes, 294k val.

A small real dataset is built once (`wvdata.synth.make_webvision_crawl` -> `wvdata.build`, one
train shard of REAL images, one val shard); the scaled dataset directory is then made from it
without re-encoding anything: shard files are hard links to the real shards, `samples.parquet`
rows point at real byte ranges (entry i of shard k is real sample i, under a key of its own),
labels are long-tailed over 5,000 classes, the shards' `.idx` are the real ones with the keys
renamed. Then each figure of issue 10, each in a fresh process, next to its target:

- torch loader (2 workers, batch 64, 224 px, train transform): seconds from `loader()` to the
  first batch (and the main process's CPU seconds, which load skews less); each worker's PSS
  and the main process's RSS after 4 batches.
- DALI loader (CPU, 2 threads): seconds (and CPU seconds) from `loader()` to the first batch.
- `select(per_class=100)` (all columns, and the entry columns only), and writing a view of every
  train entry (view.json + entries.parquet + one .idx per shard).

`--code DIR` measures another checkout of wvdata (e.g. `git archive` of the commit before the
change) with the same dataset, for before/after figures from the same machine.

    python -m benchmarks.scale_bench [--scale small|full] [--entries N] [--code DIR]

--scale full: 16,000,000 train entries (294,000 val); small: 200,000 (29,400 val).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common
from benchmarks._common import load, result

OUT = Path(__file__).resolve().parent / "out"
RESULTS = Path(__file__).resolve().parent / "results" / "scale-cpu.txt"
SIZES = {"small": (200_000, 29_400), "full": (16_000_000, 294_000)}
REAL_TRAIN, REAL_VAL, CLASSES = 4000, 1000, 5000
TARGETS = {"worker_pss_mb": 300, "main_rss_mb": 2048, "torch_first_batch_s": 10, "dali_first_batch_s": 30,
           "select_per_class_s": 10, "view_write_s": 10}


def real_dataset() -> Path:
    """The small real dataset (cached): REAL_TRAIN train images in one shard, REAL_VAL val in one."""
    out = OUT / f"scale-real-{REAL_TRAIN}-{REAL_VAL}"
    if (out / "ds" / "dataset.json").is_file():
        return out / "ds"
    import wvdata
    from wvdata.synth import make_webvision_crawl

    shutil.rmtree(out, ignore_errors=True)
    crawl = make_webvision_crawl(out / "crawl", classes=10, train_per_class=REAL_TRAIN // 10,
                                 val_per_class=REAL_VAL // 10, test=0, sizes=[(96, 72), (80, 100), (120, 90)],
                                 seed=3)
    wvdata.build(crawl.root, out / "ds", shard_samples=max(REAL_TRAIN, REAL_VAL), workers=2, progress=False)
    shutil.rmtree(out / "crawl")
    return out / "ds"


def long_tail(n: int, classes: int, seed: int = 0):
    """n labels over `classes` classes, sizes falling like (rank + 1) ** -0.8 above a floor (20 each
    where n allows), in random order."""
    import numpy as np

    w = (np.arange(classes) + 1.0) ** -0.8
    floor = max(1, min(20, n // (2 * classes)))
    counts = floor + np.floor((n - floor * classes) * w / w.sum()).astype(np.int64)
    counts[0] += n - counts.sum()
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(rng.permutation(classes), counts)).astype(np.int64)


def scaled_dataset(n_train: int, n_val: int) -> Path:
    """The scaled dataset directory (cached; made from the real one, nothing re-encoded)."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    real = real_dataset()
    out = OUT / f"scale-{n_train}"
    if (out / "dataset.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    manifest = json.loads((real / "dataset.json").read_text())
    manifest["classes"] = [f"n{c:08d}" for c in range(CLASSES)]
    manifest["splits"] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        t0 = time.perf_counter()
        (out / split).mkdir(parents=True)
        src = pl.read_parquet(real / split / "samples.parquet")
        (rec,) = json.loads((real / "dataset.json").read_text())["splits"][split]["shards"]
        m = src.height
        head, body = (real / split / f"{rec['name']}.idx").read_bytes().split(b"\n", 1)
        labels = long_tail(n, CLASSES, seed=1 if split == "train" else 2)
        shards, writer, done, n_shards = [], None, 0, -(-n // m)
        for k0 in range(0, n_shards, 256):  # 256 shards per parquet write
            chunk = []
            for k in range(k0, min(k0 + 256, n_shards)):
                count = min(m, n - k * m)
                name = f"shard-{k:06d}"
                os.link(real / split / f"{rec['name']}.tar", out / split / f"{name}.tar")
                lines = body.replace(b".", b"-%06d." % k)  # keys contain no '.': only member names change
                if count < m:
                    lines = b"\n".join(lines.split(b"\n")[:count]) + b"\n"
                (out / split / f"{name}.idx").write_bytes(f"v1.2 {count}\n".encode() + lines)
                shards.append({"name": name, "samples": count, "bytes": rec["bytes"]})
                chunk.append(src.head(count).with_columns(
                    pl.lit(name).alias("shard"), (pl.col("key") + f"-{k:06d}").alias("key"),
                    (pl.col("src_path") + f"-{k:06d}").alias("src_path")))
            part = pl.concat(chunk)
            lab = labels[done:done + part.height]
            done += part.height
            part = part.with_columns(pl.Series("label", lab, dtype=part.schema["label"]),
                                     pl.Series("class_name", np.array(manifest["classes"])[lab]))
            table = part.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(out / split / "samples.parquet", table.schema)
            writer.write_table(table)
        writer.close()
        shutil.copy(real / split / "errors.parquet", out / split / "errors.parquet")
        manifest["splits"][split] = {"samples": n, "errors": 0, "bytes": rec["bytes"] * len(shards),
                                     "shards": shards}
        print(f"  {split}: {n:,} entries in {len(shards)} hard-linked shards, {time.perf_counter() - t0:.1f}s",
              flush=True)
    (out / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return out


# ------------------------------------------------------------------ measurements (child processes)

def _rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(RSS, PSS) in MB of a process, from /proc/PID/smaps_rollup."""
    vals = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:"):
                vals[parts[0]] = int(parts[1]) / 1024
    return vals["Rss:"], vals["Pss:"]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def measure(what: str, ds: str) -> dict:
    """One figure, in this (fresh) process."""
    import resource

    import wvdata

    print(f"measuring {what} with {wvdata.__file__}", file=sys.stderr)

    if what in ("torch", "dali"):
        import torch  # imported before the clock starts: the figure is the loader's own time

        from wvdata.stream import loader

        torch.set_num_threads(1)
        kw = dict(batch_size=64, image_size=224, num_workers=2, rank=0, world_size=1, seed=0)
        if what == "dali":
            kw["device"] = "cpu"
        t0, c0 = time.perf_counter(), time.process_time()
        ld = loader(ds, backend=what, **kw)
        built, built_cpu = time.perf_counter() - t0, time.process_time() - c0
        it = iter(ld)
        next(it)
        first = time.perf_counter() - t0
        # CPU seconds of this process (all its threads, not the torch workers): what a busy machine
        # skews much less than the wall time
        row = {"first_batch_s": first, "first_batch_cpu_s": round(time.process_time() - c0, 2),
               "loader_s": round(built, 2), "loader_cpu_s": round(built_cpu, 2)}
        if what == "dali" and hasattr(ld, "segments"):  # (code before the segmented epochs has none)
            row["segments"] = len(ld.segments()) - 1
        if what == "torch":
            for _ in range(3):
                next(it)
            workers = _children(os.getpid())
            pss = [_rss_mb(p)[1] for p in workers]
            rss, _ = _rss_mb()
            row.update(worker_pss_mb=max(pss) if pss else float("nan"), workers=len(pss), main_rss_mb=rss,
                       main_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return row
    from wvdata import views

    if what == "select":
        t0 = time.perf_counter()
        df = views.select(ds, "train", per_class=100)
        row = {"select_s": time.perf_counter() - t0, "entries": df.height}
        try:
            t0 = time.perf_counter()
            views.select(ds, "train", per_class=100, columns=views.ENTRY_COLUMNS)
            row["select_entry_columns_s"] = time.perf_counter() - t0
        except TypeError:  # a version without `columns`
            pass
        return row
    if what == "view":
        import polars as pl

        cols = [c for c in views.ENTRY_COLUMNS if c != "sample"]
        ent = pl.read_parquet(Path(ds) / "train" / "samples.parquet", columns=cols)
        ent = ent.with_row_index("sample").select(views.ENTRY_COLUMNS)
        name = f"scale-bench-{os.getpid()}"
        t0 = time.perf_counter()
        v = views.write_view(ds, name, ent, "train")
        took = time.perf_counter() - t0
        shutil.rmtree(Path(ds) / "views" / name, ignore_errors=True)
        return {"view_write_s": took, "entries": len(v)}
    raise ValueError(what)


def run_child(what: str, ds: Path, code: Path, timeout: float) -> dict:
    """`measure(what)` in a fresh process that imports wvdata from `code` (this file is loaded by
    path, so `code` may be a checkout without it)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import importlib.util, json, sys; "
           f"spec = importlib.util.spec_from_file_location('scale_bench', {str(Path(__file__).resolve())!r}); "
           "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
           f"print('MEASURE ' + json.dumps(m.measure({what!r}, {str(ds)!r})))"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=code)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("MEASURE "):
            return json.loads(line[8:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SIZES), default="full")
    p.add_argument("--entries", type=int, default=None, help="train entries (default: by --scale)")
    p.add_argument("--code", default=None, help="the wvdata checkout to measure (default: this one)")
    p.add_argument("--label", default="after", help="name of this code's column in the output")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per figure")
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("--only", default="torch,dali,select,view", help="figures to measure (default: all)")
    args = p.parse_args(argv)
    n_train, n_val = SIZES[args.scale]
    if args.entries:
        n_train, n_val = args.entries, max(1, args.entries * 294 // 16000)
    code = Path(args.code or Path(__file__).resolve().parent.parent).resolve()
    lines = [_common.machine(), f"{load()} (before)",
             f"{n_train:,} train entries x {CLASSES} long-tailed classes, {n_val:,} val; code: {code} ({args.label})"]
    print("\n".join(lines), flush=True)
    t0 = time.perf_counter()
    ds = scaled_dataset(n_train, n_val)
    print(f"dataset ready in {time.perf_counter() - t0:.0f}s: {ds}", flush=True)
    got: dict = {}
    for what in args.only.split(","):
        row = run_child(what, ds, code, args.timeout)
        print(f"  {what}: {row}", flush=True)
        got.update({f"{what}_{k}" if k in ("first_batch_s", "error", "entries") else k: v for k, v in row.items()})
    figures = [("worker_pss_mb", "torch worker PSS", "MB"), ("main_rss_mb", "torch main process RSS", "MB"),
               ("torch_first_batch_s", "torch loader first batch", "s"),
               ("dali_first_batch_s", "DALI loader first batch", "s"),
               ("select_s", "select(per_class=100)", "s"),
               ("select_entry_columns_s", "select(per_class=100, columns=ENTRY_COLUMNS)", "s"),
               ("view_write_s", f"write a {n_train:,}-entry view", "s")]
    for key, text, unit in figures:
        value = got.get(key)
        target = TARGETS.get(key, TARGETS["select_per_class_s"] if key.startswith("select") else None)
        shown = f"{value:10.1f} {unit}" if isinstance(value, (int, float)) else f"{'-':>10}   "
        line = f"{text:48s} {shown}   target <= {target} {unit}"
        lines.append(line)
        print(line, flush=True)
        if isinstance(value, (int, float)):
            result("scale", f"{text} ({args.label}, {n_train:,} entries)", round(value, 2), unit,
                   higher_is_better=False, target=target)
    errors = {k: v for k, v in got.items() if k.endswith("error")}
    if errors:
        lines.append(f"errors: {errors}")
    lines.append(load() + " (after)")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
