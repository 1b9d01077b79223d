"""`wvdata verify`: is every stored byte still what the build wrote?

Per shard (one task each on the task runner): the tar file exists with the recorded size;
each sample's tar header sits at its recorded offset and names `KEY.jpg` with the recorded
size; the image bytes hash to the recorded sha1; and the shard's `.idx` lists exactly the
`.jpg` members at those offsets. Nothing is modified. The loader's `verify=True` does the
sha1 part on the fly while training.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from ._args import positive_int
from .build.tar import parse_idx
from .dataset import Dataset, check_name, open_dataset
from .engine import ENGINES, run_tasks

PROBLEM_SCHEMA = {"split": pl.String, "shard": pl.String, "key": pl.String, "problem": pl.String}


@dataclass
class _ShardCheck:
    root: str
    split: str
    shard: str
    nbytes: int  # the shard's size in dataset.json
    keys: list[str]
    offset: np.ndarray  # tar header offsets
    data_offset: np.ndarray
    size: np.ndarray
    sha1: list[str]


@dataclass
class VerifyResult:
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=PROBLEM_SCHEMA))

    @property
    def ok(self) -> bool:
        return self.problems.height == 0


def _check_shard(t: _ShardCheck) -> list[tuple[str, str, str, str]]:
    """(split, shard, key, problem) for everything wrong in one shard (runs in a worker)."""
    ds = Dataset(t.root)
    out: list[tuple[str, str, str, str]] = []

    def bad(key: str, problem: str) -> None:
        out.append((t.split, t.shard, key, problem))

    path = ds.shard_path(t.split, t.shard)
    try:
        f = open(path, "rb")
    except OSError as e:
        bad("", f"shard unreadable: {type(e).__name__}: {e}")
        return out
    with f:
        actual = os.fstat(f.fileno()).st_size
        if actual != t.nbytes:
            bad("", f"shard is {actual} bytes, dataset.json says {t.nbytes}")
        for i, key in enumerate(t.keys):
            f.seek(int(t.offset[i]))
            header = f.read(tarfile.BLOCKSIZE)
            try:
                info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
            except tarfile.TarError as e:
                bad(key, f"no tar header at offset {t.offset[i]}: {e}")
                continue
            if info.name != f"{key}.jpg" or info.size != t.size[i] or \
                    int(t.offset[i]) + tarfile.BLOCKSIZE != int(t.data_offset[i]):
                bad(key, f"tar header names {info.name!r} ({info.size} bytes), recorded {key}.jpg ({t.size[i]})")
                continue
            data = f.read(int(t.size[i]))
            if len(data) != t.size[i]:
                bad(key, f"image cut short: {len(data)} of {t.size[i]} bytes")
            elif hashlib.sha1(data).hexdigest() != t.sha1[i]:
                bad(key, "sha1 mismatch: the image bytes changed since the build")
    try:
        with open(ds.shard_path(t.split, t.shard, "idx")) as f:
            listed = {(m.name, m.offset, m.size) for sample in parse_idx(f.read()) for m in sample if m.ext == "jpg"}
    except (OSError, ValueError) as e:
        bad("", f"index unreadable: {type(e).__name__}: {e}")
        return out
    want = {(f"{k}.jpg", int(o), int(s)) for k, o, s in zip(t.keys, t.data_offset, t.size)}
    for name, off, size in sorted(want - listed):
        bad(name[:-4], f".idx does not list {name} at {off} ({size} bytes)")
    for name, off, size in sorted(listed - want):
        bad(name.rsplit(".", 1)[0], f".idx lists {name} at {off} ({size} bytes), which samples.parquet does not")
    return out


def verify(dataset: str | os.PathLike | Dataset, splits: list[str] | None = None, *, workers: int | None = None,
           engine: str = "local", progress: bool = True) -> VerifyResult:
    """Check every shard, index and sha1 of a dataset (see the module docstring)."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    splits = list(splits or ds.splits)
    tasks = []
    for split in splits:
        df = ds.samples(split).select("key", "shard", "offset", "data_offset", "bytes", "sha1")
        parts = {name: part for (name,), part in df.group_by("shard")}
        for rec in ds.shards(split):
            part = parts.get(check_name("shard", rec["name"]), df.clear())
            tasks.append(_ShardCheck(ds.root, split, rec["name"], int(rec["bytes"]), part["key"].to_list(),
                                     part["offset"].to_numpy(), part["data_offset"].to_numpy(),
                                     part["bytes"].to_numpy(), part["sha1"].to_list()))
    rows: list[tuple[str, str, str, str]] = []
    for found in run_tasks(_check_shard, tasks, weights=[len(t.keys) for t in tasks], engine=engine,
                           workers=workers, desc="verify", progress=progress):
        rows += found
    problems = pl.DataFrame(rows, schema=PROBLEM_SCHEMA, orient="row").sort("split", "shard", "key")
    return VerifyResult(sum(len(t.keys) for t in tasks), len(tasks), int(sum(t.size.sum() for t in tasks)),
                        time.perf_counter() - t0, problems)


def format_result(r: VerifyResult) -> str:
    lines = [f"verified {r.samples} samples in {r.shards} shards ({r.bytes / 1e6:.1f} MB) in {r.seconds:.1f}s "
             f"({r.samples / max(r.seconds, 1e-9):.0f} img/s): "
             + ("all intact" if r.ok else f"{r.problems.height} problems")]
    for split, shard, key, problem in r.problems.head(20).iter_rows():
        lines.append(f"  {split}/{shard} {key or '-'}: {problem}")
    if r.problems.height > 20:
        lines.append(f"  ... {r.problems.height - 20} more (--report FILE writes them all)")
    return "\n".join(lines)


def add_cli(subparsers: Any) -> None:
    """Register `wvdata verify`."""
    p = subparsers.add_parser("verify", help="check every shard, index and sha1 of a dataset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all)")
    p.add_argument("--workers", type=positive_int, default=None, help="local processes (default: all cores)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process pool or Ray tasks")
    p.add_argument("--report", default=None, help="write every problem to this .parquet or .csv file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    r = verify(args.dataset, splits, workers=args.workers, engine=args.engine, progress=not args.quiet)
    print(format_result(r))
    if args.report:
        (r.problems.write_csv if args.report.endswith(".csv") else r.problems.write_parquet)(args.report)
    return 0 if r.ok else 1
