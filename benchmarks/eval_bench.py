"""The trainer at WebVision 2.0 scale: (a) evaluation of 294,000 images x 5,000 classes on 2 ranks,
(b) writing one epoch's AUM margins for 16,000,000 samples. New code beside the old, same run.

    python -m benchmarks.eval_bench [--scale small|full] [--parts eval,margins]

(a) Two ranks (processes, gloo on the CPU, one torch thread each) score a split as the trainer's
evaluation does, from the point where the model has produced each batch's softmax: the forward pass
is replaced by seeded synthetic softmax rows that depend on the sample id only (a fixed random
projection, the label boosted in 70% of the rows), so both paths get the same rows. The rank plan
(padding included) is the loader's (`wvdata.stream.order.rank_plan`), batch 256.
  new: `trainer.evaluate.score_passes`: float16 rows to a part file per rank, ids + top-1/5 hits
       gathered, rank 0 computes the metrics and assembles scores/val.npy by memory map.
  old: the trainer's code before this change (commit 8e4a647, `predict` + `accuracy_report`): every
       rank keeps its float32 rows, `all_gather_object` of (ids, rows), an N x C float32 matrix on
       every rank, the metrics on the whole matrix, `np.save` as float16.
Each path runs in fresh processes; figures are the peak RSS (VmHWM) of the larger rank, the RSS of a
rank before scoring (the interpreter with torch), and the seconds of the scoring on rank 0 (the
synthetic rows are made inside the loop and cost both paths the same). The old path at 294,000 x
5,000 needs about 3 x 5.9 GB on rank 0 plus 18 GB for the metrics (argpartition of the whole
matrix): it does not fit this 24 GB machine, so --scale full runs it at 29,400 rows (10%), beside
the new path at 29,400 and at 294,000 rows; both paths' score files and metrics are compared.
(b) `trainer.aum.write_margins` (sums on rank 0 -> parquet) against the code it replaces
(`trainer.train.write_margins` before this change: keys gathered by sample id, then polars), one
process, 16,000,000 samples with keys shaped like real ones, 5,000 classes; once with every sample
seen and once with a random 90% seen (a view or per-class resampling), 3 alternating rounds each,
the median. The files are compared.

--scale full: (a) 294,000 x 5,000 (old path 29,400 x 5,000), (b) 16,000,000; small: (a) 20,000 x
1,000 for both, (b) 1,000,000.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import load, machine, result

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": {"rows": 20_000, "classes": 1_000, "old_rows": 20_000, "margin_samples": 1_000_000},
         "full": {"rows": 294_000, "classes": 5_000, "old_rows": 29_400, "margin_samples": 16_000_000}}
BATCH, WORLD = 256, 2


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ---------------------------------------------------------------- (a) evaluation


def synthetic_labels(rows: int, classes: int) -> np.ndarray:
    """Long-tailed labels over all classes (every class present when rows >= 2 x classes)."""
    rng = np.random.default_rng(5)
    weights = 1.0 / np.arange(1, classes + 1) ** 0.5
    labels = rng.choice(classes, rows, p=weights / weights.sum())
    labels[:classes] = np.arange(classes)[:rows]
    return rng.permutation(labels).astype(np.int64)


class SyntheticModel:
    """Softmax rows that depend on the sample id alone: an id embedding times a fixed projection."""

    def __init__(self, labels: np.ndarray, classes: int, dim: int = 16):
        import torch

        rng = np.random.default_rng(6)
        self.embed = torch.from_numpy(rng.standard_normal((len(labels), dim), dtype=np.float32))
        self.proj = torch.from_numpy(rng.standard_normal((dim, classes), dtype=np.float32))
        boost = np.where(rng.random(len(labels)) < 0.7, 12.0, 0.0).astype(np.float32)
        self.labels, self.boost = torch.from_numpy(labels), torch.from_numpy(boost)

    def __call__(self, ids):
        import torch

        logits = self.embed[ids] @ self.proj
        logits[torch.arange(len(ids)), self.labels[ids]] += self.boost[ids]
        return logits.softmax(1)


def old_class_averaged(hits: np.ndarray, labels: np.ndarray) -> float:
    """trainer.metrics.class_averaged before this change (a loop over classes)."""
    classes = np.unique(labels)
    return float(np.mean([hits[labels == c].mean() for c in classes])) if len(classes) else float("nan")


def old_accuracy_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """trainer.metrics.accuracy_report before this change: top-k of the whole matrix at once."""
    from trainer.metrics import topk_hits

    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    out = {}
    for k in (1, 5):
        hits = topk_hits(scores, labels, k)
        out[f"top{k}"] = float(hits.mean()) if len(hits) else float("nan")
        out[f"class_top{k}"] = old_class_averaged(hits, labels)
    return out


def old_predict_and_save(batches, labels: np.ndarray, classes: int, rank: int, world: int, dest: Path):
    """The trainer before this change, from `predict` (one eval size) to `np.save` of the score file."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(len(labels), classes, dtype=torch.float32)
    ids_all, probs_all = [], []
    for probs, ids in batches():
        ids_all.append(ids)
        probs_all.append(probs.cpu())
    ids, probs = torch.cat(ids_all), torch.cat(probs_all)
    gathered = [None] * world
    dist.all_gather_object(gathered, (ids, probs))
    for rank_ids, rank_probs in gathered:
        total[rank_ids] = rank_probs
    probs = total.numpy()
    if rank != 0:
        return None
    report = old_accuracy_report(probs, labels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.save(dest, probs.astype(np.float16))
    return report


def rank_main(path: str, rank: int, port: int, rows: int, classes: int, out: str) -> None:
    """One rank of one path; writes its figures to out/rank{rank}.json."""
    import torch
    import torch.distributed as dist

    from trainer.evaluate import score_passes
    from wvdata.stream.order import rank_plan

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    labels = synthetic_labels(rows, classes)
    model = SyntheticModel(labels, classes)
    plan = rank_plan(np.arange(rows), rank, WORLD, BATCH)

    def batches():
        for i in range(len(plan)):
            ids = torch.from_numpy(plan.batch(i).astype(np.int64))
            yield model(ids), ids

    dest = Path(out) / "scores" / "val.npy"
    dist.barrier()
    before, t = vm_kib("VmRSS"), time.perf_counter()
    if path == "new":
        report = score_passes([batches], labels, classes, rank=rank, world=WORLD, device=torch.device("cpu"),
                              work=Path(out) / ".eval", dest=dest, name="val")
    else:
        report = old_predict_and_save(batches, labels, classes, rank, WORLD, dest)
    seconds = time.perf_counter() - t
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"seconds": seconds, "hwm_mib": vm_kib("VmHWM") / 1024, "before_mib": before / 1024, "report": report}))
    dist.destroy_process_group()


