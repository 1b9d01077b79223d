"""Text lines of one fixed width from integer columns, formatted by numpy (no Python per line).

Millions of index lines (`jpg OFFSET SIZE NAME.jpg ...`) are formatted as an (n, width) uint8
array: a template row of the constant text is copied into every row, then each integer column
is written as zero-padded decimal digits, four at a time from a 10,000-entry table. Every line of a
file gets the same field widths, so a file is a contiguous slice of rows. Readers that split on
whitespace and parse decimal integers (DALI's index parser, `int()`) read zero-padded numbers
as the same values.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_QUADS = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), np.uint32)  # "0000".."9999", 4 bytes each

Part = bytes | tuple[np.ndarray, int]


def width(values: np.ndarray) -> int:
    """Decimal digits of the largest of `values` (non-negative integers), at least 1."""
    return len(str(int(values.max()))) if len(values) else 1


def fixed_lines(parts: Sequence[Part], n: int) -> np.ndarray:
    """(n, W) uint8 rows: each part is constant text, or (values, digits) written as that many
    zero-padded decimal digits (values must fit them; the same array given twice is formatted once)."""
    template = np.frombuffer(b"".join(p if isinstance(p, bytes) else b"0" * p[1] for p in parts), np.uint8)
    out = np.empty((n, len(template)), np.uint8)
    out[:] = template
    col, done = 0, {}
    for p in parts:
        if isinstance(p, bytes):
            col += len(p)
            continue
        values, digits = p
        key = (id(values), digits)
        if key in done:
            out[:, col:col + digits] = out[:, done[key]:done[key] + digits]
        else:
            _put_digits(out, col, values, digits)
            done[key] = col
        col += digits
    return out


def _put_digits(out: np.ndarray, col: int, values: np.ndarray, digits: int) -> None:
    lo, hi = (int(values.min()), int(values.max())) if len(values) else (0, 0)
    if lo < 0 or hi >= 10 ** digits:
        raise ValueError(f"fixed_lines: {lo if lo < 0 else hi} is not a non-negative integer of <= {digits} digits")
    v = values.astype(np.uint32 if hi < 2**32 else np.uint64)
    k = (digits + 3) // 4
    quads = np.empty((len(v), k), np.uint32)
    for j in range(k - 1, -1, -1):
        q = v // 10000
        quads[:, j] = _QUADS[v - q * 10000]
        v = q
    out[:, col:col + digits] = quads.view(np.uint8)[:, 4 * k - digits:]
