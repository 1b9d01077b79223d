"""The `wvdata` command: a thin layer over the public Python functions.

Every stage module registers its own subcommand with `add_cli(subparsers)`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

STAGES: tuple[str, ...] = ("build", "info", "views", "dedup")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wvdata", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for module in STAGES:
        importlib.import_module(f"wvdata.{module}").add_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, TypeError) as e:
        print(f"wvdata {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