def run_path(path: str, rows: int, classes: int, out: Path) -> dict:
    """Both ranks of one path in fresh processes: {seconds (rank 0), hwm_mib (max rank), before_mib, report}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(path, r, port, rows, classes, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"{path} path failed: exit codes {[p.exitcode for p in procs]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"seconds": ranks[0]["seconds"], "hwm_mib": max(r["hwm_mib"] for r in ranks),
            "before_mib": max(r["before_mib"] for r in ranks), "report": ranks[0]["report"]}


def same_file(a: Path, b: Path) -> bool:
    """Equal .npy score files, compared a chunk of rows at a time."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return all(np.array_equal(x[i:i + 8192], y[i:i + 8192]) for i in range(0, len(x), 8192))


def bench_eval(rows: int, old_rows: int, classes: int, work: Path) -> list[str]:
    lines = [f"(a) evaluation: {WORLD} ranks (gloo, CPU, 1 torch thread each), batch {BATCH}, {classes:,} classes, "
             "synthetic softmax rows (the same in both paths)"]
    runs = {}
    for label, path, n in (("old", "old", old_rows), ("new", "new", old_rows), ("new-full", "new", rows)):
        if label == "new-full" and n == old_rows:
            continue
        runs[label] = run_path(path, n, classes, work / label)
        r = runs[label]
        lines.append(f"  {path} path, {n:,} x {classes:,}: {r['seconds']:.1f}s, peak RSS {r['hwm_mib']:,.0f} MiB "
                     f"(a rank before scoring: {r['before_mib']:,.0f} MiB); metrics "
                     + ", ".join(f"{k} {v:.4f}" for k, v in r["report"].items()))
    old, new = runs["old"], runs["new"]
    same = same_file(work / "old" / "scores" / "val.npy", work / "new" / "scores" / "val.npy")
    agree = all(abs(old["report"][k] - new["report"][k]) < 1e-12 for k in old["report"])
    lines.append(f"  at {old_rows:,} rows: score files identical: {same}; metrics equal: {agree}; "
                 f"peak RSS old/new {old['hwm_mib'] / new['hwm_mib']:.1f}x, time old/new "
                 f"{old['seconds'] / new['seconds']:.2f}x")
    result("eval", f"peak RSS, eval {old_rows:,} x {classes:,}, 2 ranks", new["hwm_mib"], "MiB",
           baseline="old all-in-memory path", baseline_value=old["hwm_mib"], higher_is_better=False)
    result("eval", f"seconds, eval {old_rows:,} x {classes:,}, 2 ranks", new["seconds"], "s",
           baseline="old all-in-memory path", baseline_value=old["seconds"], higher_is_better=False)
    if "new-full" in runs:
        full = runs["new-full"]
        per_row = (old["hwm_mib"] - old["before_mib"]) / old_rows
        lines.append(f"  at {rows:,} rows the old path would need about {old['before_mib'] + per_row * rows:,.0f} MiB "
                     f"on rank 0 (its growth per row at {old_rows:,}, times {rows:,}); the new path: "
                     f"{full['hwm_mib']:,.0f} MiB in {full['seconds']:.1f}s")
        result("eval", f"peak RSS, eval {rows:,} x {classes:,}, 2 ranks", full["hwm_mib"], "MiB",
               higher_is_better=False)
        result("eval", f"seconds, eval {rows:,} x {classes:,}, 2 ranks", full["seconds"], "s", higher_is_better=False)
    return lines


