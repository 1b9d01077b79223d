"""Where a dataset or a crawl lives: a local directory or an fsspec URL (s3://, gs://, ...).

Stages that write into a dataset go through `Store`, so a dataset in object storage gets the
same guarantees as one on disk, rethought for a store without rename:
- local: a file is written under a temporary name, fsynced and renamed into place;
- URL: an object is one PUT (or a multipart upload completed on close), which a reader sees
  whole or not at all, so it is written straight to its key; a write cut short publishes
  nothing (an unfinished multipart upload is left for the bucket's lifecycle rule to expire).
Credentials and endpoints come from the environment and fsspec's configuration
(`AWS_*`, `~/.config/fsspec`), never from arguments that could end up in files or logs.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Iterator
from typing import Any, BinaryIO


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and fsspec URLs (s3://, http://) alike."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class StoreError(OSError):
    """A store that cannot be reached or written (one line, without credentials)."""


def describe_error(e: BaseException) -> str:
    """First line of an fsspec/botocore error, without the exception chain."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def url_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path inside it) of an fsspec URL, listings uncached: other processes
    (pool workers, Ray tasks, a resumed build) change what is there."""
    import fsspec

    protocol = url.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, use_listings_cache=False) if protocol in ("s3", "s3a", "gs", "gcs") \
        else fsspec.core.url_to_fs(url)[0]
    return fs, fs._strip_protocol(url).rstrip("/")


def normalize_url(url: str) -> str:
    """`url` with `.` and `..` resolved in its path (a bucket has no links to follow)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def normalized_inside(url: str, prefix: str) -> str | None:
    """`url` normalised if it stays under `prefix` (both URLs, same scheme), else None."""
    if url.partition("://")[0] != prefix.partition("://")[0] or not url.partition("://")[2]:
        return None
    norm, base = normalize_url(url), normalize_url(prefix).rstrip("/")
    return norm if norm == base or norm.startswith(base + "/") else None


class Store:
    """Files under one root, local or at a URL; `rel` paths are '/'-separated, under the root."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/") or "/"
        self.url = is_url(self.root)
        if self.url:
            self.fs, self._base = url_fs(self.root)
        else:
            self.root = self.root.removeprefix("file://")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def path(self, rel: str = "") -> str:
        """The location users see (a local path or a URL)."""
        return join(self.root, rel) if rel else self.root

    def _p(self, rel: str) -> str:
        if self.url:
            return f"{self._base}/{rel.strip('/')}" if rel else self._base
        return os.path.join(self.root, rel) if rel else self.root

    def _call(self, what: str, fn, *args, **kw):
        """Run a store call; errors other than a missing file become one-line StoreErrors."""
        try:
            return fn(*args, **kw)
        except (FileNotFoundError, FileExistsError, StoreError):
            raise
        except PermissionError as e:
            raise StoreError(f"permission denied {what} {self.root}: {describe_error(e)}") from None
        except Exception as e:  # botocore/aiohttp errors: unreachable endpoint, bad credentials, ...
            if not self.url:
                raise
            raise StoreError(f"cannot {what} {self.root}: {describe_error(e)}") from None

    # ------------------------------------------------------------ reading

    def exists(self, rel: str = "") -> bool:
        if not self.url:
            return os.path.exists(self._p(rel))
        return bool(self._call("read", self.fs.exists, self._p(rel)))

    def isdir(self, rel: str = "") -> bool:
        if not self.url:
            return os.path.isdir(self._p(rel))
        return bool(self._call("read", self.fs.isdir, self._p(rel)))

    def isfile(self, rel: str = "") -> bool:
        if not self.url:
            return os.path.isfile(self._p(rel))
        return bool(self._call("read", self.fs.isfile, self._p(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (sorted; empty when it does not exist)."""
        if not self.url:
            p = self._p(rel)
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        try:
            found = self._call("list", self.fs.ls, self._p(rel), detail=False)
        except FileNotFoundError:
            return []
        base = self._p(rel).rstrip("/") + "/"
        return sorted({f.rstrip("/")[len(base):].split("/", 1)[0] for f in found
                       if f.rstrip("/").startswith(base)} - {""})

    def find(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel`: relative path -> size (one listing, for crawls in a bucket)."""
        base = self._p(rel).rstrip("/")
        if not self.url:
            out = {}
            for d, _, files in os.walk(base):
                for f in files:
                    full = os.path.join(d, f)
                    out[os.path.relpath(full, base)] = os.path.getsize(full)
            return out
        found = self._call("list", self.fs.find, base, detail=True)
        return {k[len(base) + 1:]: int(v.get("size") or 0) for k, v in found.items()
                if k.startswith(base + "/") and v.get("type") != "directory"}

    def size(self, rel: str) -> int:
        if not self.url:
            return os.path.getsize(self._p(rel))
        return int(self._call("read", self.fs.size, self._p(rel)))

    def read_bytes(self, rel: str) -> bytes:
        if not self.url:
            with open(self._p(rel), "rb") as f:
                return f.read()
        return self._call("read", self.fs.cat_file, self._p(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    # ------------------------------------------------------------ writing

    def makedirs(self, rel: str = "") -> None:
        if not self.url:
            os.makedirs(self._p(rel), exist_ok=True)
        elif not rel:  # a bucket has to exist; a prefix comes with its first object
            bucket = self._base.split("/", 1)[0]
            if not self._call("write", self.fs.exists, bucket):
                raise StoreError(f"cannot write {self.root}: bucket {bucket!r} does not exist or is not visible")

    def write_atomic(self, rel: str, data: bytes | str, **put_options: Any) -> None:
        """Write one file whole: readers see the old content or the new, never a part."""
        data = data.encode() if isinstance(data, str) else data
        if self.url:
            self._call("write", self.fs.pipe_file, self._p(rel), data, **put_options)
            return
        path = self._p(rel)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """A file written in pieces and published whole when the block ends without error
        (local: temporary name, fsync, rename; URL: one PUT or a completed multipart upload)."""
        if self.url:
            f = self._call("write", self.fs.open, self._p(rel), "wb")
            try:
                yield f
            except BaseException:
                with contextlib.suppress(Exception):
                    f.discard()  # abort: no object appears
                raise
            self._call("write", f.close)
            return
        path = self._p(rel)
        tmp = f"{path}.tmp-{os.getpid()}"
        f = open(tmp, "wb")
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def remove(self, rel: str) -> None:
        """Remove a file; a missing one is fine."""
        if not self.url:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._p(rel))
            return
        with contextlib.suppress(FileNotFoundError):
            self._call("delete from", self.fs.rm_file, self._p(rel))

    def rmtree(self, rel: str) -> None:
        """Remove a directory (prefix) and everything under it; a missing one is fine."""
        p = self._p(rel)
        if not self.url:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)
            return
        with contextlib.suppress(FileNotFoundError):
            self._call("delete from", self.fs.rm, p, recursive=True)
