"""How the trainer's commands end: every error is one line and exit code 2 (`--debug` anywhere on
the command line shows the traceback instead)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, prog: str = "trainer") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main([a for a in argv if a != "--debug"]) or 0)
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        if "--debug" in argv:
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
