"""Command-line flags derived from option dataclasses, so each option is declared once.

A dataclass field whose metadata has a `help` becomes `--field-name` with that help, the
field's default, and the metadata's `type` / `choices` (see `build.image.option`).
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
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1g, 4096)") from None


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
        shown = ",".join(default) if isinstance(default, tuple) else default
        meta["help"] = f"{meta['help']} (default: {shown})" if default is not None else meta["help"]
        kwargs: dict[str, Any] = {k: v for k, v in meta.items() if v is not None}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **kwargs)


def options_from(args: argparse.Namespace, cls: type) -> Any:
    """The dataclass `cls` filled from the parsed flags that `add_options` declared."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
