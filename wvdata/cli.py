"""The `wvdata` command: a thin layer over the public Python functions.

Every stage module registers its own subcommand with `add_cli(subparsers)`. A command line that
names its stage imports only that stage's module (`wvdata build` never loads curriculum's numba
kernels); `wvdata --help` and a bare `wvdata` register them all.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Sequence

from ._args import HelpFormatter, Parser

__all__ = ["main", "make_parser", "HelpFormatter", "STAGES"]
STAGES: tuple[str, ...] = ("build", "info", "views", "dedup", "verify", "aum", "embed", "curriculum")
_COMMANDS = {"view": "views"}  # command -> its module, where the names differ


def _stage_of(argv: Sequence[str] | None) -> str | None:
    """The stage module a command line names (its first word that is not an option), if any."""
    word = next((a for a in argv or () if not a.startswith("-")), None)
    module = _COMMANDS.get(word, word) if word else None
    return module if module in STAGES else None


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `wvdata` parser: every stage's subcommand, or only the one `argv` names."""
    from . import __version__

    p = Parser(prog="wvdata", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"wvdata {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # defaults shown
    stage = _stage_of(argv)
    for module in (stage,) if stage else STAGES:
        importlib.import_module(f"wvdata.{module}").add_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    args = make_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - every error is one line (disk full, permission, bad input)
        if debug:
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError) and text.startswith(("'", '"')):
            text = text[1:-1]
        print(f"wvdata {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
