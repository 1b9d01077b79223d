"""GA model weights over many memory-mapped score files: wall time and peak memory, beside dense baselines.

    python -m benchmarks.ensemble_bench [--scale small|full] [--models 128] [--images 50000] [--classes 1000]

--scale full: 128 models x 50,000 images x 1,000 classes (12.8 GB), population 32, 30 generations;
small: 16 x 5,000 x 100, population 16, 10 generations (seconds).

Generates (once, cached under benchmarks/out/ensemble/) M run directories of N x C float16 softmax
val scores with known structure: per-model strength and temperature (score distributions differ),
errors correlated as in real models: most of each image's class similarity is shared by all models
(then by the model's family, then its own), plus per-image confusable classes, and hard images are
hard for every model. Then, each in a fresh process so that ru_maxrss is its own:

1. wvdata GA: `load_scores` + the exact reduced form of the fitted half (one pass over the files) +
   `genetic_weights` (population 32, 30 generations); then `evaluate` (the held-out report, one
   more pass, timed apart).
2. baseline A, naive: each candidate's fitness as a dense weighted sum over the memory-mapped
   files (same arithmetic) + trainer.metrics.topk_hits; timed on 2 candidates (the plain average
   and the GA's best, which also checks that the reduced fitness agrees with the dense one),
   extrapolated to the GA's number of distinct evaluations.
3. baseline B, a dense pass per generation: all 32 candidates fused at once (BLAS sgemm) per chunk
   of a memory-mapped pass; timed on one generation over a slice of the fitted rows, extrapolated
   linearly to all rows and 31 generations.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import cpu_seconds, load, machine, parse_scaled, result

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "ensemble"
SIZES = {"small": {"models": 16, "images": 5000, "classes": 100, "population": 16, "generations": 10},
         "full": {"models": 128, "images": 50_000, "classes": 1000, "population": 32, "generations": 30}}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- data


def dataset_dir(m: int, n: int, c: int, seed: int) -> Path:
    return OUT / f"M{m}-N{n}-C{c}-s{seed}"


def truth(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and balanced labels of the synthetic val split."""
    labels = np.random.default_rng([seed, 0]).permutation(np.arange(n) % c)
    return np.array([f"val_{i:07d}" for i in range(n)]), labels


