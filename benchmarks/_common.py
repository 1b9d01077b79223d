"""Helpers every benchmark shares: CPU time, the machine line at the top of a result, load, reads.

Kept free of wvdata (and so of polars) imports, so that a benchmark process stays light until it
chooses to import wvdata.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
from collections.abc import Iterable


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished (waited-for) children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def machine(gpu: str | None = None) -> str:
    """`machine: nproc=N, cpu=MODEL[, gpu=GPU], python=X.Y.Z`: the first line of every result."""
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return (f"machine: nproc={nproc}, cpu={cpu_model()}, " + (f"gpu={gpu}, " if gpu is not None else "")
            + f"python={platform.python_version()}")


def load() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on the machine skew wall times)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def read_all(paths: Iterable[str | os.PathLike]) -> int:
    """Read every file once (so that timed runs read from the page cache); return the bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total


def result(bench: str, figure: str, value: float, unit: str, *, baseline: str | None = None,
           baseline_value: float | None = None, higher_is_better: bool = True,
           target: float | None = None) -> dict:
    """One headline figure, printed as a `RESULT {json}` line that `python -m benchmarks` collects.

    ratio: how many times better wvdata is than the baseline of the same run (>1: better), so
    times and rates read the same way; target: the ratio (or, without a baseline, the value)
    the figure must reach.
    """
    import json

    row: dict = {"bench": bench, "figure": figure, "value": value, "unit": unit}
    if baseline is not None and baseline_value:
        row.update(baseline=baseline, baseline_value=baseline_value,
                   ratio=(value / baseline_value) if higher_is_better else (baseline_value / value))
    row["higher_is_better"] = higher_is_better
    if target is not None:
        row["target"] = target
        got = row.get("ratio", value)
        row["met"] = bool(got >= target) if (higher_is_better or "ratio" in row) else bool(got <= target)
    print("RESULT " + json.dumps(row), flush=True)
    return row


SCALES = ("small", "full")


def parse_scaled(parser, argv: list[str] | None, sizes: dict[str, dict]):
    """Parse `argv` with a `--scale small|full` option (default full) added to `parser`; every
    option whose value is None is then taken from `sizes[scale]` (explicit options win).

    small: a minute or two on 2 cores, for `python -m benchmarks --scale small`; full: the sizes
    the benchmark's docstring names.
    """
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="problem sizes: small (a couple of minutes on 2 cores) or full (default)")
    args = parser.parse_args(argv)
    for name, value in sizes[args.scale].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def versions(dists: Iterable[str]) -> dict[str, str]:
    """{distribution: installed version or "not installed"}, read from package metadata (no imports)."""
    from importlib import metadata

    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def failed(bench: str, figure: str, error: BaseException | str) -> dict:
    """A figure that could not be measured, as a `RESULT` line the runner reports as failed (the
    benchmark goes on with its other rows)."""
    import json

    msg = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    lines = [s for s in msg.strip().splitlines() if s.strip()]
    row = {"bench": bench, "figure": figure, "value": None, "status": "failed", "error": (lines or [""])[-1][:300]}
    print("RESULT " + json.dumps(row), flush=True)
    return row
