"""Entry columns of a view read straight into shared memory, one parquet row group at a time.

At 16M entries reading whole columns into Arrow (on threads: more CPU than they save on a busy
node), combining, casting and narrowing them, then copying them into the loader's shared
mapping, costs several seconds and GBs of transient memory. Here each row group is decoded on
one thread and written once into the shared mapping; keys go straight from each row group's
string buffer into a shared byte buffer. Views held in memory (a polars frame) take the plain
Arrow path.
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..dataset import join, open_file
from ..views import View


def int_type(lo: int, hi: int) -> np.dtype:
    """The smallest of int16/32/64 (or uint8/16/32) that holds [lo, hi]."""
    for t in (np.int16, np.int32, np.int64) if lo < 0 else (np.uint8, np.uint16, np.uint32, np.int64):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def shared_empty(spec: dict[str, tuple[int, np.dtype]]) -> dict[str, np.ndarray]:
    """Uninitialised arrays (name -> (length, dtype)) in one MAP_SHARED anonymous mapping."""
    sizes = [-(-n * np.dtype(t).itemsize // 64) * 64 for n, t in spec.values()]
    mm = mmap.mmap(-1, max(1, sum(sizes)))
    out, at = {}, 0
    for (name, (n, t)), size in zip(spec.items(), sizes):
        out[name] = np.frombuffer(mm, t, count=n, offset=at)
        at += size
    return out


def _source(v: View) -> tuple[str, bool] | None:
    """(parquet path, is the split's samples.parquet) of a view read from disk, else None."""
    if v._entries is not None:
        return None
    if v.name is not None:
        return join(v.dataset.root, "views", v.name, "entries.parquet"), False
    return v.dataset.samples_path(v.split), True


def as_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer Arrow array without nulls as numpy (a view of one chunk): pyarrow's own
    `to_numpy` imports pandas on first use, 2-3 s of a loader's start."""
    if isinstance(arr, pa.ChunkedArray):
        chunks = [as_numpy(c) for c in arr.chunks]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    t = arr.type
    if not pa.types.is_integer(t) or arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    dt = np.dtype(f"{'i' if pa.types.is_signed_integer(t) else 'u'}{t.bit_width // 8}")
    return np.frombuffer(arr.buffers()[1], dt, count=len(arr), offset=arr.offset * dt.itemsize)


def _narrowed(a: np.ndarray) -> np.ndarray:
    return a.astype(int_type(int(a.min()), int(a.max()))) if len(a) else a


def read_numbers(v: View, columns: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Integer entry columns (of ENTRY_COLUMNS + shard_id) of an on-disk view, each narrowed to
    the smallest type that holds it, in one shared mapping; None for a view held in memory.
    Row groups are decoded one at a time on one thread (threads cost more CPU than they save
    here), then written once into the mapping."""
    src = _source(v)
    if src is None:
        return None
    path, split = src
    shards = v.shards
    with open_file(path) as f:
        pf = pq.ParquetFile(f, read_dictionary=["shard"] if split else None)
        n = pf.metadata.num_rows
        read = [c for c in columns if not (split and c in ("sample", "shard_id"))]
        if split and "shard_id" in columns:
            read.append("shard")
        parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        index = {name: i for i, name in enumerate(shards)}
        for i in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(i, columns=read, use_threads=False)
            for c in read:
                col = t.column(c)
                if col.null_count:
                    raise ValueError(f"{path}: column {c} has nulls")
                if c != "shard":  # narrowed now: the row group's Arrow memory is reused for the next
                    parts[c].append(_narrowed(as_numpy(col)))
                    continue
                for chunk in col.chunks:  # shard names (a dictionary) -> their index in dataset.json
                    if not pa.types.is_dictionary(chunk.type):
                        chunk = chunk.dictionary_encode()
                    # (a dict over the few names: pyarrow's index_in imports pandas, 2-3 s)
                    ids = np.array([index.get(s, -1) for s in chunk.dictionary.to_pylist()], np.int64)
                    if (ids < 0).any() or chunk.null_count:
                        raise ValueError(f"{path}: samples in shards that dataset.json does not list")
                    parts["shard_id"].append(ids[as_numpy(chunk.indices)])
            del t
    if split and "sample" in columns:
        parts["sample"] = [np.arange(n, dtype=np.int64)]
    spec = {}
    for c in columns:
        lo = min((int(a.min()) for a in parts[c] if len(a)), default=0)
        hi = max((int(a.max()) for a in parts[c] if len(a)), default=0)
        if c == "shard_id" and (lo < 0 or hi >= len(shards)):
            raise ValueError(f"{path}: shard_id outside the {len(shards)} shards of its split")
        spec[c] = (n, int_type(lo, hi))
    out = shared_empty(spec)
    for c in columns:
        at = 0
        for a in parts[c]:
            out[c][at:at + len(a)] = a
            at += len(a)
        parts[c] = []
        out[c].flags.writeable = False
    pa.default_memory_pool().release_unused()
    return out


def read_key_buffer(v: View) -> tuple[np.ndarray, np.ndarray] | None:
    """The keys of an on-disk view as (bytes, offsets) in shared mappings, written row group by
    row group (the data mapping grows by doubling when the size estimate falls short); None
    for a view in memory."""
    src = _source(v)
    if src is None:
        return None
    path, _ = src
    with open_file(path) as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        n = md.num_rows
        j = pf.schema_arrow.get_field_index("key")
        cap = max(4096, sum(md.row_group(i).column(j).total_uncompressed_size for i in range(md.num_row_groups)))
        mm = mmap.mmap(-1, cap)
        offsets = np.empty(n + 1, np.int64)
        offsets[0] = 0
        row = pos = 0
        for i in range(md.num_row_groups):
            col = pf.read_row_group(i, columns=["key"], use_threads=False).column(0)
            for chunk in col.chunks:
                if chunk.null_count:
                    raise ValueError(f"{path}: null keys")
                if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
                    chunk = chunk.cast(pa.large_string())
                m = len(chunk)
                wide = np.dtype(np.int64 if pa.types.is_large_string(chunk.type) else np.int32)
                off = np.frombuffer(chunk.buffers()[1], wide, count=m + 1, offset=chunk.offset * wide.itemsize)
                size = int(off[-1] - off[0])
                if pos + size > len(mm):  # the estimate fell short (dictionary-encoded repeats): grow
                    bigger = mmap.mmap(-1, max(2 * len(mm), pos + size))
                    bigger[:pos] = mm[:pos]
                    mm.close()
                    mm = bigger
                if size:
                    mm[pos:pos + size] = memoryview(chunk.buffers()[2])[int(off[0]):int(off[-1])]
                offsets[row + 1:row + m + 1] = off[1:] - off[0] + pos
                row, pos = row + m, pos + size
            del col
    pa.default_memory_pool().release_unused()
    data = np.frombuffer(mm, np.uint8, count=pos)
    off_type = np.int32 if pos < 2**31 else np.int64
    shared = shared_empty({"key_offsets": (n + 1, np.dtype(off_type))})["key_offsets"]
    shared[:] = offsets
    data.flags.writeable = shared.flags.writeable = False
    return data, shared
