"""What both loader backends share: the entry arrays of a view, the shard reader, the epoch
plan, len(), set_epoch, state and skip accounting.

Entry data lives in flat numpy arrays, never per-entry Python objects, so forked DataLoader
workers share it.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..dataset import is_url
from ..views import View
from .order import epoch_order, num_batches, rank_plan
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

    @classmethod
    def of(cls, v: View) -> EntryArrays:
        e = v.entries
        return cls([v.dataset.shard_path(v.split, s) for s in v.shards], e["shard_id"].to_numpy(),
                   e["data_offset"].to_numpy(), e["bytes"].to_numpy(), e["width"].to_numpy(),
                   e["height"].to_numpy(), e["label"].to_numpy().astype(np.int64),
                   e["sample"].to_numpy().astype(np.int64), e["key"].to_list())


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
                 with_index: bool = False):
        if len(v) == 0:
            raise ValueError(f"view {v.name or v.split!r} has no entries")
        self.view, self.batch_size, self.train, self.cfg = v, batch_size, train, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.shuffle, self.window, self.with_index = drop_last, shuffle, window, with_index
        self.epoch, self._batch, self._resuming = 0, 0, False
        self.stats = LoaderStats()
        self.entries = EntryArrays.of(v)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @image_size.setter
    def image_size(self, size: int) -> None:
        """Multi-scale training: the next iteration decodes at this size."""
        self.cfg = replace(self.cfg, image_size=int(size))

    def __len__(self) -> int:
        return num_batches(len(self.view), self.world_size, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batch = epoch, 0
            self._restart()

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's entry positions for `epoch` (the torch backend yields them in this order)."""
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


