"""One writer at a time per dataset: an exclusive lease on `DATASET/.wvdata.lock`.

Every command that writes into a dataset (build and its resume, view, dedup, embed,
curriculum, aum) holds the lease while it writes; a second writer is refused at once with
the holder's host, PID, run id and command. The lease file holds that record as JSON.

On a local (or mounted) filesystem the exclusion itself is an advisory `flock` on the lease
file, which the kernel drops when its holder dies: a record left by a killed process is
stale, detected and taken over without anyone deleting it by hand. The record carries a
renewal time and a time-to-live, which is how a store without locks keeps the lease: for a
dataset at a URL the record is the object `DATASET/.wvdata.lock` (see `_store_lease`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
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
    if "://" in str(root) and not str(root).startswith("file://"):
        from ._store import Store

        return _read_record(Store(str(root)), False)[0]
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
        with _store_lease(root, command) as lease:
            yield lease
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


# ---------------------------------------------------------------- object stores


def _read_record(st, with_etag: bool) -> tuple[Lease | None, str | None]:
    try:
        etag = st.fs.info(st._p(LOCK_NAME)).get("ETag") if with_etag else None
        return Lease(**json.loads(st.read_bytes(LOCK_NAME))), etag
    except FileNotFoundError:
        return None, None
    except (ValueError, TypeError):  # unreadable record: treat as stale
        return Lease("?", renewed=0.0, ttl=0.0), etag


def _dead_here(lease: Lease) -> bool:
    """The record's holder ran on this host and is gone."""
    if lease.host != socket.gethostname():
        return False
    try:
        os.kill(int(lease.pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


@contextmanager
def _store_lease(root: str, command: str) -> Iterator[Lease]:
    """The lease of a dataset at a URL: the record object `.wvdata.lock`, created only if absent
    and renewed every ttl/3 by a thread. On S3 both are conditional writes (If-None-Match: *,
    If-Match: ETag), so two writers cannot both take it. A record not renewed for `ttl` seconds,
    or written by a process of this host that no longer runs (its holder died), is taken over.
    Limits: stores without conditional writes (gs://, http) fall back to write-then-read-back,
    which narrows but does not close the race; takeover trusts the hosts' clocks to agree
    within the ttl; a holder that stalls for longer than the ttl loses the lease."""
    from ._store import Store

    st = Store(root)
    st.makedirs()
    protocols = st.fs.protocol if isinstance(st.fs.protocol, tuple) else (st.fs.protocol,)
    s3 = "s3" in protocols
    lease = Lease(command)

    def put(cond: dict) -> None:
        st.write_atomic(LOCK_NAME, json.dumps(asdict(lease)), **(cond if s3 else {}))

    def refuse(other: Lease) -> DatasetLocked:
        return DatasetLocked(f"{root} is being written by {other.describe()}; wait for it to finish "
                             f"(a lease not renewed for {other.ttl:.0f} s is taken over)")

    try:
        if not s3 and st.exists(LOCK_NAME):
            raise FileExistsError(LOCK_NAME)
        put({"IfNoneMatch": "*"})
    except FileExistsError:
        other, etag = _read_record(st, s3)
        if other is not None and time.time() < other.renewed + other.ttl and not _dead_here(other):
            raise refuse(other) from None
        try:
            put({"IfMatch": etag} if etag else {"IfNoneMatch": "*"})
        except (OSError, FileExistsError):  # somebody else took it over first
            now, _ = _read_record(st, False)
            raise refuse(now or Lease("?")) from None
        if other is not None:
            taken_over.append(asdict(other))
    if not s3:
        time.sleep(0.2)
        mine, _ = _read_record(st, False)
        if mine is None or mine.run_id != lease.run_id:
            raise refuse(mine or Lease("?"))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease.ttl / 3):
            try:
                cur, etag = _read_record(st, s3)
                if cur is None or cur.run_id != lease.run_id:
                    print(f"wvdata: lost the lease of {root} to {cur.describe() if cur else 'nobody'}",
                          file=sys.stderr)
                    return
                lease.renewed = time.time()
                put({"IfMatch": etag} if etag else {})
            except Exception as e:  # a store hiccup: try again at the next period
                print(f"wvdata: renewing the lease of {root} failed: {type(e).__name__}", file=sys.stderr)

    thread = threading.Thread(target=renew, name="wvdata-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        cur, _ = _read_record(st, False)
        if cur is not None and cur.run_id == lease.run_id:
            st.remove(LOCK_NAME)

