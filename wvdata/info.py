"""`wvdata info`: what a dataset holds, as a readable table."""
from __future__ import annotations

import os
from typing import Any

import polars as pl

from .dataset import Dataset, open_dataset


def info(dataset: str | os.PathLike | Dataset) -> dict[str, Any]:
    """Classes, samples/shards/bytes per split, errors by reason, images per class."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    out: dict[str, Any] = {"root": ds.root, "classes": ds.num_classes,
                           "layout": ds.manifest.get("layout"), "splits": {}}
    for split in ds.splits:
        meta = ds.manifest["splits"][split]
        samples = ds.samples(split)
        errors = ds.errors(split)
        labelled = samples.filter(pl.col("label") >= 0)
        counts = labelled.group_by("label").len()["len"] if labelled.height else pl.Series([], dtype=pl.UInt32)
        per_class = counts.to_list() + [0] * (ds.num_classes - counts.len()) if labelled.height else []
        out["splits"][split] = {
            "samples": samples.height,
            "shards": len(meta["shards"]),
            "bytes": meta["bytes"],
            "errors": errors.height,
            "errors_by_reason": dict(sorted(errors.group_by("reason").len().iter_rows(),
                                            key=lambda kv: -kv[1])) if errors.height else {},
            "per_class": ({"min": min(per_class), "median": float(pl.Series(per_class).median()),
                           "max": max(per_class)} if per_class else None),
        }
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(data: dict[str, Any]) -> str:
    """Render `info()` as a table (rich, plain text so it also reads well in logs)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{data['root']}  ({data['layout']}, {data['classes']} classes)")
    for col in ("split", "samples", "shards", "bytes", "rejected", "per class min/median/max"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, s in data["splits"].items():
        pc = s["per_class"]
        table.add_row(split, str(s["samples"]), str(s["shards"]), _human(s["bytes"]), str(s["errors"]),
                      f"{pc['min']} / {pc['median']:g} / {pc['max']}" if pc else "-")
    reasons = Table(title="rejected inputs by reason")
    for col in ("split", "reason", "count"):
        reasons.add_column(col, justify="right" if col == "count" else "left")
    for split, s in data["splits"].items():
        for reason, n in s["errors_by_reason"].items():
            reasons.add_row(split, reason, str(n))
    console = Console(width=100, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(table)
        if reasons.row_count:
            console.print(reasons)
    return cap.get()


def add_cli(subparsers: Any) -> None:
    """Register `wvdata info`."""
    p = subparsers.add_parser("info", help="classes, samples, shards, errors of a dataset",
                              description=__doc__)
    p.add_argument("dataset", help="dataset directory (or fsspec URL)")
    p.set_defaults(func=lambda args: print(format_info(info(args.dataset)), end="") or 0)
