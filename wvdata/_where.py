"""`--where` filters: SQL expressions over a table's columns, and nothing else.

polars' SQL can read files (`read_csv(...)` in a subquery), so the text is tokenised and
checked against an allow-list before polars sees it: column names, literals, operators and a
few scalar functions. Subqueries, table functions and unknown names are refused with a
one-line message (a misspelt column gets a "did you mean" hint).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import polars as pl

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")+")
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|<>|!=|=|<|>|\+|-|\*|/|%|\(|\)|,|\|\|)
""", re.VERBOSE)
KEYWORDS = frozenset("""and or not in is null like ilike between true false case when then else end as
                        cast distinct""".split())
FUNCTIONS = frozenset("""lower upper length char_length octet_length abs round floor ceil ceiling sqrt
                         coalesce nullif concat substr substring starts_with ends_with strpos
                         regexp_like greatest least ltrim rtrim btrim trim left right reverse
                         log log2 log10 ln exp power pow sign mod""".split())
TYPES = frozenset("int integer bigint smallint float double real varchar text string boolean bool".split())
REFUSED = frozenset("select from with join union except intersect values table into".split())


def check_where(text: str, columns: Sequence[str]) -> None:
    """Raise ValueError (one line) unless `text` only uses columns, literals, operators and
    the allowed scalar functions."""
    cols = {c.lower(): c for c in columns}
    pos, prev = 0, None
    tokens: list[tuple[str, str]] = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"--where: unexpected {text[pos]!r} at position {pos} in {text!r}")
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    for i, (kind, tok) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        low = tok.lower()
        if kind == "word":
            if low in REFUSED:
                raise ValueError(f"--where filters rows by their columns; {tok.upper()} (a subquery or "
                                 "table access) is not allowed")
            if low in KEYWORDS or (prev == "as" and low in TYPES):
                pass
            elif nxt == "(":
                if low not in FUNCTIONS:
                    raise ValueError(f"--where: function {tok}() is not allowed (allowed: "
                                     f"{', '.join(sorted(FUNCTIONS))})")
            elif low not in cols:
                _unknown_column(tok, columns)
        elif kind == "quoted" and tok[1:-1].replace('""', '"') not in columns:
            _unknown_column(tok[1:-1], columns)
        prev = low


def _unknown_column(name: str, columns: Sequence[str]) -> None:
    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; columns: {', '.join(columns)}"
    raise ValueError(f"--where: unknown column {name!r}{hint}")


def safe_filter(text: str, columns: Sequence[str]) -> pl.Expr:
    """The polars expression of a checked `--where` text."""
    check_where(text, columns)
    try:
        return pl.sql_expr(text)
    except Exception as e:  # noqa: BLE001 - polars' parse errors: one line for the user
        raise ValueError(f"--where: {str(e).strip().splitlines()[0]}") from None
