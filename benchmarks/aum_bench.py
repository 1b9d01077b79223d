"""AUM costs: (a) the trainer's `--aum` overhead per training step; (b) `wvdata aum` at WebVision 2.0
scale (16,000,000 samples x 30 epochs of margins) beside the obvious polars group-by.

    python -m benchmarks.aum_bench [--scale small|full] [--parts a,b] [--samples 16000000] [--epochs 30] [--keep]

--scale full: the sizes below; small: (a) 2 epochs x 1 run each, (b) 300,000 samples x 8 epochs.

(a) runs the real trainer (`python -m trainer.train`, test_resnet at 64 px, batch 32, one torch thread)
on the noisy digits (built once under benchmarks/out/) without and with `--aum`, alternating, and
compares images/sec from metrics.jsonl (each run: the median over the epochs after the first) pair by
pair. Wall-clock rates on a machine shared with other jobs swing by several x, so the CPU seconds of
each whole run (trainer + loader workers, from getrusage) are compared as well: they include the
margins files written at each epoch's end, which images/sec leaves out. The accumulator's per-step work
(`MarginAccumulator.add`) is timed alone, and writing one epoch's margins at 16M samples in (b).
(b) writes a synthetic dataset directory holding what `wvdata aum` reads (dataset.json and
train/samples.parquet: N keys shaped like real ones, 5,000 classes) and one run directory with E
epoch files in the trainer's schema (key, label int64, margin float32, count int64; keys in sample
order, as a run over the whole split writes them; 20% of the samples have low margins). `wvdata
aum` runs in a fresh process (time; peak RSS from getrusage, VmHWM beside it), once on that run, and once on a run
whose epochs each hold a shuffled random 90% of the samples (a run over a view or with per-class
resampling: the key-join path, on fewer epochs). The baseline, a lazy polars scan of every epoch
file grouped by key (streaming engine), runs in a fresh process at a smaller size (it would not
fit at full size on this machine) beside wvdata aum at the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import cpu_seconds, load, machine, parse_scaled, result

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
CLASSES = 5000
SIZES = {"small": {"samples": 300_000, "epochs": 8, "join_epochs": 2, "baseline_samples": 300_000, "train_epochs": 2,
                   "train_reps": 1},
         "full": {"samples": 16_000_000, "epochs": 30, "join_epochs": 5, "baseline_samples": 2_000_000,
                  "train_epochs": 4, "train_reps": 3}}


# ---------------------------------------------------------------- (a) trainer overhead


def digits_dataset() -> Path:
    """The noisy digits (20% flipped train labels) built under benchmarks/out/ once."""
    from wvdata import build
    from wvdata.synth import make_noisy_digits

    base = OUT / "aum-digits"
    if not (base / "ds" / "dataset.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        crawl = make_noisy_digits(base / "src", flip=0.2)
        build(crawl.root / "manifest.csv", base / "ds", shard_samples=256, workers=2, progress=False)
    return base / "ds"


def trainer_run(ds: Path, aum: bool, epochs: int, workers: int) -> tuple[list[float], float]:
    """images/sec of each epoch after the first (from metrics.jsonl) of one trainer run, and the CPU seconds
    of the whole run (trainer and loader workers: steps, margins, evaluation, start-up)."""
    out = OUT / f"aum-run-{'on' if aum else 'off'}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.train", "--data", str(ds), "--out", str(out), "--model", "test_resnet",
           "--epochs", str(epochs), "--batch-size", "32", "--lr", "0.8", "--image-size", "64", "--randaug", "0,0",
           "--workers", str(workers), "--warmup-epochs", "0.3", "--no-progress"] + (["--aum"] if aum else [])
    cpu = cpu_seconds()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    cpu = cpu_seconds() - cpu
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rates = [json.loads(line)["images_per_sec"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return rates[1:], cpu


def accumulator_us(batch: int, classes: int, samples: int, repeat: int = 200) -> float:
    """Microseconds of one MarginAccumulator.add (margins of a batch, summed by sample id) on the CPU."""
    import torch

    from trainer.aum import MarginAccumulator

    acc = MarginAccumulator(samples, torch.device("cpu"))
    logits = torch.randn(batch, classes)
    labels = torch.randint(0, classes, (batch,))
    ids = torch.randint(0, samples, (batch,))
    for _ in range(10):
        acc.add(logits, labels, ids)
    t = time.perf_counter()
    for _ in range(repeat):
        acc.add(logits, labels, ids)
    return (time.perf_counter() - t) / repeat * 1e6


def bench_trainer(epochs: int, workers: int, reps: int) -> list[str]:
    """Runs without and with --aum, alternating; wall images/sec per pair and CPU seconds per run."""
    ds = digits_dataset()
    rate: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for aum in (False, True):
            r, c = trainer_run(ds, aum, epochs, workers)
            rate[aum].append(statistics.median(r))
            cpu[aum].append(c)
    n = json.loads((ds / "dataset.json").read_text())["splits"]["train"]["samples"]
    pair = [on / off for off, on in zip(rate[False], rate[True])]
    cpu_ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
    fmt = lambda xs, f="{:.1f}": ", ".join(f.format(x) for x in xs)  # noqa: E731
    lines = [f"(a) trainer --aum overhead: noisy digits ({n} train images), test_resnet 64 px, batch 32, "
             f"{epochs} epochs per run, {reps} runs each alternating off/on, loader workers {workers}, "
             "OMP_NUM_THREADS=1",
             f"  images/s (wall, median over epochs 1-{epochs - 1}): without --aum {fmt(rate[False])}; "
             f"with {fmt(rate[True])}",
             f"  ratio with/without per pair {fmt(pair, '{:.3f}')}; median {statistics.median(pair):.3f} "
             "(wall clock on a machine shared with other jobs: see the CPU figure)",
             f"  CPU seconds per run (trainer + loader workers, incl. start-up, eval and the margins files): "
             f"without {fmt(cpu[False])}; with {fmt(cpu[True])}",
             f"  ratio of medians with/without: {cpu_ratio:.3f} (overhead {100 * (cpu_ratio - 1):+.1f}%; "
             "target <= 3%)"]
    result("aum", "trainer --aum, CPU seconds per run", statistics.median(cpu[True]), "CPU s",
           baseline="trainer without --aum", baseline_value=statistics.median(cpu[False]), higher_is_better=False,
           target=1 / 1.03)  # overhead <= 3%
    result("aum", "trainer --aum, images/s (wall)", statistics.median(rate[True]), "img/s",
           baseline="trainer without --aum", baseline_value=statistics.median(rate[False]))
    step_ms = 32 / statistics.median(rate[False]) * 1e3
    small = accumulator_us(32, 10, n)
    big = accumulator_us(256, CLASSES, 16_000_000, repeat=50)
    lines += [f"  MarginAccumulator.add alone, CPU: batch 32 x 10 classes {small:.0f} us "
              f"({100 * small / 1e3 / step_ms:.3f}% of a {step_ms:.0f} ms step above); "
              f"batch 256 x {CLASSES} classes over 16M sample sums {big:.0f} us"]
    return lines


# ---------------------------------------------------------------- (b) wvdata aum at scale


def synthetic_dataset(root: Path, n: int) -> tuple[list, np.ndarray]:
    """dataset.json + train/samples.parquet (key, label) of n samples; keys like the real ones."""
    import polars as pl

    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"format": "wvdata", "version": 1,
                                                   "classes": [f"n{i:08d}" for i in range(CLASSES)],
                                                   "splits": {"train": {"samples": n, "shards": []}}}))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    df = pl.DataFrame({"i": np.arange(n, dtype=np.int64), "label": labels}).with_columns(
        pl.format("train_q{}_{}{}_{}", pl.col("label").cast(pl.String).str.zfill(4),
                  pl.when(pl.col("i") % 3 == 0).then(pl.lit("f")).otherwise(pl.lit("g")),
                  pl.col("i").cast(pl.String).str.zfill(8),
                  (pl.col("i").hash(7) % (1 << 63)).cast(pl.String).str.zfill(19).str.slice(0, 16)).alias("key"))
    df.select("key", "label").write_parquet(root / "train" / "samples.parquet")
    return df["key"], labels


def synthetic_run(run: Path, keys, labels: np.ndarray, epochs: int, subset: float | None) -> float:
    """Epoch files in the trainer's schema and writing code; returns the mean seconds to write one."""
    import polars as pl

    (run / "margins").mkdir(parents=True, exist_ok=True)
    n = len(labels)
    rng = np.random.default_rng(1)
    noisy = rng.random(n) < 0.2
    base = np.where(noisy, -1.0, 2.0).astype(np.float32)
    seconds = []
    for e in range(epochs):
        t = time.perf_counter()
        if subset is None:
            ids = np.arange(n)
        else:
            ids = rng.permutation(n)[: int(subset * n)]
        margin = base[ids] + rng.normal(0, 1.5, len(ids)).astype(np.float32)
        # as trainer.train.write_margins: keys gathered by sample id, then one parquet file
        pl.DataFrame({"key": keys.gather(ids), "label": labels[ids], "margin": margin,
                      "count": np.ones(len(ids), np.int64)}).write_parquet(run / "margins" / f"epoch-{e:03d}.parquet")
        seconds.append(time.perf_counter() - t)
    (run / "config.json").write_text(json.dumps({"args": {"aum": True, "view": "resampled" if subset else None}}))
    return float(np.mean(seconds))