# ---------------------------------------------------------------- (b) margins


def old_write_margins(aum, path: Path, keys, labels: np.ndarray) -> None:
    """trainer.train.write_margins before this change (rank 0's part, after the reduction)."""
    import polars as pl

    ids, mean, count = aum.result()
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"key": keys.gather(ids), "label": labels[ids], "margin": mean, "count": count}).write_parquet(path)


def bench_margins(samples: int, work: Path, rounds: int = 3) -> list[str]:
    import polars as pl
    import torch

    from trainer.aum import MarginAccumulator, write_margins

    classes = 5000
    rng = np.random.default_rng(7)
    labels = rng.integers(0, classes, samples)
    ids = pl.Series(np.arange(samples))
    keys = (pl.lit("flickr/q") + (pl.Series(labels) % 1000).cast(pl.String).str.zfill(4) + "/"
            + ids.cast(pl.String).str.zfill(9) + ".jpg")
    keys = pl.select(keys.alias("key"))["key"]
    aum = MarginAccumulator(samples, torch.device("cpu"))
    lines = [f"(b) one epoch's margins file, {samples:,} samples, {classes:,} classes (keys like "
             f"{keys[0]!r}), {rounds} alternating rounds, median"]
    for case, frac in (("every sample seen", 1.0), ("90% seen", 0.9)):
        seen = np.arange(samples) if frac == 1.0 else np.sort(rng.permutation(samples)[:int(frac * samples)])
        aum.reset()
        aum.sum[torch.from_numpy(seen)] = torch.from_numpy(rng.normal(0.5, 2.0, len(seen)))
        aum.count[torch.from_numpy(seen)] = 1
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for name in ("old", "new"):
                t = time.perf_counter()
                if name == "old":
                    old_write_margins(aum, work / "old" / "epoch-000.parquet", keys, labels)
                else:
                    write_margins(aum, work / "new" / "epoch-000.parquet", keys, labels, rank=0)
                times[name].append(time.perf_counter() - t)
        old_s, new_s = (statistics.median(times[k]) for k in ("old", "new"))
        same = pl.read_parquet(work / "old" / "epoch-000.parquet").equals(
            pl.read_parquet(work / "new" / "epoch-000.parquet"))
        lines.append(f"  {case}: write_margins {new_s:.2f}s, old {old_s:.2f}s ({old_s / new_s:.2f}x); "
                     f"files equal in content: {same}")
        result("eval", f"margins file, {samples:,} samples, {case}", new_s, "s", baseline="old write_margins",
               baseline_value=old_s, higher_is_better=False)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=("small", "full"), default="full", help="problem sizes (see the docstring)")
    p.add_argument("--parts", default="eval,margins", help="which parts to run")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--old-rows", type=int, default=None)
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--margin-samples", type=int, default=None)
    args = p.parse_args(argv)
    for k, v in SIZES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    print(machine(gpu="none"))
    print(load())
    lines = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("WVDATA_BENCH_TMP")) as tmp:
        if "eval" in args.parts:
            lines += bench_eval(args.rows, args.old_rows, args.classes, Path(tmp) / "eval")
            print("\n".join(lines), flush=True)
        if "margins" in args.parts:
            more = bench_margins(args.margin_samples, Path(tmp) / "margins")
            print("\n".join(more), flush=True)
    print(load())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
