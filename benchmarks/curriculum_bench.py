"""Curriculum density benchmark: `wvdata curriculum`'s per-class kernels on one big class, `exact`
(blocked) and `knn` against the direct O(n^2) NumPy reference (time, peak memory, same subsets).

    python -m benchmarks.curriculum_bench [--scale small|full] [--n 20000] [--big 100000] [--dim 256]

--scale full: --n 20000 --big 100000; small: --n 3000 --big 20000 (well under a minute).

Features: synthetic, clustered like one class of a web crawl after embedding (seeded; see
`clustered`): 60% "clean" samples around 4 visual modes of the class, 25% "noisy" ones (related,
spread twice as wide), 15% mislabelled samples from 30 other classes; every sample has its own
lognormal spread, so densities vary continuously and subset boundaries are not trivial.

Rows (each method in a fresh process: wall and CPU seconds, and peak memory: the growth of the
process's peak RSS over its RSS with the features loaded, the peak reset first through
/proc/self/clear_refs):
- at --n (20,000): the direct reference (the full float64 n x n distance matrix, d_c from all
  its pairs with np.partition, rho from row sums: 3.2 GB at 20,000), `exact` (blocked, d_c from
  all pairs, in one pass) and `knn` (2,048 anchors, d_c from 1M sampled pairs); same subset
  shares against the reference.
- at --big (100,000; the direct matrix would take 80 GB): `exact` (blocked, d_c from 4M sampled
  pairs) and `knn`; knn's speed-up and same-subset share against exact. Targets: >= 20x, >= 90%.
  Also `knn` with FAISS's CPU range search over the anchors (what it does instead of BLAS).
All subsets come from the same exact 1-D k-means (k = 3) on each method's densities; the
ground-truth kind of each sample gives each subset's composition.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from ._common import cpu_seconds, load, machine, parse_scaled, result

KINDS = ("clean", "noisy", "mislabelled")
SIZES = {"small": {"n": 3000, "big": 20_000}, "full": {"n": 20_000, "big": 100_000}}


def clustered(n: int, dim: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim float32 features, kind 0 clean / 1 noisy / 2 mislabelled) of one synthetic class."""
    rng = np.random.default_rng([seed, n, dim])
    kind = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    centre = rng.normal(0, 1, dim)
    modes = centre + rng.normal(0, 0.5, (4, dim))
    others = centre + rng.normal(0, 2.0, (30, dim))
    spread = np.exp(rng.normal(0, 0.2, n)) * np.where(kind == 1, 2.0, 1.0)
    base = np.where((kind == 0)[:, None], modes[rng.integers(0, 4, n)],
                    np.where((kind == 1)[:, None], centre, others[rng.integers(0, 30, n)]))
    x = base + rng.normal(0, 1, (n, dim)) * spread[:, None]
    return x.astype(np.float32), kind


def direct(x: np.ndarray, t: float = 0.6) -> np.ndarray:
    """The reference, straight: the n x n float64 distance matrix at once."""
    x = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = x @ x.copy().T  # the n x n float64 matrix, then in place (x @ x.T: OpenBLAS 0.3.31 dsyrk segfaults)
    d2 *= -2
    d2 += sq[:, None]
    d2 += sq[None, :]
    np.maximum(d2, 0, out=d2)
    n = len(x)
    pairs = np.empty(n * (n - 1) // 2)
    at = 0
    for i in range(n - 1):  # the upper triangle, row by row (np.triu_indices would add 2 int64 n^2/2 arrays)
        pairs[at:at + n - 1 - i] = d2[i, i + 1:]
        at += n - 1 - i
    r = int(np.floor(t * (len(pairs) - 1)))
    cut = np.partition(pairs, r)[r]
    del pairs
    return (d2 < cut).sum(1) - (np.diag(d2) < cut)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0), so the peak measured is the computation's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, n: int, dim: int, out: str) -> None:
    """One measurement in this (fresh) process: writes subsets to `out`.npy and prints JSON."""
    from wvdata import _density

    x, _ = clustered(n, dim)
    _density.exact_density(x[:300], block=128)  # compile the kernels before timing
    _density.knn_density(x[:300])
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), cpu_seconds()
    if method == "direct":
        rho = direct(x)
    elif method == "exact":
        rho, _ = _density.exact_density(x)
    elif method == "knn":
        rho, _ = _density.knn_density(x)
    else:  # the same with FAISS's CPU range search over the anchors' flat index
        rho, _ = _density.knn_density(x, search="faiss")
    sub = _density.kmeans_1d(rho, 3) + 1
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(out, sub.astype(np.int8))
    print(json.dumps({"method": method, "n": n, "wall": wall, "cpu": cpu, "peak_mb": max(peak - before, 0) / 1024}))


