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

Modules: `base` (entry arrays, shard reader, epoch plan and state shared by both backends),
`_columns` (entry columns read row group by row group into shared memory), `torch_backend`,
`dali_backend` (an epoch in growing segments, one DALI pipeline each), `order` (the epoch
order, torch-free) and `transforms`.

Start-up at 16M entries: only the integer entry columns are decoded before anything else; the
keys (the biggest column) load in a thread meanwhile (torch: joined before the workers fork,
which never touch them; DALI: while the first segment's pipeline is built).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..dataset import Dataset, open_dataset
from ..views import View, load_view
from .base import LoaderBase, LoaderStats, dist_info
from .torch_backend import Batch, TorchLoader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig

__all__ = ["loader", "normalize", "dist_info", "LoaderBase", "LoaderStats", "TorchLoader", "Batch"]


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
        from .dali_backend import DaliLoader

        return DaliLoader(v, **common, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'dali'")
