"""What both loader backends share: the entry arrays of a view, the shard reader, the epoch
plan, len(), set_epoch, state and skip accounting.

Entry data lives in flat numpy arrays, never per-entry Python objects, so forked DataLoader
workers share it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..dataset import is_url
from ..views import View, annotation
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


@dataclass
class EntryArrays:
    """What a worker needs to read entries: flat arrays (cheap to fork/pickle)."""

    paths: list[str]
    shard_id: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    width: np.ndarray
    height: np.ndarray
    label: np.ndarray
    sample: np.ndarray
    keys: list[str]
    sha1: np.ndarray | None = None  # (n, 20) uint8 digests of the stored bytes, with verify=True

    @classmethod
    def of(cls, v: View, verify: bool = False) -> EntryArrays:
        e = v.entries
        sample = e["sample"].to_numpy().astype(np.int64)
        sha1 = None
        if verify:  # the digests recorded at build time, gathered by sample id
            hexes = v.dataset.samples(v.split)["sha1"].to_numpy()[sample]
            sha1 = np.frombuffer(bytes.fromhex("".join(hexes)), np.uint8).reshape(len(sample), 20)
        return cls([v.dataset.shard_path(v.split, s) for s in v.shards], e["shard_id"].to_numpy(),
                   e["data_offset"].to_numpy(), e["bytes"].to_numpy(), e["width"].to_numpy(),
                   e["height"].to_numpy(), e["label"].to_numpy().astype(np.int64),
                   sample, e["key"].to_list(), sha1)

    def check(self, p: int, data: bytes) -> bytes:
        """`data` of entry p, after comparing its sha1 with the recorded one (when verifying)."""
        if self.sha1 is not None and hashlib.sha1(data).digest() != self.sha1[p].tobytes():
            raise ValueError(f"sha1 mismatch: the stored bytes of {self.keys[p]} changed since the build")
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
        self.entries = EntryArrays.of(v, verify)
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
