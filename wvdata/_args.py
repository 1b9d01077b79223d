"""Command-line flags derived from option dataclasses, so each option is declared once.

A dataclass field whose metadata has a `help` becomes `--field-name` with that help, the
field's default, and the metadata's `type` / `choices` (see `build.image.option`). Also the
value types that turn a bad number into a one-line error, and the help format of every command.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any


def parse_size(text: str) -> int:
    """'256MB', '1.5g', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1g, 4096)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, workers): 0 or a negative number is an error, not ignored."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (radii, seeds)."""
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {value}")
    return value


def quality(text: str) -> int:
    """A JPEG quality, 1..100."""
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1..100, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage is one `--help` away, not printed on every typo)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it has none or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default is None or default is False \
                or default == argparse.SUPPRESS:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def parse_list(text: str) -> tuple[str, ...]:
    """'train,val' -> ('train', 'val')."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per documented field of the dataclass `cls`."""
    for f in fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {k: v for k, v in meta.items() if v is not None}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **kwargs)


def options_from(args: argparse.Namespace, cls: type) -> Any:
    """The dataclass `cls` filled from the parsed flags that `add_options` declared."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