def measure(what: str, ds: str, run: str) -> None:
    """Run in a fresh process: `wvdata aum` (compute + write) or the polars baseline; print JSON."""
    t = time.perf_counter()
    if what == "wvdata":
        from wvdata.aum import compute_aum, write_table
        from wvdata.dataset import open_dataset

        res = compute_aum(ds, [run], drop_fraction=0.2)
        t_compute = time.perf_counter() - t
        write_table(open_dataset(ds), res.table)
        extra = {"compute_s": t_compute, "flagged": res.stats["flagged"], "scored": res.stats["scored"]}
    else:
        import polars as pl

        files = sorted(str(p) for p in Path(run, "margins").glob("epoch-*.parquet"))[1:]
        agg = (pl.scan_parquet(files).group_by("key").agg(pl.col("margin").mean().alias("aum"), pl.len().alias("n"))
               .collect(engine="streaming"))
        extra = {"rows": agg.height}
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": usage, "hwm_mib": vm_hwm_mib(), **extra}))


def vm_hwm_mib() -> float:
    """This process's peak resident memory as the kernel's VmHWM says (a cross-check of getrusage)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def generate(base: str, n: int, epochs: int, join_epochs: int) -> None:
    """Run in a child process (so that the parent, whose memory Linux's ru_maxrss hands down to the
    measuring children, stays small): the dataset, the run and the shuffled-subset run; print JSON."""
    base_p = Path(base)
    done = base_p / "done.json"
    if done.exists():
        print(done.read_text())
        return
    shutil.rmtree(base_p, ignore_errors=True)
    t = time.perf_counter()
    keys, labels = synthetic_dataset(base_p / "ds", n)
    write_s = synthetic_run(base_p / "run", keys, labels, epochs, None)
    if join_epochs:
        synthetic_run(base_p / "run-view", keys, labels, join_epochs + 1, 0.9)
    info = json.dumps({"write_s": write_s, "seconds": time.perf_counter() - t})
    done.write_text(info)
    print(info)


def fresh(*args: object) -> dict:
    """`python -m benchmarks.aum_bench ARGS` in a fresh process; its last line of output as JSON."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aum_bench", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def bench_scale(n: int, epochs: int, join_epochs: int, small: int, keep: bool) -> list[str]:
    base = OUT / f"aum-{n}x{epochs}"
    g = fresh("--generate", base, n, epochs, join_epochs)
    lines = [f"(b) wvdata aum, synthetic: {n:,} samples x {epochs} epochs of margins "
             f"({du(base / 'run'):.1f} GiB of parquet, generated in {g['seconds']:.0f}s); "
             f"writing one epoch's margins file (the trainer's code, {n:,} rows): {g['write_s']:.1f}s"]
    r = fresh("--measure", "wvdata", base / "ds", base / "run")
    lines.append(f"  wvdata aum (keys in sample order, {epochs - 1} epochs used): {r['seconds']:.1f}s "
                 f"(compute {r['compute_s']:.1f}s + write table), peak RSS {r['peak_mib']:,.0f} MiB "
                 f"(VmHWM {r['hwm_mib']:,.0f}), {r['flagged']:,} flagged of {r['scored']:,}")
    r = fresh("--measure", "wvdata", base / "ds", base / "run-view")
    lines.append(f"  wvdata aum (each epoch a shuffled 90%: the key-join path, {join_epochs} epochs used): "
                 f"{r['seconds']:.1f}s ({r['compute_s'] / join_epochs:.1f}s per epoch), peak RSS "
                 f"{r['peak_mib']:,.0f} MiB (VmHWM {r['hwm_mib']:,.0f})")
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    sb = OUT / f"aum-{small}x{epochs}"
    fresh("--generate", sb, small, epochs, 0)
    ours, theirs = (fresh("--measure", what, sb / "ds", sb / "run") for what in ("wvdata", "polars"))
    result("aum", f"wvdata aum, {small:,} samples x {epochs} epochs, time", ours["seconds"], "s",
           baseline="polars scan + group_by", baseline_value=theirs["seconds"], higher_is_better=False)
    result("aum", f"wvdata aum, {small:,} samples x {epochs} epochs, peak memory (VmHWM)", ours["hwm_mib"], "MiB",
           baseline="polars scan + group_by", baseline_value=theirs["hwm_mib"], higher_is_better=False)
    lines.append(f"  at {small:,} x {epochs}: wvdata aum {ours['seconds']:.1f}s, peak {ours['peak_mib']:,.0f} MiB "
                 f"(VmHWM {ours['hwm_mib']:,.0f}); "
                 f"baseline polars scan_parquet(all epochs).group_by(key).mean() (streaming) {theirs['seconds']:.1f}s, "
                 f"peak {theirs['peak_mib']:,.0f} MiB (VmHWM {theirs['hwm_mib']:,.0f}) -> "
                 f"{theirs['seconds'] / ours['seconds']:.1f}x time, "
                 f"{theirs['peak_mib'] / ours['peak_mib']:.1f}x memory")
    if not keep:
        shutil.rmtree(sb, ignore_errors=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, help="(b) samples (full: 16000000)")
    p.add_argument("--epochs", type=int, help="(b) epochs of margins (full: 30)")
    p.add_argument("--join-epochs", type=int, help="(b) epochs used of the shuffled-subset run (full: 5)")
    p.add_argument("--baseline-samples", type=int, help="(b) size of the baseline comparison (full: 2000000)")
    p.add_argument("--train-epochs", type=int, help="(a) epochs per trainer run (full: 4)")
    p.add_argument("--train-reps", type=int, help="(a) runs without and with --aum (full: 3)")
    p.add_argument("--workers", type=int, default=2, help="(a) loader workers")
    p.add_argument("--parts", default="a,b", help="which parts to run (default: a,b)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic margins under benchmarks/out/")
    p.add_argument("--measure", nargs=3, metavar=("WHAT", "DATASET", "RUN"), help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=4, metavar=("DIR", "N", "EPOCHS", "JOIN_EPOCHS"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="text copy of the output (default: results/aum-cpu.txt at --scale full)")
    args = parse_scaled(p, argv, SIZES)
    if args.measure:
        measure(*args.measure)
        return
    if args.generate:
        generate(args.generate[0], *map(int, args.generate[1:]))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [machine(gpu="none"), load()]
    print("\n".join(lines), flush=True)
    parts = {"a": lambda: bench_trainer(args.train_epochs, args.workers, args.train_reps),
             "b": lambda: bench_scale(args.samples, args.epochs, args.join_epochs, args.baseline_samples, args.keep)}
    for name in args.parts.split(","):
        new = parts[name]()
        print("\n".join(new), flush=True)
        lines += new
    lines.append(load())
    print(lines[-1])
    out = args.out or (str(ROOT / "benchmarks" / "results" / "aum-cpu.txt") if args.scale == "full" else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
