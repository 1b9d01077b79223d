"""Injected write failures for the build's clean-up and retry tests.

`failing_append(plan)` is `ShardSink._append` made to fail once per shard named by a file
`SPLIT-SHARD` in the folder `plan`: the first attempt at that shard raises (a full disk) after
writing part of its tar, removing the file, so a retry runs normally. The failed writers are
kept alive (as a traceback held by a logger would), so only the build's own clean-up can remove
their temporary files, not garbage collection. `install` is the Ray worker setup hook that
applies it in every worker when WVDATA_TEST_FAIL_ONCE names such a folder.
"""
from __future__ import annotations

import errno
import os

_FAILED: list = []


def failing_append(plan: str):
    from wvdata.build import shards

    append = shards.ShardSink._append

    def append_then_fail_once(self, chunk) -> None:
        append(self, chunk)
        try:
            os.remove(os.path.join(plan, f"{self.task.split}-{self.task.name}"))  # one attempt wins this
        except FileNotFoundError:
            return
        _FAILED.append(self)
        raise OSError(errno.ENOSPC, f"No space left on device (injected, {self.task.split}/{self.task.name}.tar)")

    return append_then_fail_once


def install() -> None:
    plan = os.environ.get("WVDATA_TEST_FAIL_ONCE")
    if plan:
        from wvdata.build import shards

        shards.ShardSink._append = failing_append(plan)
