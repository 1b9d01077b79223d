"""Shards of a build: planning, encoding chunks of images, and the one writer of each shard.

`encode_chunk` runs in a worker (local process, or inside a Ray task's `run_shard`), so it
never calls polars (see wvdata.engine). A shard's outputs are published only when complete
(renamed into place on disk; one PUT or a completed multipart upload in a bucket), its part
tables last: they are the per-shard completion record that `--resume` checks. A task carries
only its source paths or URLs and the dataset's location, so a Ray task on any machine reads
its inputs from and writes its shard to the store itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from .. import engine
from .._store import Store
from ..dataset import is_url
from ._url import read_url, read_urls
from .image import ImageOptions, ImageRejected, process_image
from .layouts import InputRow
from .options import SAMPLE_OVERHEAD, BuildOptions
from .tar import Member, TarFragment, format_idx, idx_line, tar_end

WORK_DIR = ".build"


@dataclass
class ShardTask:
    out: str
    split: str
    name: str
    rows: list[InputRow]
    classes: list[str]
    image: ImageOptions
    contain: str | None = None  # real path every input must resolve inside (None: manifest without --root)


def max_input_bytes(max_pixels: int) -> int:
    """Largest input file read: 8 bytes per allowed pixel (16-bit RGBA, uncompressed) + 16 MiB
    of headers and metadata. Anything larger cannot be an image within --max-pixels."""
    return 8 * max_pixels + (16 << 20)


def read_input(path: str, contain: str | None, limit: int) -> bytes:
    """The bytes of one input file, refusing what a hostile crawl can plant: a path (or link)
    leading outside `contain`, anything but a regular file (FIFOs would block, devices never
    end), or more than `limit` bytes. The final open does not follow links, so a file swapped
    for a link after the check is refused too. A URL is read from its store (`_url.read_url`)."""
    if is_url(path):
        if contain is not None and not is_url(contain):
            raise ImageRejected("path escapes source", f"{path} is not under {contain}")
        return read_url(path, contain, limit)
    try:
        real = os.path.realpath(path)
        if contain is not None and real != contain and not real.startswith(contain.rstrip(os.sep) + os.sep):
            raise ImageRejected("path escapes source", f"resolves to {real}")
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageRejected("missing file", path) from None
    except (OSError, ValueError) as e:
        raise ImageRejected("unreadable file", f"{type(e).__name__}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else \
                "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file"
            raise ImageRejected("not a file", f"a {kind}")
        if st.st_size > limit:
            raise ImageRejected("file too large", f"{st.st_size} bytes > {limit} (from --max-pixels)")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # grew while being read
            raise ImageRejected("file too large", f"more than {limit} bytes (from --max-pixels)")
        return data
    except OSError as e:
        raise ImageRejected("unreadable file", f"{type(e).__name__}: {e}") from None
    finally:
        os.close(fd)


def _sample_json(row: InputRow, class_name: str) -> bytes:
    doc = dict(row.extra)  # extra manifest columns never override the fields below
    doc.update({"key": row.key, "src_path": row.src_path, "source": row.source,
                "label": row.label, "class_name": class_name,
                "query": row.query, "query_text": row.query_text, "meta": row.meta})
    doc.pop("meta_error", None)
    if row.meta_error:
        doc["meta_error"] = row.meta_error
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()


def part_paths(split: str, name: str) -> tuple[str, str]:
    """A shard's part tables (errors, samples) relative to the dataset: its completion record.
    JSON, not parquet: a worker forked from a process that has run polars hangs on its first
    polars call (polars' thread pool does not survive fork), so workers never use it."""
    return f"{WORK_DIR}/{split}/{name}.errors.json", f"{WORK_DIR}/{split}/{name}.samples.json"


@dataclass
class ChunkTask:
    """Consecutive rows of one shard: the local pool's unit of work (`encode_chunk`)."""

    shard: int  # the shard's number in the build's task list
    index: int  # the chunk's place in its shard
    split: str
    rows: list[InputRow]
    class_names: list[str]  # of each row ("" when unlabelled)
    image: ImageOptions
    contain: str | None = None


@dataclass
class Chunk:
    """A chunk's output: tar members (offsets within `data`), sample rows and error rows."""

    shard: int
    index: int
    data: bytes
    lines: list[list[Member]]  # per stored sample, its members (jpg, cls, json)
    samples: list[dict]  # offsets within `data`, shifted when the shard is joined
    errors: list[dict]


def split_chunks(shard: int, task: ShardTask, size: int) -> list[ChunkTask]:
    """A shard's rows as chunks of `size` (the last one shorter)."""
    names = [task.classes[r.label] if r.label >= 0 else "" for r in task.rows]
    return [ChunkTask(shard, i // size, task.split, task.rows[i:i + size], names[i:i + size], task.image,
                      task.contain) for i in range(0, max(len(task.rows), 1), size)]


PREFETCH = 32  # objects fetched concurrently from a store, at most


def _prefetch(task: ChunkTask, start: int, limit: int) -> dict[int, bytes | ImageRejected]:
    """The bytes of the next PREFETCH inputs that are URLs, fetched concurrently."""
    rows = [(i, r.path) for i, r in enumerate(task.rows[start:start + PREFETCH], start) if is_url(r.path)]
    if len(rows) < 2 or (task.contain is not None and not is_url(task.contain)):
        return {}
    return dict(zip([i for i, _ in rows], read_urls([p for _, p in rows], task.contain, limit)))


def encode_chunk(task: ChunkTask) -> Chunk:
    """Read, check and normalise a chunk's images into a tar fragment (runs in a worker)."""
    frag = TarFragment()
    lines, samples, errors = [], [], []
    limit = max_input_bytes(task.image.max_pixels)
    fetched: dict[int, bytes | ImageRejected] = {}
    for i, (row, class_name) in enumerate(zip(task.rows, task.class_names)):
        if i % PREFETCH == 0:
            fetched = _prefetch(task, i, limit)
        try:
            data = fetched.pop(i) if i in fetched else read_input(row.path, task.contain, limit)
            if isinstance(data, ImageRejected):
                raise data
            img = process_image(data, task.image)
        except ImageRejected as e:
            errors.append({"split": task.split, "src_path": row.src_path, "reason": e.reason,
                           "detail": e.detail})
        else:
            members = frag.write(row.key, [("jpg", img.data), ("cls", str(row.label).encode()),
                                           ("json", _sample_json(row, class_name))])
            lines.append(members)
            jpg = members[0]
            samples.append({
                "key": row.key, "split": task.split, "shard": "", "label": row.label,
                "class_name": class_name, "source": row.source, "query": row.query, "src_path": row.src_path,
                "width": img.width, "height": img.height, "bytes": jpg.size,
                "sha1": hashlib.sha1(img.data).hexdigest(), "offset": jpg.header_offset,
                "data_offset": jpg.offset, "reencoded": img.reencoded, "trailer_bytes": img.trailer_bytes,
                "meta_error": row.meta_error or None, "query_text": row.query_text,
                "meta": json.dumps(row.meta, sort_keys=True, ensure_ascii=False, default=str)
                if row.meta else None,
            })
        if (i + 1) % 16 == 0:
            engine.tick(16)
    engine.tick(len(task.rows) % 16)
    return Chunk(task.shard, task.index, frag.getvalue(), lines, samples, errors)


class ShardSink:
    """The one writer of a shard: takes its chunks in any order, appends them in order to the
    tar under a temporary name, and when all are in renames tar and `.idx` into place and
    writes the part tables (the completion marker) last."""

    def __init__(self, task: ShardTask, chunks: int):
        self.task, self.left = task, chunks
        self._next, self._waiting = 0, {}
        self._size = 0
        self._file = None
        self._lines: list[str] = []
        self._samples: list[dict] = []
        self._errors: list[dict] = []
        self._store = Store(task.out)
        self._writer = None

    def add(self, chunk: Chunk) -> bool:
        """Take one chunk; True when it was the shard's last (the shard is then written)."""
        self._waiting[chunk.index] = chunk
        while self._next in self._waiting:
            self._append(self._waiting.pop(self._next))
            self._next += 1
        self.left -= 1
        if self.left == 0:
            self._finish()
        return self.left == 0

    def _append(self, chunk: Chunk) -> None:
        base = self._size
        if chunk.data:
            if self._file is None:
                self._store.makedirs(self.task.split)
                self._writer = self._store.writer(f"{self.task.split}/{self.task.name}.tar")
                self._file = self._writer.__enter__()
            self._file.write(chunk.data)
            self._size += len(chunk.data)
        self._lines += [idx_line(m.shifted(base) for m in members) for members in chunk.lines]
        for row in chunk.samples:
            row["shard"] = self.task.name
            row["offset"] += base
            row["data_offset"] += base
        self._samples += chunk.samples
        self._errors += chunk.errors

    def _finish(self) -> None:
        task, st = self.task, self._store
        if self._file is not None:  # tar and index first, the part tables last
            self._file.write(tar_end(self._size))
            self._writer.__exit__(None, None, None)  # published: renamed, or the upload completed
            self._writer = self._file = None  # (nothing left for `abort` to drop)
            st.write_atomic(f"{task.split}/{task.name}.idx", format_idx(self._lines))
        else:
            st.makedirs(task.split)
        err_path, smp_path = part_paths(task.split, task.name)
        st.makedirs(os.path.dirname(err_path))
        st.write_atomic(err_path, json.dumps(self._errors))
        st.write_atomic(smp_path, json.dumps(self._samples))

    def abort(self) -> None:
        """Drop a shard cut short by an error: its unpublished tar goes (the temporary file is
        removed, the multipart upload discarded), so that a retry or `--resume` starts it clean
        and a finished dataset never holds a stray part of it."""
        writer, self._writer, self._file = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.__exit__(OSError, OSError("shard aborted"), None)

    @property
    def counts(self) -> tuple[int, int]:
        return len(self._samples), len(self._errors)


def run_shard(task: ShardTask) -> tuple[int, int]:
    """One whole shard in one task (a Ray task): its rows as one chunk, then the shard written.
    Gives the same bytes as the local pool's chunks (tar fragments join exactly)."""
    sink = ShardSink(task, 1)
    try:
        sink.add(encode_chunk(split_chunks(0, task, max(len(task.rows), 1))[0]))
    except BaseException:
        sink.abort()  # Ray may run the task again, possibly in another process
        raise
    return sink.counts


def plan_shards(rows: Sequence[InputRow], opts: BuildOptions) -> list[list[InputRow]]:
    """Seeded shuffle (filelists are sorted by class), then cut by sample count or input bytes."""
    order = sorted(rows, key=lambda r: r.key)
    random.Random(f"{opts.seed}/{order[0].split if order else ''}").shuffle(order)
    shards: list[list[InputRow]] = []
    current: list[InputRow] = []
    size = 0
    for row in order:
        try:
            est = row.size if row.size >= 0 else os.stat(row.path).st_size
        except (OSError, ValueError):
            est = 0
        full = (opts.shard_samples and len(current) >= opts.shard_samples) or \
            (not opts.shard_samples and current and size + est > opts.shard_size)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(row)
        size += est + SAMPLE_OVERHEAD
    if current:
        shards.append(current)
    return shards


