"""A Ray worker setup hook for the build's retry test (named in Ray's `runtime_env`).

For every file in the folder WVDATA_TEST_FAIL_ONCE named `SPLIT-SHARD`, the first attempt at
that shard raises after writing part of its tar; the file is removed by that attempt, so the
retry runs normally. Nothing happens without the variable. The failed writers are kept alive
(as a traceback held by a logger would), so only the build's own clean-up can remove their
temporary files, not garbage collection.
"""
from __future__ import annotations

import os

_FAILED: list = []


def install() -> None:
    plan = os.environ.get("WVDATA_TEST_FAIL_ONCE")
    if not plan:
        return
    from wvdata.build import shards

    append = shards.ShardSink._append

    def append_then_fail_once(self, chunk) -> None:
        append(self, chunk)
        try:
            os.remove(os.path.join(plan, f"{self.task.split}-{self.task.name}"))  # one attempt wins this
        except FileNotFoundError:
            return
        _FAILED.append(self)
        raise OSError(f"injected failure while writing {self.task.split}/{self.task.name}.tar")

    shards.ShardSink._append = append_then_fail_once
