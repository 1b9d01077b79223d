"""wvdata.engine: every task runs once, results come back whatever the engine and worker count,
progress adds up to the work done, and a bad engine name is a clear error."""
from __future__ import annotations

import os

import pytest

from wvdata import engine


def _square(x: int) -> tuple[int, int]:
    return x, x * x


def _square_ticking(x: int) -> tuple[int, int]:
    engine.tick(x)  # x images of progress
    return x, os.getpid()


class _Bar:
    """Stands in for tqdm to record how far the bar moved."""

    def __init__(self, *args, **kwargs):
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n

    def __enter__(self):
        _Bar.last = self
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_every_task_once_any_order(workers):
    out = list(engine.run_tasks(_square, list(range(20)), workers=workers, progress=False))
    assert sorted(out) == [(i, i * i) for i in range(20)]


@pytest.mark.parametrize("workers,ticks", [(1, False), (2, False), (1, True), (2, True)])
def test_progress_counts_the_work(monkeypatch, workers, ticks):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    tasks = [3, 5, 7, 11]
    fn = _square_ticking if ticks else _square
    results = list(engine.run_tasks(fn, tasks, weights=tasks, workers=workers, ticks=ticks))
    assert sorted(r[0] for r in results) == tasks
    assert _Bar.last.n == sum(tasks)
    if workers == 2:  # really ran in other processes
        assert any(r[1] != os.getpid() for r in results) or not ticks


def test_warmup_runs_once_in_the_parent():
    calls = []
    out = list(engine.run_tasks(_square, [1, 2, 3], workers=2, progress=False,
                                warmup=lambda: calls.append(os.getpid())))
    assert len(out) == 3 and calls == [os.getpid()]


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        list(engine.run_tasks(_square, [1], engine="spark", progress=False))