def generate(m: int, n: int, c: int, seed: int, chunk: int = 5000) -> Path:
    """M run directories (scores/val.npy float16 + val_keys.parquet); cached by parameters."""
    import polars as pl

    d = dataset_dir(m, n, c, seed)
    if (d / "done").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    keys, labels = truth(n, c, seed)
    rng = np.random.default_rng([seed, 1])
    difficulty = rng.uniform(0.6, 1.4, n).astype(np.float32)  # hard images are hard for every model
    confusers = rng.integers(0, c, (n, 8))  # shared confusable classes per image: correlated mistakes
    boost = rng.normal(2.0, 0.7, (n, 8)).astype(np.float32)
    strength = rng.uniform(3.5, 5.5, m).astype(np.float32)
    strength[rng.permutation(m)[: m // 8]] += 1.0  # a few strong models
    temperature = np.exp(rng.uniform(np.log(0.5), np.log(3.0), m)).astype(np.float32)
    family = rng.integers(0, 8, m)  # models of a family share part of their noise
    t0 = time.perf_counter()
    for j in range(m):
        run = d / f"m{j:03d}" / "scores"
        run.mkdir(parents=True)
        pl.DataFrame({"key": keys}).write_parquet(run / "val_keys.parquet")
        arr = np.lib.format.open_memmap(run / "val.npy", mode="w+", dtype=np.float16, shape=(n, c))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            z = np.random.default_rng([seed, 4, lo]).standard_normal((hi - lo, c), dtype=np.float32)  # image
            z += np.random.default_rng([seed, 3, family[j], lo]).standard_normal((hi - lo, c), dtype=np.float32) * 0.5
            z += np.random.default_rng([seed, 2, j, lo]).standard_normal((hi - lo, c), dtype=np.float32) * 0.35
            rows = np.arange(hi - lo)[:, None]
            z[rows, confusers[lo:hi]] += boost[lo:hi]
            z[rows[:, 0], labels[lo:hi]] += strength[j] * difficulty[lo:hi]
            z *= temperature[j]
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            arr[lo:hi] = z
        arr.flush()
        del arr
        print(f"  generated {j + 1}/{m} models, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    (d / "done").write_text("ok\n")
    return d


def open_scores(d: Path, n: int, c: int, seed: int):
    from trainer import ensemble as E

    keys, labels = truth(n, c, seed)
    return E.load_scores([str(d / "m*")], labels=(keys, labels, c))


# ---------------------------------------------------------------- measured children


def child_ga(a: argparse.Namespace) -> dict:
    from trainer import ensemble as E

    t0, c0 = time.perf_counter(), cpu_seconds()
    scores = open_scores(Path(a.dir), a.images, a.classes, a.seed)
    red = E.reduced_fitness(scores, "prob", a.seed, a.candidates)
    t_build = time.perf_counter() - t0
    gens = []
    ga = E.genetic_weights(scores, population=a.population, generations=a.generations, seed=a.seed, reduced=red,
                           progress=gens.append)
    t_ga, cpu_ga, rss_ga = time.perf_counter() - t0, cpu_seconds() - c0, maxrss_mb()
    uniform = np.full(len(scores.models), 1 / len(scores.models))
    check = red.fitness(np.stack([uniform, ga.weights]))
    t1 = time.perf_counter()
    report = E.evaluate(scores, {"average": uniform, "ga": ga.weights}, "prob", a.seed)
    models = [m["heldout_class_top5"] for m in report["models"].values()]
    return {"build_s": t_build, "ga_s": t_ga - t_build, "total_s": t_ga, "cpu_s": cpu_ga, "maxrss_mb": rss_ga,
            "evaluate_s": time.perf_counter() - t1, "maxrss_after_evaluate_mb": maxrss_mb(),
            "evaluations": ga.evaluations, "stats": red.stats, "weights": ga.weights.tolist(),
            "reduced_fitness": check.tolist(), "first": gens[0], "last": gens[-1],
            "models_class_top5": [min(models), float(np.median(models)), max(models)],
            "average": report["fused"]["average"], "ga": report["fused"]["ga"]}


def _dense_fit_pass(scores, w: np.ndarray, rows: np.ndarray, blas: bool) -> list[np.ndarray]:
    """Per candidate (rows of w): the label's count of classes reaching it and topk_hits, over `rows`."""
    from trainer import ensemble as E
    from trainer.metrics import topk_hits

    labels = scores.labels[rows]
    reach, hits5, hits1 = [], [], []
    step = scores.chunk_rows()
    for lo in range(0, len(rows), step):
        x = scores.read("val", rows[lo:lo + step])
        m, r, c = x.shape
        fused = (w.astype(np.float32) @ x.reshape(m, r * c)).reshape(len(w), r, c) if blas else E.weighted_sum(x, w)
        lab = labels[lo:lo + step]
        sy = np.take_along_axis(fused, np.broadcast_to(lab[None, :, None], (len(w), r, 1)), 2)
        reach.append((fused >= sy).sum(axis=2) - 1)
        hits5.append(np.stack([topk_hits(f, lab, 5) for f in fused]))
        hits1.append(np.stack([topk_hits(f, lab, 1) for f in fused]))
    return [np.concatenate(h, axis=1) for h in (reach, hits5, hits1)]


def child_naive(a: argparse.Namespace) -> dict:
    """Baseline A: one dense pass per candidate (here 2 candidates, each timed)."""
    from trainer import ensemble as E
    from trainer._ga import class_mean

    scores = open_scores(Path(a.dir), a.images, a.classes, a.seed)
    rows = np.flatnonzero(E.split_halves(scores.labels, a.seed) == 0)
    labels = scores.labels[rows]
    w = np.array(json.loads(a.weights), np.float64)
    times, cpu, fitness, topk = [], [], [], []
    for wi in w:
        t0, c0 = time.perf_counter(), cpu_seconds()
        reach, h5, h1 = _dense_fit_pass(scores, wi[None], rows, blas=False)
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
        fitness.append([float(class_mean(reach < k, labels, a.classes)[0]) for k in (5, 1)])
        topk.append([float(class_mean(h, labels, a.classes)[0]) for h in (h5, h1)])
    return {"seconds": times, "cpu_s": cpu, "fitness": fitness, "topk_hits_fitness": topk, "maxrss_mb": maxrss_mb()}


def child_batched(a: argparse.Namespace) -> dict:
    """Baseline B: one dense pass fusing a whole generation (BLAS), over a slice of the fitted rows."""
    from trainer import ensemble as E

    scores = open_scores(Path(a.dir), a.images, a.classes, a.seed)
    rows = np.flatnonzero(E.split_halves(scores.labels, a.seed) == 0)
    part = rows[: max(1, int(len(rows) * a.fraction))]
    w = np.random.default_rng(0).random((a.population, len(scores.models)))
    w /= w.sum(axis=1, keepdims=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    _dense_fit_pass(scores, w, part, blas=True)
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "rows": len(part), "fit_rows": len(rows),
            "maxrss_mb": maxrss_mb()}


def run_child(kind: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ensemble_bench", "--child", kind, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, help="full: 128")
    p.add_argument("--images", type=int, help="full: 50000")
    p.add_argument("--classes", type=int, help="full: 1000")
    p.add_argument("--population", type=int, help="full: 32")
    p.add_argument("--generations", type=int, help="full: 30")
    p.add_argument("--candidates", type=int, default=10, help="per-model top-K of the reduced form")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the fitted rows baseline B is timed on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ga", "naive", "batched"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    a = parse_scaled(p, argv, SIZES)
    if a.child:
        print(json.dumps({"ga": child_ga, "naive": child_naive, "batched": child_batched}[a.child](a)))
        return 0

    need = a.models * a.images * a.classes * 2
    OUT.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(OUT).free
    note = ""
    if not (dataset_dir(a.models, a.images, a.classes, a.seed) / "done").exists() and need > 0.8 * free:
        images = int(a.images * 0.8 * free / need) // a.classes * a.classes
        note = f" (reduced from {a.images} images: {free / 1e9:.1f} GB free on disk)"
        a.images, need = images, a.models * images * a.classes * 2
    print(machine())
    print(f"data: {a.models} models x {a.images} val images x {a.classes} classes, float16 softmax, "
          f"{need / 1e9:.1f} GB memory-mapped{note}; synthetic with correlated errors, per-model temperature 0.5-3")
    t0 = time.perf_counter()
    d = generate(a.models, a.images, a.classes, a.seed)
    print(f"generated in {time.perf_counter() - t0:.0f}s (cached: {d.relative_to(ROOT)})")
    print(f"GA: population {a.population}, {a.generations} generations, seed {a.seed}; fitness = class-averaged "
          f"top-5 (ties: top-1) on the fitted half of val (class-stratified), exact on per-model top-{a.candidates} "
          "candidates")
    print(load())
    common = ["--dir", str(d), "--images", str(a.images), "--classes", str(a.classes), "--seed", str(a.seed),
              "--population", str(a.population), "--generations", str(a.generations),
              "--candidates", str(a.candidates)]
    t = time.perf_counter()
    for path in d.glob("m*/scores/val.npy"):  # same page-cache state for every row: read once
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"page cache: files read once before timing ({time.perf_counter() - t:.0f}s); RAM {ram:.0f} GiB "
          "(shared), so part may be re-read from disk")
    ga = run_child("ga", common)
    s = ga["stats"]
    naive = run_child("naive", [*common, "--weights", json.dumps([[1 / a.models] * a.models, ga["weights"]])])
    batched = run_child("batched", [*common, "--fraction", str(a.fraction)])

    evals = ga["evaluations"]
    scale_b = batched["fit_rows"] / batched["rows"] * (a.generations + 1)
    rows = [("wvdata GA, total (load + reduced form + GA)", ga["total_s"], ga["cpu_s"], ga["maxrss_mb"]),
            ("baseline A: dense pass per candidate (extrapolated)", float(np.mean(naive["seconds"])) * evals,
             float(np.mean(naive["cpu_s"])) * evals, naive["maxrss_mb"]),
            ("baseline B: dense pass per generation (extrapolated)", batched["seconds"] * scale_b,
             batched["cpu_s"] * scale_b, batched["maxrss_mb"])]
    print()
    print(f"reduced form: {s['images']} images, {s['candidates_mean']:.1f} candidates per image (max "
          f"{s['candidates_max']}), {s['closed_initially']} closed up front, {s['bytes'] / 2**20:.0f} MiB; "
          f"reopened during the GA: {s['reopened']} images ({s['closure_bytes'] / 2**20:.1f} MiB kept)")
    agree = [abs(x - y) < 1e-12 for r, n_ in zip(ga["reduced_fitness"], naive["fitness"]) for x, y in zip(r, n_)]
    print(f"exactness: reduced fitness == dense fitness (same tie rule) for the average and the GA's best: "
          f"{sum(agree)}/{len(agree)} figures equal; dense topk_hits gives "
          + ", ".join(f"{100 * t5:.3f}/{100 * t1:.3f}" for t5, t1 in naive["topk_hits_fitness"])
          + " vs reduced " + ", ".join(f"{100 * t5:.3f}/{100 * t1:.3f}" for t5, t1 in ga["reduced_fitness"])
          + " (class top-5/top-1, %)")
    print()
    print(f"{'row':<52} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'CPU ratio':>10}")
    print("-" * 106)
    def ratio(r: float) -> str:
        return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"

    for name, wall, cpu, rss in rows:
        print(f"{name:<52} {wall:8.1f} {cpu:8.1f} {rss:12.0f} {ratio(wall / rows[0][1]):>11} "
              f"{ratio(cpu / rows[0][2]):>10}")
        if name.startswith("wvdata"):
            print(f"{'  reduced form (one pass over the files)':<52} {ga['build_s']:8.1f}")
            print(f"{'  GA, ' + str(evals) + ' distinct evaluations':<52} {ga['ga_s']:8.1f}")
        elif name.startswith("baseline A"):
            print(f"{'  measured: ' + str(len(naive['seconds'])) + ' candidates, wall s each':<52} "
                  + " ".join(f"{x:.1f}" for x in naive["seconds"]))
        else:
            label = f"  measured: 1 generation on {batched['rows']} of {batched['fit_rows']} rows"
            print(f"{label:<52} {batched['seconds']:8.1f} {batched['cpu_s']:8.1f}")
    print()
    print(f"GA CPU seconds: {ga['cpu_s']:.0f} (2 cores); held-out report (`evaluate`, one more dense pass, not in "
          f"the GA time): {ga['evaluate_s']:.0f}s, peak RSS then {ga['maxrss_after_evaluate_mb']:.0f} MB")
    lo, med, hi = ga["models_class_top5"]
    print(f"quality (held-out half, class top-5 %): single models {100 * lo:.2f} / {100 * med:.2f} / {100 * hi:.2f} "
          f"(min / median / max), average {100 * ga['average']['heldout_class_top5']:.2f}, "
          f"GA {100 * ga['ga']['heldout_class_top5']:.2f}; fitted half: average "
          f"{100 * ga['reduced_fitness'][0][0]:.2f}, GA {100 * ga['last']['best_class_top5']:.2f}")
    print("ratio = baseline / wvdata GA; baselines extrapolated linearly from the measured part (A: x the GA's "
          f"distinct evaluations; B: x rows and generations). Wall times move with other jobs on these cores. {load()}")
    what = f"GA weights, {a.models} models x {a.images} images x {a.classes} classes"
    for (_, wall, _, _), label in zip(rows[1:], ("dense pass per candidate", "dense pass per generation")):
        result("ensemble", f"{what}, time", rows[0][1], "s", baseline=f"{label} (extrapolated)", baseline_value=wall,
               higher_is_better=False)
    result("ensemble", f"{what}, peak memory", rows[0][3], "MB", baseline="dense pass per generation",
           baseline_value=rows[2][3], higher_is_better=False)
    result("ensemble", "GA ensemble, held-out class top-5", 100 * ga["ga"]["heldout_class_top5"], "%",
           baseline="uniform average", baseline_value=100 * ga["average"]["heldout_class_top5"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
