"""Writing a 16M-entry view (issue 10: <= 10 s), phase by phase, next to the previous writer.

Three views of the scaled dataset that `scale_bench` makes (16,000,000 train entries over 4,001
real shards, 5,000 long-tailed classes): every entry (what scale_bench times), a seeded 80%
subset (dropping the AUM-flagged 20%), and `--per-class 3200` (16M entries, repeats of short
classes side by side, so the writer sorts). Each is written by this checkout, in a fresh process,
with wall and CPU seconds per phase (entries.parquet is written in a thread, beside the .idx
files), then by the writer of `--before` (default: the commit that last changed wvdata/views.py
before the fast writer; `git archive`d, so this checkout is untouched), same dataset, same run.

    python -m benchmarks.view_write_profile [--scale small|full] [--before COMMIT] [--cases all,subset,balanced]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _common
from benchmarks._common import load, result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BEFORE = "8cc3426"  # main before the fixed-width view writer
CASES = ("all", "subset", "balanced")
PHASES = ("_entries", "_in_shard_order", "_check_layout", "_write_indexes", "_write_parquet",
          "_index_lines", "_write_files")  # the last two: the previous writer's


def measure(case: str, ds: str) -> dict:
    """Write view `case` of dataset `ds` with whichever wvdata is importable; seconds per phase."""
    import resource

    import numpy as np
    import polars as pl

    from wvdata import views

    cols = [c for c in views.ENTRY_COLUMNS if c != "sample"]
    ent = pl.read_parquet(Path(ds) / "train" / "samples.parquet", columns=cols)
    ent = ent.with_row_index("sample").select(views.ENTRY_COLUMNS)
    if case == "subset":
        ent = ent.filter(pl.Series(np.random.default_rng(0).random(ent.height) >= 0.2))
    elif case == "balanced":
        ent = views.balance_per_class(ent, ent.height // (int(ent["label"].max()) + 1), seed=0)
    phases: dict = {}
    for fn in PHASES:  # wall and thread-CPU seconds of each phase (a module-level function)
        if hasattr(views, fn):
            setattr(views, fn, _timed(getattr(views, fn), fn, phases))
    name = f"profile-{case}-{os.getpid()}"
    t0, c0 = time.perf_counter(), _common.cpu_seconds()
    v = views.write_view(ds, name, ent, "train")
    row = {"case": case, "entries": len(v), "wall_s": time.perf_counter() - t0, "cpu_s": _common.cpu_seconds() - c0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "idx_mb": sum(p.stat().st_size for p in (Path(ds) / "views" / name).glob("*.idx")) / 1e6,
           "parquet_mb": (Path(ds) / "views" / name / "entries.parquet").stat().st_size / 1e6,
           "phases": {k: [round(w, 2), round(c, 2)] for k, (w, c) in phases.items()}}
    import shutil

    shutil.rmtree(Path(ds) / "views" / name)
    return row


def _timed(fn, label: str, into: dict):
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            w, c = into.get(label, (0.0, 0.0))
            into[label] = (w + time.perf_counter() - t0, c + time.thread_time() - c0)
    return wrapper


def run_child(case: str, ds: Path, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import json, sys; sys.path[:0] = sys.argv[1:2]; "
           "from benchmarks.view_write_profile import measure; "
           f"print('MEASURE ' + json.dumps(measure({case!r}, {str(ds)!r})))", str(code)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("MEASURE "):
            return json.loads(line[8:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.scale_bench import SIZES, scaled_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SIZES), default="full")
    p.add_argument("--before", default=BEFORE, help="commit whose view writer is the baseline ('' for none)")
    p.add_argument("--cases", default=",".join(CASES), help="views to write (default: all three)")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    n_train, n_val = SIZES[args.scale]
    lines = [_common.machine(), f"{load()} (before)"]
    print("\n".join(lines), flush=True)
    ds = scaled_dataset(n_train, n_val)
    with tempfile.TemporaryDirectory() as tmp:
        codes = [("after", ROOT)]
        if args.before:
            subprocess.run(f"git -C {ROOT} archive {args.before} wvdata | tar -x -C {tmp}", shell=True, check=True)
            codes.append((f"before ({args.before})", Path(tmp)))
        for case in args.cases.split(","):
            got = {}
            for label, code in codes:
                row = run_child(case, ds, code)
                got[label] = row
                text = (f"{case:9s} {label:18s} {row['entries']:>11,} entries  {row['wall_s']:6.1f} s wall "
                        f"{row['cpu_s']:6.1f} CPU s peak RSS {row['peak_rss_mb']:6.0f} MB .idx {row['idx_mb']:7.0f} MB"
                        f"  entries.parquet {row['parquet_mb']:5.0f} MB  {load()}" if "error" not in row
                        else f"{case:9s} {label:18s} error: {row['error']}")
                lines.append(text)
                print(text, flush=True)
                if "phases" in row:
                    lines.append("    phases (wall s, thread CPU s): " + json.dumps(row["phases"]))
                    print(lines[-1], flush=True)
            after = got["after"]
            before = next((r for k, r in got.items() if k != "after"), {})
            if "wall_s" in after:
                figure = f"write a {after['entries']:,}-entry view ({case})"
                result("view_write", figure, round(after["wall_s"], 2), "s", higher_is_better=False, target=10.0)
                if "wall_s" in before:
                    result("view_write", figure + " vs the previous writer", round(after["wall_s"], 2), "s",
                           baseline="previous writer", baseline_value=round(before["wall_s"], 2),
                           higher_is_better=False)
    lines.append(f"{load()} (after)")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
