"""What both loader backends share: the entry arrays of a view, the shard reader, the epoch
plan, len(), set_epoch, state and skip accounting.

Entry data lives in flat numpy arrays, never per-entry Python objects, so forked DataLoader
workers share it.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..dataset import is_url, open_file
from ..views import View, annotation, concat_text
from ._columns import as_numpy, read_key_buffer, read_numbers
from .order import (
    epoch_order,
    num_batches,
    parse_quota,
    quota_batches,
    quota_order,
    quota_rank_plan,
    rank_plan,
    share_quota,
)
from .transforms import TransformConfig

log = logging.getLogger("wvdata.stream")


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, else torch.distributed's, else RANK/WORLD_SIZE, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Keys:
    """Entry keys as one bytes buffer + offsets (Arrow's string layout): `keys[p]` is a str, made
    on demand; no Python object per entry, so forked workers share the pages."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, p: int) -> str:
        return self.data[self.offsets[p]:self.offsets[p + 1]].tobytes().decode()

    def take(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        return [self[p] for p in positions]

    def arrow(self) -> pa.Array:
        """All keys as an Arrow string array over the same memory (zero copy)."""
        kind = pa.StringArray if self.offsets.dtype == np.int32 else pa.LargeStringArray
        return kind.from_buffers(len(self), pa.py_buffer(self.offsets), pa.py_buffer(self.data))


def shared_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of `arrays` in one MAP_SHARED anonymous mapping. Fork does not copy the page tables
    of shared mappings, so a forked worker maps (and counts in its PSS) only the pages it reads,
    and no refcount ever dirties them."""
    sizes = [-(-a.nbytes // 64) * 64 for a in arrays.values()]
    mm = mmap.mmap(-1, max(1, sum(sizes)))
    out, at = {}, 0
    for (name, a), size in zip(arrays.items(), sizes):
        view = np.frombuffer(mm, a.dtype, count=a.size, offset=at).reshape(a.shape)
        view[...] = a
        view.flags.writeable = False
        out[name] = view
        at += size
    return out


def _narrow(a: np.ndarray) -> np.ndarray:
    """The smallest of int16/32/64 (or uint8/16/32) that holds `a` (16M entries: bytes count)."""
    a = np.asarray(a)
    if not len(a):
        return a.astype(np.int32)
    lo, hi = int(a.min()), int(a.max())
    for t in (np.int16, np.int32, np.int64) if lo < 0 else (np.uint8, np.uint16, np.uint32, np.int64):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return a.astype(t, copy=False)
    return a.astype(np.int64)


class _Deferred:
    """A value made once: in a background thread (`start`) or on first use (`result`)."""

    def __init__(self, make):
        self.make, self.thread, self.value, self.error = make, None, None, None

    def start(self, name: str = "wvdata-keys") -> _Deferred:
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.value = self.make()
        except BaseException as e:  # noqa: BLE001 - raised again where the value is used
            self.error = e

    def result(self):
        if self.thread is None:
            self._run()
        else:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def read_keys(v: View) -> Keys:
    """A view's keys as one bytes buffer + 32-bit offsets in a shared mapping (the Arrow read is
    copied there, then its memory given back)."""
    got = read_key_buffer(v)
    if got is not None:
        return Keys(*got)
    key = pc.cast(v.table(["key"]).column("key"), pa.large_string()).combine_chunks()
    off = np.frombuffer(key.buffers()[1], np.int64, count=len(key) + 1, offset=key.offset * 8)
    data = np.frombuffer(key.buffers()[2] or b"", np.uint8)[off[0]:off[-1]]
    off = off - off[0]  # 32-bit offsets while the keys take < 2 GiB (16M keys: 64 MB less)
    a = shared_arrays({"key_data": data, "key_offsets": off.astype(np.int32) if off[-1] < 2**31 else off})
    del key, data, off
    pa.default_memory_pool().release_unused()
    return Keys(a["key_data"], a["key_offsets"])


@dataclass
class EntryArrays:
    """What a worker needs to read entries: flat arrays in shared memory (cheap to fork).

    The keys (at 16M entries the biggest column by far: ~0.8 GB, and most of the read time) are
    only needed where batches are handed out, never by a worker: they are read on first use of
    `keys`, or in a background thread started by `of(..., keys="thread")`, so a loader can plan,
    fork its workers or build its DALI pipeline while they load.
    """

    paths: list[str]  # one per shard
    shard_id: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    width: np.ndarray
    height: np.ndarray
    label: np.ndarray
    sample: np.ndarray
    sha1: np.ndarray | None = None  # (n, 20) uint8 digests of the stored bytes, with verify=True
    _keys: Keys | _Deferred | None = field(default=None, repr=False)

    NUMBERS = ("shard_id", "data_offset", "bytes", "width", "height", "label", "sample")

    @classmethod
    def of(cls, v: View, verify: bool = False, keys: str = "now") -> EntryArrays:
        """The entry arrays of `v`; keys "now", "thread" (read in the background) or "later" (on
        first use of `.keys`)."""
        if keys not in ("now", "thread", "later"):
            raise ValueError(f"keys must be 'now', 'thread' or 'later', got {keys!r}")
        deferred = _Deferred(lambda: read_keys(v))
        if keys == "thread":
            deferred.start()
        a = read_numbers(v, cls.NUMBERS)  # straight into shared memory where the view is on disk
        if a is None:
            t = v.table(list(cls.NUMBERS))
            a = shared_arrays({name: _narrow(as_numpy(t.column(name))) for name in cls.NUMBERS})
            del t
        if verify:  # the digests recorded at build time, gathered by sample id
            with open_file(v.dataset.samples_path(v.split)) as f:
                hexes = pq.read_table(f, columns=["sha1"]).column("sha1")
            raw = np.frombuffer(concat_text(pc.cast(hexes, pa.large_string()).combine_chunks()), np.uint8)
            digests = np.frombuffer(bytes.fromhex(raw.tobytes().decode()), np.uint8).reshape(-1, 20)
            a["sha1"] = shared_arrays({"sha1": digests[a["sample"]]})["sha1"]
        if keys != "thread":  # (a running key read would get it back itself)
            pa.default_memory_pool().release_unused()  # the Arrow reads are copied: give their memory back
        out = cls([v.dataset.shard_path(v.split, s) for s in v.shards], a["shard_id"], a["data_offset"],
                  a["bytes"], a["width"], a["height"], a["label"], a["sample"], a.get("sha1"), deferred)
        if keys == "now":
            out.keys  # noqa: B018 - read them now
        return out

    @property
    def keys(self) -> Keys:
        """The entry keys (read or waited for on first use)."""
        if not isinstance(self._keys, Keys):
            self._keys = self._keys.result()
        return self._keys

    def __len__(self) -> int:
        return len(self.shard_id)

    def check(self, p: int, data: bytes) -> bytes:
        """`data` of entry p, after comparing its sha1 with the recorded one (when verifying)."""
        if self.sha1 is not None and hashlib.sha1(data).digest() != self.sha1[p].tobytes():
            raise ValueError("sha1 mismatch: the stored bytes changed since the build")
        return data


class ShardFiles:
    """Open shard files per worker; local paths (pread) or fsspec URLs read by byte range."""

    MAX_OPEN = 64  # per worker; a view may span thousands of shards

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.open: OrderedDict[int, Any] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        f = self.open.get(shard)
        if f is not None:
            self.open.move_to_end(shard)
        else:
            if len(self.open) >= self.MAX_OPEN:
                self._close(self.open.popitem(last=False)[1])
            path = self.paths[shard]
            if is_url(path):
                import fsspec

                fs, fpath = fsspec.core.url_to_fs(path)
                f = fs.open(fpath, "rb", block_size=1 << 21, cache_type="readahead")
            else:
                f = os.open(path.removeprefix("file://"), os.O_RDONLY)
            self.open[shard] = f
        if isinstance(f, int):  # one system call, no seek
            data = os.pread(f, int(size), int(offset))
        else:
            f.seek(int(offset))
            data = f.read(int(size))
        if len(data) != size:
            raise EOFError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    @staticmethod
    def _close(f) -> None:
        os.close(f) if isinstance(f, int) else f.close()

    def close(self) -> None:
        while self.open:
            self._close(self.open.popitem()[1])

    __del__ = close


@dataclass
class LoaderStats:
    skipped: int = 0
    skipped_by_shard: dict[str, int] = field(default_factory=dict)


class LoaderBase:
    """What both backends share: the epoch plan, len(), set_epoch, state, skip accounting."""

    backend = "?"
    key_read = "now"  # when the entry keys are read (see EntryArrays.of): backends defer them

    def __init__(self, v: View, *, batch_size: int, train: bool, cfg: TransformConfig, seed: int,
                 rank: int, world_size: int, drop_last: bool, shuffle: bool, window: int,
                 with_index: bool = False, verify: bool = False, quota: str | Sequence[int] | None = None):
        if len(v) == 0:
            raise ValueError(f"view {v.name or v.split!r} has no entries")
        self.view, self.batch_size, self.train, self.cfg = v, batch_size, train, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.shuffle, self.window, self.with_index = drop_last, shuffle, window, with_index
        self.epoch, self._batch, self._resuming = 0, 0, False
        self.stats = LoaderStats()
        self.verify = verify
        self.entries = EntryArrays.of(v, verify, self.key_read)
        self.quota: tuple[tuple[int, ...], np.ndarray] | None = None  # curriculum quota batches: (quota, groups)
        if quota is not None:
            self.quota = quota_groups(v, quota, batch_size * world_size)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @image_size.setter
    def image_size(self, size: int) -> None:
        """Multi-scale training: the next iteration decodes at this size."""
        self.cfg = replace(self.cfg, image_size=int(size))

    def __len__(self) -> int:
        if self.quota is not None:
            return quota_batches(int((self.quota[1] == 0).sum()), self.quota[0][0], self.drop_last)
        return num_batches(len(self.view), self.world_size, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batch = epoch, 0
            self._restart()

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's entry positions for `epoch` (the torch backend yields them in this order)."""
        if self.quota is not None:  # batch b of every rank holds its share of global quota batch b
            order = quota_order(self.quota[1], self.entries.label, self.quota[0], self.seed, epoch, self.drop_last)
            return quota_rank_plan(order, self.rank, self.world_size, self.batch_size).positions
        order = epoch_order(self.entries.shard_id, self.seed, epoch, self.shuffle, self.window)
        return rank_plan(order, self.rank, self.world_size, self.batch_size, self.drop_last).positions

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self._batch, "seed": self.seed,
                "world_size": self.world_size, "entries": len(self.view), "image_size": self.image_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["entries"], state["world_size"]) != (len(self.view), self.world_size):
            raise ValueError(f"loader state is for {state['entries']} entries on {state['world_size']} "
                             f"ranks, this loader has {len(self.view)} on {self.world_size}")
        self.seed, self.epoch, self._batch = state["seed"], state["epoch"], state["batch"]
        self.image_size = state.get("image_size", self.image_size)
        self._resuming = True  # the next iteration continues; later ones start epochs afresh

    def _begin(self) -> None:
        """Start of an iteration: from the restored position once, else from the epoch's start."""
        if not self._resuming:
            self._batch = 0
            self._restart()
        self._resuming = False

    def _restart(self) -> None:
        """Forget progress within the epoch (backends with more state extend this)."""

    def _note_bad(self, bad: list[tuple[int, str, str]]) -> None:
        for shard_id, key, why in bad:
            shard = self.view.shards[shard_id]
            if shard not in self.stats.skipped_by_shard:
                log.warning("skipping unreadable samples in %s/%s (first: %s: %s)",
                            self.view.split, shard, key, why)
            self.stats.skipped_by_shard[shard] = self.stats.skipped_by_shard.get(shard, 0) + 1
            self.stats.skipped += 1


def quota_groups(v: View, quota: str | Sequence[int], global_batch: int) -> tuple[tuple[int, ...], np.ndarray]:
    """A view's curriculum quota batches, checked: (the quota for the subsets the view holds, each
    entry's group = subset - 1). The loader's order plan (`stream.order.quota_order`) uses them."""
    q = parse_quota(quota)
    if sum(q) != global_batch:
        raise ValueError(f"the batch quota {','.join(map(str, q))} sums to {sum(q)}, but the global batch is "
                         f"{global_batch} (batch size x ranks)")
    table = annotation(v.dataset, "curriculum", v.split).select("key", "subset")
    subset = v.entries.select("key").join(table, on="key", how="left", maintain_order="left")["subset"]
    if subset.null_count():
        example = v.entries["key"].filter(subset.is_null())[0]
        raise ValueError(f"{subset.null_count()} entries of the view have no curriculum subset (no features), "
                         f"e.g. {example!r}: quota batches need every entry in a subset; select subsets first")
    groups = subset.to_numpy().astype(np.int64) - 1
    return share_quota(q, np.bincount(groups, minlength=1).tolist()), groups