def measure(method: str, n: int, dim: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"{method}-{n}.npy")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.curriculum_bench", "--worker", method, str(n), str(dim),
                           out], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{method} at {n} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["subsets"] = np.load(out)
    return res


def _row(r: dict, base: dict | None = None) -> str:
    ratio = f"{base['wall'] / r['wall']:7.1f}x" if base else "   1.0x"
    return (f"  {r['method']:<9} {r['wall']:8.2f}s wall {r['cpu']:8.2f}s cpu {ratio}   peak +{r['peak_mb']:7.0f} MB   "
            f"subsets {np.bincount(r['subsets'], minlength=4)[1:].tolist()}")


def _composition(sub: np.ndarray, kind: np.ndarray) -> str:
    parts = []
    for s in (1, 2, 3):
        m = sub == s
        shares = "/".join(f"{(kind[m] == k).mean():.2f}" for k in range(3)) if m.any() else "-"
        parts.append(f"subset {s}: {shares}")
    return "; ".join(parts) + f"  ({'/'.join(KINDS)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, help="class size for the direct reference (full: 20000)")
    p.add_argument("--big", type=int, help="class size for exact vs knn (full: 100000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "DIM", "OUT"), help=argparse.SUPPRESS)
    args = parse_scaled(p, argv, SIZES)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3])
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    print(f"wvdata curriculum benchmark ({os.cpu_count()} cores)")
    print(machine())
    print(f"{load()} at start")
    with tempfile.TemporaryDirectory() as tmp:
        _, kind = clustered(args.n, args.dim)
        print(f"one class of {args.n} x {args.dim} synthetic clustered features, density_t 0.6, 3 subsets")
        ref = measure("direct", args.n, args.dim, tmp)
        print(_row(ref))
        small = {m: measure(m, args.n, args.dim, tmp) for m in ("exact", "knn")}
        for r in small.values():
            print(_row(r, ref) + f"   same subset as direct: {(r['subsets'] == ref['subsets']).mean():.4f}")
        print(f"  composition (direct): {_composition(ref['subsets'], kind)}")
        print(f"  composition (knn):    {_composition(small['knn']['subsets'], kind)}")
        _, kind = clustered(args.big, args.dim)
        print(f"one class of {args.big} x {args.dim} (the direct matrix would need {args.big ** 2 * 8 / 1e9:.0f} GB)")
        ex = measure("exact", args.big, args.dim, tmp)
        print(_row(ex))
        kn = measure("knn", args.big, args.dim, tmp)
        same = (kn["subsets"] == ex["subsets"]).mean()
        print(_row(kn, ex) + f"   same subset as exact: {same:.4f}")
        kf = measure("knn-faiss", args.big, args.dim, tmp)
        print(_row(kf, ex) + f"   same subset as exact: {(kf['subsets'] == ex['subsets']).mean():.4f}"
              "   (FAISS CPU range search instead of BLAS + count)")
        print(f"  composition (exact): {_composition(ex['subsets'], kind)}")
        print(f"  composition (knn):   {_composition(kn['subsets'], kind)}")
    speed = ex["wall"] / kn["wall"]
    print(f"{load()} at end")
    print(f"summary: at {args.n}, exact = direct on {(small['exact']['subsets'] == ref['subsets']).mean():.2%} of "
          f"samples ({ref['wall'] / small['exact']['wall']:.1f}x its speed, "
          f"{small['exact']['peak_mb']:.0f} MB vs {ref['peak_mb']:.0f} MB); at {args.big}, knn {speed:.1f}x faster "
          f"than exact (target >= 20x), same subset {same:.2%} (target >= 90%)")
    ex_n = small["exact"]
    result("curriculum", f"exact density at {args.n}, time", ex_n["wall"], "s", baseline="direct O(n^2) NumPy",
           baseline_value=ref["wall"], higher_is_better=False)
    result("curriculum", f"exact density at {args.n}, peak memory", ex_n["peak_mb"], "MB",
           baseline="direct O(n^2) NumPy", baseline_value=ref["peak_mb"], higher_is_better=False)
    result("curriculum", f"exact density at {args.n}, same subset as direct", float((ex_n["subsets"] == ref["subsets"])
           .mean()), "share", target=1.0)
    result("curriculum", f"knn density at {args.big}, time", kn["wall"], "s", baseline="exact (blocked)",
           baseline_value=ex["wall"], higher_is_better=False, target=20.0 if args.big >= 100_000 else None)
    result("curriculum", f"knn density at {args.big}, same subset as exact", float(same), "share", target=0.9)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
