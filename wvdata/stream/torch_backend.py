"""The torch backend: byte-range reads + PIL decode in DataLoader worker processes.

One DataLoader item is one whole batch of this rank's epoch plan: a worker reads a run of
entries from few shards and hands over a finished uint8 batch with the positions it holds; the
main process attaches labels, keys and sample ids from those positions.

Start-up (what the first batch waits for): the entry numbers and the keys are read side by side
(the key thread is joined before the workers fork); the keys go to a shared mapping that
workers never touch: the main process attaches them. Nothing imports torchvision (RandAugment
is PIL, see transforms), which alone took seconds (it imports torch._dynamo).
"""
from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..views import View
from .base import EntryArrays, LoaderBase, ShardFiles, _narrow, shared_arrays
from .transforms import TransformConfig, eval_images, make_randaug, train_image

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class _Batches(torch.utils.data.Dataset):
    """Batch i of one rank's epoch plan, decoded and augmented (one item = one whole batch):
    (images, positions of the entries decoded, [(shard id, position, why) of the skipped ones])."""

    def __init__(self, src: EntryArrays, positions: np.ndarray, batch_size: int, cfg: TransformConfig,
                 seed: int, epoch: int, rank: int):
        self.src, self.positions, self.bs, self.cfg = src, positions, batch_size, cfg
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.files: ShardFiles | None = None
        self.randaug = None

    def __len__(self) -> int:
        return -(-len(self.positions) // self.bs)

    def __getitem__(self, i: int):
        if self.files is None:
            self.files, self.randaug = ShardFiles(self.src.paths), make_randaug(self.cfg)
        src, cfg = self.src, self.cfg
        images, good, bad = [], [], []
        for j, p in enumerate(self.positions[i * self.bs:(i + 1) * self.bs]):
            sample_seed = hash((self.seed, self.epoch, self.rank, i, j)) & 0x7FFFFFFF
            try:
                data = src.check(p, self.files.read(src.shard_id[p], src.offset[p], src.size[p]))
                if cfg.train:  # (RandAugment draws from the sample's rng too)
                    arr = train_image(data, int(src.width[p]), int(src.height[p]), cfg,
                                      random.Random(sample_seed), self.randaug)
                else:
                    arr = eval_images(data, int(src.width[p]), int(src.height[p]), cfg)
            except Exception as e:  # noqa: BLE001 - a bad sample is skipped, never fatal
                bad.append((int(src.shard_id[p]), int(p), f"{type(e).__name__}: {e}"))
                continue
            images.append(arr)
            good.append(p)
        s = cfg.image_size
        if images:
            x = torch.from_numpy(np.stack(images))
        else:
            x = torch.zeros((0, s, s, 3) if cfg.train or cfg.eval_crops == 1 else (0, cfg.eval_crops, s, s, 3),
                            dtype=torch.uint8)
        if x.dim() == 5 and cfg.eval_crops == 1:
            x = x[:, 0]
        x = x.movedim(-1, -3)  # ..., H, W, C -> ..., C, H, W (channels-last memory)
        return x, torch.as_tensor(np.asarray(good, dtype=np.int64)), bad


class TorchLoader(LoaderBase):
    """The torch backend: byte-range reads + PIL decode in DataLoader worker processes."""

    backend = "torch"
    key_read = "thread"  # read beside the entry numbers, joined before the workers fork

    def __init__(self, v: View, *, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2,
                 **common: Any):
        super().__init__(v, **common)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    def __iter__(self) -> Iterator[Batch]:
        self._begin()
        epoch, start = self.epoch, self._batch
        # the epoch plan in shared memory too: workers read only their batches' pages of it
        plan = shared_arrays({"plan": _narrow(self.positions(epoch))})["plan"]
        data = _Batches(self.entries, plan, self.batch_size, self.cfg, self.seed, epoch, self.rank)
        e = self.entries
        keys = e.keys  # (joins the key read): no other thread of ours is alive when the workers fork
        if self.num_workers > 0:
            # the main process's objects leave the collector's reach while workers fork: a worker's
            # collections then never write to (and so copy) the pages it shares with the main process
            gc.collect()
            gc.freeze()
            try:
                it = iter(torch.utils.data.DataLoader(
                    data, batch_size=None, sampler=range(start, len(data)), num_workers=self.num_workers,
                    pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor))
            finally:
                gc.unfreeze()
        else:
            it = (data[i] for i in range(start, len(data)))
        for images, pos, bad in it:
            self._note_bad([(shard, keys[p], why) for shard, p, why in bad])
            self._batch += 1
            p = pos.numpy()
            batch = (images, torch.as_tensor(e.label[p].astype(np.int64)), keys.take(p))
            yield (*batch, torch.as_tensor(e.sample[p].astype(np.int64))) if self.with_index else batch
        self.epoch, self._batch = epoch + 1, 0
