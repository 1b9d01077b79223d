"""The stream benchmark's peer loaders, each over the same JPEG bytes as the wvdata dataset and with
the same torchvision v2 pipeline as the webdataset baseline (PIL decode, RandomResizedCrop, flip,
RandAugment(2, 9), float32 normalise):

- LitData 0.2.x: `litdata.optimize` writes the bytes into its chunks (a "bytes" field and an int
  label); `StreamingDataset(dir, shuffle=True, transform=...)` read by `StreamingDataLoader`.
- MosaicML streaming 0.13: `MDSWriter(columns={"jpg": "bytes", "cls": "int"})`;
  `StreamingDataset(local=dir, shuffle=True, batch_size=B)` whose `__getitem__` applies the
  transform (the subclassing its docs show), read by its `StreamingDataLoader`.

Each copy is written once and cached under benchmarks/out/stream-bench/ beside the dataset, in a
forked child process: `litdata.optimize` sets the process-wide multiprocessing start method to
"spawn", which would change how every later DataLoader of the benchmark starts its workers.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Any


def transform(size: int):
    """The baseline's v2 pipeline on PIL images (webdataset's README style)."""
    import torch
    from torchvision.transforms import v2

    from wvdata.stream.transforms import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.RandAugment(2, 9), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class DecodeTransform:
    """{"jpg": bytes, "cls": int} -> (normalised float tensor, label); picklable for workers."""

    def __init__(self, size: int):
        self.size = size
        self._t = None

    def __call__(self, item: dict) -> tuple[Any, int]:
        from PIL import Image

        if self._t is None:
            self._t = transform(self.size)
        with Image.open(io.BytesIO(item["jpg"])) as im:
            img = im.convert("RGB")
        return self._t(img), int(item["cls"])


def samples(ds: Path) -> list[tuple[str, int, int, int]]:
    """(shard path, offset, size, label) of every train entry of the wvdata dataset, in sample order."""
    from wvdata.stream.base import EntryArrays
    from wvdata.views import load_view

    e = EntryArrays.of(load_view(ds, None, "train"))
    return [(e.paths[s], int(o), int(n), int(lab)) for s, o, n, lab in zip(e.shard_id, e.offset, e.size, e.label)]


def read_sample(item: tuple[str, int, int, int]) -> dict:
    """One entry's stored JPEG bytes and its label (what the peers' writers store)."""
    path, offset, size, label = item
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    return {"jpg": data, "cls": label}


def _fresh(out: Path) -> bool:
    """True when `out` holds a complete copy (marked last); else clears it for a rewrite."""
    if (out / ".complete").is_file():
        return True
    shutil.rmtree(out, ignore_errors=True)
    return False


def _in_child(target, *args: Any) -> None:
    child = mp.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{target.__name__} failed (exit status {child.exitcode})")


def _write_litdata(ds: Path, out: Path, workers: int) -> None:
    import litdata

    items = samples(ds)
    litdata.optimize(fn=read_sample, inputs=items, output_dir=str(out), chunk_bytes="64MB",
                     num_workers=workers, reorder_files=False, verbose=False)
    (out / ".complete").write_text(json.dumps({"samples": len(items)}))


def _write_mds(ds: Path, out: Path) -> None:
    from streaming import MDSWriter

    items = samples(ds)
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "cls": "int"}, size_limit=1 << 26) as w:
        for it in items:
            w.write(read_sample(it))
    (out / ".complete").write_text(json.dumps({"samples": len(items)}))


def write_litdata(ds: Path, workers: int) -> Path:
    out = ds.parent / f"litdata-{ds.name}"
    if not _fresh(out):
        print(f"writing {out} with litdata.optimize ...", flush=True)
        _in_child(_write_litdata, ds, out, workers)
    return out


def write_mds(ds: Path) -> Path:
    out = ds.parent / f"mds-{ds.name}"
    if not _fresh(out):
        print(f"writing {out} with streaming.MDSWriter ...", flush=True)
        _in_child(_write_mds, ds, out)
    return out


def litdata_loader(ds: Path, batch: int, size: int, workers: int):
    """LitData's StreamingDataset + StreamingDataLoader over its copy of the dataset."""
    import litdata

    data = litdata.StreamingDataset(str(write_litdata(ds, workers)), shuffle=True, seed=0,
                                    transform=DecodeTransform(size))
    return litdata.StreamingDataLoader(data, batch_size=batch, num_workers=workers)


def _mds_class() -> type:
    """MosaicML's StreamingDataset with the transform in __getitem__ (the subclassing its docs show)."""
    from streaming import StreamingDataset

    class TransformedMDS(StreamingDataset):
        def __init__(self, *a: Any, size: int, **k: Any) -> None:
            super().__init__(*a, **k)
            self.decode = DecodeTransform(size)

        def __getitem__(self, idx: int) -> Any:
            return self.decode(super().__getitem__(idx))

    TransformedMDS.__module__, TransformedMDS.__qualname__ = __name__, "TransformedMDS"
    return TransformedMDS


def __getattr__(name: str) -> Any:
    """TransformedMDS on first use (importing streaming, and with it transformers, only then);
    as a module attribute it pickles, for DataLoader workers started by spawn or forkserver."""
    if name == "TransformedMDS":
        globals()[name] = cls = _mds_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mosaic_loader(ds: Path, batch: int, size: int, workers: int):
    """MosaicML's StreamingDataset (transform in __getitem__) + its StreamingDataLoader."""
    from streaming import StreamingDataLoader
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # left by a killed earlier run, or the new one refuses the folder
    data = __getattr__("TransformedMDS")(local=str(write_mds(ds)), remote=None, shuffle=True, shuffle_seed=0,
                                         batch_size=batch, size=size)
    return StreamingDataLoader(data, batch_size=batch, num_workers=workers)
