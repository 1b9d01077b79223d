"""One shard of a build: its planned inputs in, tar + `.idx` + part tables out.

Runs in a worker (local process or Ray task), so it never calls polars (see wvdata.engine).
A shard's outputs are renamed into place only when complete, its part tables last: they are
the completion marker that `--resume` checks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from .. import engine
from .image import ImageOptions, ImageRejected, process_image
from .layouts import InputRow
from .options import SAMPLE_OVERHEAD, BuildOptions
from .tar import ShardWriter, format_idx, idx_line, write_atomic

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
    for a link after the check is refused too."""
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


def _sample_json(row: InputRow, task: ShardTask) -> bytes:
    doc = dict(row.extra)  # extra manifest columns never override the fields below
    doc.update({"key": row.key, "src_path": row.src_path, "source": row.source,
                "label": row.label, "class_name": task.classes[row.label] if row.label >= 0 else "",
                "query": row.query, "query_text": row.query_text, "meta": row.meta})
    doc.pop("meta_error", None)
    if row.meta_error:
        doc["meta_error"] = row.meta_error
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()


def part_paths(out: str, split: str, name: str) -> tuple[str, str]:
    # JSON, not parquet: a worker forked from a process that has run polars hangs on its
    # first polars call (polars' thread pool does not survive fork), so workers never use it.
    work = os.path.join(out, WORK_DIR, split)
    return os.path.join(work, f"{name}.errors.json"), os.path.join(work, f"{name}.samples.json")


def shard_done(task: ShardTask) -> bool:
    return os.path.exists(part_paths(task.out, task.split, task.name)[1])


def run_shard(task: ShardTask) -> tuple[int, int]:
    """Process one shard's inputs; write tar, idx and part tables; return (samples, errors)."""
    split_dir = os.path.join(task.out, task.split)
    tar_path = os.path.join(split_dir, f"{task.name}.tar")
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    samples, errors, lines = [], [], []
    limit = max_input_bytes(task.image.max_pixels)
    for i, row in enumerate(task.rows):
        try:
            img = process_image(read_input(row.path, task.contain, limit), task.image)
        except ImageRejected as e:
            errors.append({"split": task.split, "src_path": row.src_path, "reason": e.reason,
                           "detail": e.detail})
        else:
            label_text = str(row.label).encode()
            members = writer.write(row.key, [("jpg", img.data), ("cls", label_text),
                                             ("json", _sample_json(row, task))])
            lines.append(idx_line(members))
            jpg = members[0]
            samples.append({
                "key": row.key, "split": task.split, "shard": task.name, "label": row.label,
                "class_name": task.classes[row.label] if row.label >= 0 else "",
                "source": row.source, "query": row.query, "src_path": row.src_path,
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
    writer.close()
    os.makedirs(split_dir, exist_ok=True)
    if samples:  # tar and index first, the part tables (the completion marker) last
        write_atomic(tar_path, buf.getvalue())
        write_atomic(os.path.join(split_dir, f"{task.name}.idx"), format_idx(lines))
    err_path, smp_path = part_paths(task.out, task.split, task.name)
    os.makedirs(os.path.dirname(err_path), exist_ok=True)
    write_atomic(err_path, json.dumps(errors))
    write_atomic(smp_path, json.dumps(samples))
    return len(samples), len(errors)


def plan_shards(rows: Sequence[InputRow], opts: BuildOptions) -> list[list[InputRow]]:
    """Seeded shuffle (filelists are sorted by class), then cut by sample count or input bytes."""
    order = sorted(rows, key=lambda r: r.key)
    random.Random(f"{opts.seed}/{order[0].split if order else ''}").shuffle(order)
    shards: list[list[InputRow]] = []
    current: list[InputRow] = []
    size = 0
    for row in order:
        try:
            est = os.stat(row.path).st_size
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


