"""The `wvdata` command: a thin layer over the public Python functions."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build, format_summary

    summary = build(args.src, args.out, layout=args.layout, splits=tuple(args.splits.split(",")),
                    resize_short=args.resize_short, max_side=args.max_side, quality=args.quality,
                    max_pixels=args.max_pixels, shard_size=args.shard_size,
                    shard_samples=args.shard_samples, seed=args.seed, workers=args.workers,
                    engine=args.engine, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.quiet)
    print(format_summary(summary))
    if args.strict and summary.total_errors:
        print(f"--strict: {summary.total_errors} inputs were rejected "
              f"(see {args.out}/<split>/errors.parquet)", file=sys.stderr)
        return 1
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    print(format_info(info(args.dataset)), end="")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from ._image import DEFAULT_MAX_PIXELS
    from .build import DEFAULT_SHARD_BYTES

    p = argparse.ArgumentParser(prog="wvdata", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="raw crawl -> WebDataset shards + DALI index + manifest")
    b.add_argument("src", help="crawl root (webvision or folder layout) or a manifest file")
    b.add_argument("-o", "--out", required=True, help="dataset directory to write")
    b.add_argument("--layout", default="auto", choices=["auto", "webvision", "folder", "manifest"])
    b.add_argument("--splits", default="train,val,test", help="comma-separated splits to build")
    b.add_argument("--resize-short", type=int, default=None, help="shorter side to N (never upscaled)")
    b.add_argument("--max-side", type=int, default=None, help="longer side at most N")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    b.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="reject larger images as decompression bombs")
    b.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="target shard size in bytes (e.g. 256MB), planned from input sizes")
    b.add_argument("--shard-samples", type=int, default=None, help="samples per shard instead")
    b.add_argument("--seed", type=int, default=0, help="seed of the shuffled shard assignment")
    b.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--engine", default="local", choices=["local", "ray"])
    b.add_argument("--resume", action="store_true", help="skip shards that are complete")
    b.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    b.add_argument("--strict", action="store_true", help="exit 1 if any input was rejected")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    i = sub.add_parser("info", help="classes, samples, shards, errors of a dataset")
    i.add_argument("dataset")
    i.set_defaults(func=_cmd_info)

    for module in _STAGE_MODULES:  # each stage module registers its own subcommand
        importlib.import_module(f"wvdata.{module}").add_cli(sub)
    return p


_STAGE_MODULES: tuple[str, ...] = ("views", "dedup")


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"wvdata {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
