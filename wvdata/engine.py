"""The task runner of build, dedup and embed: a local process pool with a progress bar, or Ray
tasks across machines (`engine="ray"`).

A task is a picklable object and a module-level function of it. Results come back in
completion order. The hazards of forking are handled here once:
- workers are forked (Linux) so they start in milliseconds and share what the parent loaded;
  `warmup` runs in the parent first, so an expensive import (torch's resize kernel) is paid
  once instead of once per worker;
- a worker must not call polars: its thread pool does not survive fork, and a forked child
  hangs on its first polars call. Tasks therefore exchange numpy arrays, JSON and bytes;
- each worker limits its numeric libraries to one thread (the pool is the parallelism).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ENGINES = ("local", "ray")
_COUNTER: Any = None  # shared image counter of a local pool's worker (see tick)
_BAR: Any = None  # the progress bar, when tasks run in this process


def tick(n: int) -> None:
    """Report progress from inside a task (images done); a no-op where nobody listens."""
    if _BAR is not None:
        _BAR.update(n)
    elif _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += n


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when its parent dies, instead of working on as an orphan."""
    if sys.platform == "linux":
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _init_worker(counter) -> None:
    global _COUNTER, _BAR
    _COUNTER, _BAR = counter, None
    _die_with_parent()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def default_workers() -> int:
    return os.cpu_count() or 1


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, weights: Sequence[int] | None = None,
              engine: str = "local", workers: int | None = None, desc: str = "", unit: str = "img",
              progress: bool = True, ticks: bool = False,
              warmup: Callable[[], None] | None = None) -> Iterator[Any]:
    """Yield fn(task) for every task, in completion order, advancing one progress bar.

    weights: each task's share of the bar (default 1 each), credited when it completes; with
    `ticks=True` the tasks report finer progress themselves through `tick()` (a Ray task's is
    credited on completion). workers: local processes (default: all cores; 1 runs inline).
    """
    from tqdm import tqdm

    check_engine(engine)
    weights = list(weights) if weights is not None else [1] * len(tasks)
    workers = workers or default_workers()
    with tqdm(total=sum(weights), unit=unit, desc=desc, disable=not progress, dynamic_ncols=True,
              smoothing=0.1) as bar:
        if engine == "ray":
            yield from _run_ray(fn, tasks, weights, bar)
        elif workers <= 1 or len(tasks) <= 1:
            yield from _run_inline(fn, tasks, weights, bar, ticks)
        else:
            if warmup is not None:
                warmup()
            yield from _run_pool(fn, tasks, weights, bar, ticks, min(workers, len(tasks)))


def _run_inline(fn, tasks, weights, bar, ticks: bool) -> Iterator[Any]:
    global _BAR
    saved, _BAR = _BAR, (bar if ticks else None)
    try:
        for task, w in zip(tasks, weights):
            result = fn(task)
            if not ticks:
                bar.update(w)
            yield result
    finally:
        _BAR = saved


class _Weighted:
    """fn(task) -> (task number, result): the pool's unit, picklable."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, item):
        i, task = item
        return i, self.fn(task)


def _run_pool(fn, tasks, weights, bar, ticks: bool, workers: int) -> Iterator[Any]:
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    counter = ctx.Value("q", 0)
    seen = 0
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.imap_unordered(_Weighted(fn), list(enumerate(tasks)))
        for _ in range(len(tasks)):
            while True:
                try:
                    i, result = pending.next(timeout=0.2)
                    break
                except mp.TimeoutError:
                    if ticks:
                        now = counter.value
                        bar.update(now - seen)
                        seen = now
            if ticks:
                now = counter.value
                bar.update(now - seen)
                seen = now
            else:
                bar.update(weights[i])
            yield result


def ray_init() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one, once per process. The tasks' runtime
    environment (Ray's `runtime_env`: env_vars, pip, working_dir) may be given as JSON in
    WVDATA_RAY_RUNTIME_ENV; credentials belong in the cluster's environment, not there."""
    import json

    import ray

    if not ray.is_initialized():
        env = os.environ.get("WVDATA_RAY_RUNTIME_ENV")
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False,
                 runtime_env=json.loads(env) if env else None)


def _run_ray(fn, tasks, weights, bar) -> Iterator[Any]:
    import ray

    ray_init()
    # a task whose worker died or that raised (a store hiccup) runs again: tasks write whole
    # outputs to fixed names, so a retry replaces, never duplicates
    remote = ray.remote(max_retries=3, retry_exceptions=True)(fn)
    refs = {remote.remote(t): w for t, w in zip(tasks, weights)}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            result = ray.get(ref)
            bar.update(refs.pop(ref))
            yield result
