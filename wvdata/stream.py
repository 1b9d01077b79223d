"""Stream a view into training: one `loader()` for the torch and DALI backends.

Epoch semantics (both backends): every epoch visits every entry of the view exactly once
across all ranks and workers; every rank gets the same number of batches (the order is padded
by repeating entries, or `drop_last`); the order is a pure function of (seed, epoch); and
`state_dict()` taken after k batches restores a loader that yields exactly the rest.
Each `iter()` starts the current epoch from its beginning, except the first one after
`load_state_dict()`; a completed pass moves to the next epoch (or call `set_epoch`).

Batches are `(images, labels, keys)`: images uint8, shape N x 3 x H x W (channels-last memory)
or N x K x 3 x H x W for K eval crops; labels int64; keys a list of str. Normalise on the
device with `normalize()`, which is 4x less host memory traffic than float batches.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from ._order import epoch_order, num_batches, rank_plan
from ._transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig, eval_images, make_randaug, train_image
from .dataset import Dataset, is_url, open_dataset
from .views import View, load_view

log = logging.getLogger("wvdata.stream")
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None,
              dtype: torch.dtype = torch.float32, channels_last: bool = True) -> torch.Tensor:
    """uint8 batch -> normalised float on `device` (do it on the GPU, after the copy)."""
    x = images.to(device, non_blocking=True) if device is not None else images
    shape = (1,) * (x.dim() - 3) + (3, 1, 1)
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(shape) * 255
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(shape) * 255
    x = ((x.float() - m) / s).to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, else torch.distributed's, else RANK/WORLD_SIZE, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class _Source:
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
    def of(cls, v: View) -> "_Source":
        e = v.entries
        return cls([v.dataset.shard_path(v.split, s) for s in v.shards], e["shard_id"].to_numpy(),
                   e["data_offset"].to_numpy(), e["bytes"].to_numpy(), e["width"].to_numpy(),
                   e["height"].to_numpy(), e["label"].to_numpy().astype(np.int64),
                   e["sample"].to_numpy().astype(np.int64), e["key"].to_list())


class _Files:
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


class _Batches(torch.utils.data.Dataset):
    """Batch i of one rank's epoch plan, decoded and augmented (one item = one whole batch)."""

    def __init__(self, src: _Source, positions: np.ndarray, batch_size: int, cfg: TransformConfig,
                 seed: int, epoch: int, rank: int):
        self.src, self.positions, self.bs, self.cfg = src, positions, batch_size, cfg
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.files: _Files | None = None
        self.randaug = None

    def __len__(self) -> int:
        return -(-len(self.positions) // self.bs)

    def __getitem__(self, i: int):
        if self.files is None:
            self.files, self.randaug = _Files(self.src.paths), make_randaug(self.cfg)
        src, cfg = self.src, self.cfg
        images, labels, keys, bad, ids = [], [], [], [], []
        for j, p in enumerate(self.positions[i * self.bs:(i + 1) * self.bs]):
            sample_seed = hash((self.seed, self.epoch, self.rank, i, j)) & 0x7FFFFFFF
            try:
                data = self.files.read(src.shard_id[p], src.offset[p], src.size[p])
                if cfg.train:
                    # RandAugment draws from torch's CPU generator; torch.manual_seed would also
                    # (lazily) seed every accelerator backend, a 0.26 ms/img overhead in workers
                    torch.default_generator.manual_seed(sample_seed)
                    arr = train_image(data, int(src.width[p]), int(src.height[p]), cfg,
                                      random.Random(sample_seed), self.randaug)
                else:
                    arr = eval_images(data, int(src.width[p]), int(src.height[p]), cfg)
            except Exception as e:  # noqa: BLE001 - a bad sample is skipped, never fatal
                bad.append((int(src.shard_id[p]), src.keys[p], f"{type(e).__name__}: {e}"))
                continue
            images.append(arr)
            labels.append(src.label[p])
            keys.append(src.keys[p])
            ids.append(src.sample[p])
        s = cfg.image_size
        if images:
            x = torch.from_numpy(np.stack(images))
        else:
            x = torch.zeros((0, s, s, 3) if cfg.train or cfg.eval_crops == 1 else (0, cfg.eval_crops, s, s, 3),
                            dtype=torch.uint8)
        if x.dim() == 5 and cfg.eval_crops == 1:
            x = x[:, 0]
        x = x.movedim(-1, -3)  # ..., H, W, C -> ..., C, H, W (channels-last memory)
        return (x, torch.as_tensor(np.asarray(labels, dtype=np.int64)), keys, bad,
                torch.as_tensor(np.asarray(ids, dtype=np.int64)))


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
        self._shard_id = v.entries["shard_id"].to_numpy()

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
        order = epoch_order(self._shard_id, self.seed, epoch, self.shuffle, self.window)
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


class TorchLoader(LoaderBase):
    """The torch backend: byte-range reads + PIL decode in DataLoader worker processes."""

    backend = "torch"

    def __init__(self, v: View, *, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2,
                 **common: Any):
        super().__init__(v, **common)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._src = _Source.of(v)

    def __iter__(self) -> Iterator[Batch]:
        self._begin()
        epoch, start = self.epoch, self._batch
        data = _Batches(self._src, self.positions(epoch), self.batch_size, self.cfg, self.seed,
                        epoch, self.rank)
        if self.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                data, batch_size=None, sampler=range(start, len(data)), num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor))
        else:
            it = (data[i] for i in range(start, len(data)))
        for images, labels, keys, bad, ids in it:
            self._note_bad(bad)
            self._batch += 1
            yield (images, labels, keys, ids) if self.with_index else (images, labels, keys)
        self.epoch, self._batch = epoch + 1, 0


def loader(dataset: str | os.PathLike | Dataset, split: str = "train", view: str | View | None = None, *,
           batch_size: int = 256, backend: str = "torch", train: bool = True, image_size: int = 224,
           seed: int = 0, rank: int | None = None, world_size: int | None = None,
           num_workers: int | None = None, drop_last: bool = False, shuffle: bool | None = None,
           window: int = 4, randaug: tuple[int, int] = (2, 9), eval_crops: int = 1,
           scale: tuple[float, float] = (0.08, 1.0), pin_memory: bool | None = None, **kwargs: Any):
    """A loader over a view (or a whole split): iterable, len(), set_epoch, state_dict.

    With `with_index=True` batches carry a fourth item: int64 sample ids (the rows of the
    split's samples.parquet), for device-side per-sample tables such as AUM margins.

    backend "torch" decodes with PIL in DataLoader workers; "dali" runs DALI's webdataset
    reader on the view's .idx files (GPU "mixed" decode when CUDA is present, CPU otherwise).
    """
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    v = view if isinstance(view, View) else load_view(ds, view, split)
    rank, world_size = dist_info(rank, world_size)
    cfg = TransformConfig(train=train, image_size=image_size, scale=tuple(scale), randaug_n=randaug[0],
                          randaug_m=randaug[1], eval_crops=eval_crops)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    common = dict(batch_size=batch_size, train=train, cfg=cfg, seed=seed, rank=rank,
                  world_size=world_size, num_workers=workers, drop_last=drop_last,
                  shuffle=train if shuffle is None else shuffle, window=window)
    if backend == "torch":
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        return TorchLoader(v, pin_memory=pin, **common, **kwargs)
    if backend == "dali":
        from ._dali import DaliLoader

        return DaliLoader(v, **common, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'dali'")
