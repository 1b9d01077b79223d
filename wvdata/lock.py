"""One writer at a time per dataset: an exclusive lease on `DATASET/.wvdata.lock`.

Every command that writes into a dataset (build and its resume, view, dedup, embed,
curriculum, aum) holds the lease while it writes; a second writer is refused at once with
the holder's host, PID, run id and command. The lease file holds that record as JSON.

On a local (or mounted) filesystem the exclusion itself is an advisory `flock` on the lease
file, which the kernel drops when its holder dies: a record left by a killed process is
stale, detected and taken over without anyone deleting it by hand. The record carries a
renewal time and a time-to-live so that a store without locks (object storage) can keep the
same lease by conditional writes; datasets at fsspec URLs are not locked yet.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

LOCK_NAME = ".wvdata.lock"
taken_over: list[dict] = []  # records of dead holders taken over in this process (for tests and logs)
_held: set[int] = set()  # fds of the leases this process holds


def _close_inherited() -> None:
    """In a forked child (a pool or DataLoader worker): close, without unlocking, the lease fds
    inherited from the parent. A flock lives as long as any fd of it is open, so otherwise a
    worker left running after its parent was killed would keep the dataset locked."""
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited)


class DatasetLocked(RuntimeError):
    """Another process holds the dataset's lease."""


@dataclass
class Lease:
    command: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    renewed: float = field(default_factory=time.time)
    ttl: float = 300.0  # seconds a record stays valid without renewal (object stores)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"`{self.command}` (host {self.host}, pid {self.pid}, run {self.run_id}, since {since})"


def lock_path(root: str | os.PathLike) -> str:
    return os.path.join(str(root), LOCK_NAME)


def holder(root: str | os.PathLike) -> Lease | None:
    """The lease record in a dataset (live or stale), if any."""
    try:
        with open(lock_path(root)) as f:
            return Lease(**json.loads(f.read()))
    except (OSError, ValueError, TypeError):
        return None


def _open_locked(path: str) -> int | None:
    """An fd of `path` holding its exclusive flock, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file we locked may have been unlinked by its releasing holder meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def dataset_lock(root: str | os.PathLike, command: str) -> Iterator[Lease]:
    """Hold the dataset's lease for the duration of the block (creating `root` if needed)."""
    root = str(root)
    if "://" in root and not root.startswith("file://"):
        yield Lease(command)  # object stores: not locked yet (see the module docstring)
        return
    root = root.removeprefix("file://")
    created = not os.path.isdir(root)
    os.makedirs(root, exist_ok=True)
    path = lock_path(root)
    fd = _open_locked(path)
    if fd is None:
        other = holder(root)
        who = other.describe() if other else "another process"
        raise DatasetLocked(f"{root} is being written by {who}; wait for it to finish "
                            "(a lock of a dead process is taken over automatically)")
    previous = os.read(fd, 1 << 16)
    if previous.strip():
        try:
            taken_over.append(json.loads(previous))  # its holder died without releasing it
        except ValueError:
            pass
    lease = Lease(command)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(lease)).encode(), 0)
    _held.add(fd)
    try:
        yield lease
    finally:
        _held.discard(fd)
        try:
            os.unlink(path)  # unlink while still locked: a waiter then re-checks the inode
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:
            try:
                os.rmdir(root)  # nothing else was written: leave no empty directory behind
            except OSError:
                pass
