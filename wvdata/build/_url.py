"""Crawls in object storage: a Path-like view of an fsspec URL for the layout readers, the
folder layout from one listing, and bounded reads of one input object.

Containment for URL sources: every key is normalised (`.` and `..` resolved) and must stay
under the source prefix; there are no links in a bucket, so that is the whole rule.
"""
from __future__ import annotations

import posixpath
from typing import Any

from .._store import Store, StoreError, describe_error, normalized_inside, url_fs
from .image import ImageRejected


class UrlPath:
    """The few `pathlib.Path` methods the layout readers use, over an fsspec URL."""

    def __init__(self, url: str, _fs: Any = None):
        self.url = url.rstrip("/")
        self._fs = _fs

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = url_fs(self.url)[0]
        return self._fs

    @property
    def _key(self) -> str:
        return self.fs._strip_protocol(self.url)

    def __truediv__(self, part: str) -> UrlPath:
        return UrlPath(f"{self.url}/{str(part).strip('/')}" if part else self.url, self._fs)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # so that os.path helpers see the URL text
        return self.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self.url.rsplit("/", 1)[0], self._fs)

    def resolve(self) -> UrlPath:
        return self

    def _ask(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise PermissionError(f"permission denied reading {self.url}: {describe_error(e)}") from None
        except Exception as e:
            raise StoreError(f"cannot read {self.url}: {describe_error(e)}") from None

    def exists(self) -> bool:
        """True also when the store refuses to say (403): the read will then fail on its own,
        as an error row, instead of the whole listing."""
        try:
            return bool(self._ask(self.fs.exists, self._key))
        except PermissionError:
            return True

    def is_file(self) -> bool:
        try:
            return bool(self._ask(self.fs.isfile, self._key))
        except PermissionError:
            return not self.url.endswith("/")

    def is_dir(self) -> bool:
        return bool(self._ask(self.fs.isdir, self._key))

    def read_bytes(self) -> bytes:
        return self._ask(self.fs.cat_file, self._key)

    def size(self) -> int:
        return int(self._ask(self.fs.size, self._key))

    def glob(self, pattern: str) -> list[UrlPath]:
        scheme = self.url.split("://", 1)[0]
        return [UrlPath(f"{scheme}://{k}", self._fs) for k in self._ask(self.fs.glob, f"{self._key}/{pattern}")]

    def find(self) -> dict[str, int]:
        """Every object under this prefix: relative key -> size."""
        return Store(self.url).find()


def check_source(src: UrlPath) -> str:
    """'file' or 'dir' for a URL source, or a one-line error (bucket unreachable, missing)."""
    if src.is_file():
        return "file"
    if src.is_dir():
        return "dir"
    raise FileNotFoundError(f"source {src} does not exist")


def read_url(url: str, contain: str | None, limit: int) -> bytes:
    """The bytes of one input object, at most `limit` (one ranged GET); a key outside the source
    prefix, a missing or unreadable object raise ImageRejected (an error row)."""
    data = read_urls([url], contain, limit)[0]
    if isinstance(data, ImageRejected):
        raise data
    return data


def read_urls(urls: list[str], contain: str | None, limit: int) -> list[bytes | ImageRejected]:
    """`read_url` for many objects at once: per store, the ranged GETs run concurrently in
    fsspec's event loop (a chunk's images arrive in about one round trip instead of one each)."""
    out: list[bytes | ImageRejected] = []
    by_scheme: dict[str, list[tuple[int, str]]] = {}
    for u in urls:
        norm = normalized_inside(u, contain) if contain is not None else u
        out.append(ImageRejected("path escapes source", f"{u} is not under {contain}") if norm is None else b"")
        if norm is not None:
            by_scheme.setdefault(norm.split("://", 1)[0], []).append((len(out) - 1, norm))
    for todo in by_scheme.values():
        try:
            fs = url_fs(todo[0][1])[0]
            got = fs.cat_ranges([fs._strip_protocol(u) for _, u in todo], [0] * len(todo), [limit + 1] * len(todo),
                                on_error="return")
        except Exception as e:  # the whole batch failed (endpoint gone): each row says why
            got = [e] * len(todo)
        for (i, u), r in zip(todo, got):
            if isinstance(r, FileNotFoundError):
                out[i] = ImageRejected("missing file", u)
            elif isinstance(r, BaseException):
                out[i] = ImageRejected("unreadable file", describe_error(r))
            elif len(r) > limit:
                out[i] = ImageRejected("file too large", f"more than {limit} bytes (from --max-pixels)")
            else:
                out[i] = bytes(r)
    return out
