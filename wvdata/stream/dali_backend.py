"""The DALI backend: `fn.readers.webdataset` over per-rank, per-epoch `.idx` files.

Each epoch, this rank's share of the view (the same entries as the torch backend, from
`_order`) is written as one `.idx` per shard it touches; DALI reads exactly what an index
lists, repeats included. DALI's shuffle buffer (seeded by (seed, epoch)) mixes samples across
the window of shards it holds. Decoding runs on the GPU (`mixed`) when CUDA is present and on
the CPU (`device_id=None`) otherwise. Loader state records the entries already yielded, so a
restored loader yields exactly the rest; a corrupt sample is found, reported and replaced by a
repeat of a good one, so every rank keeps the same number of batches.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..build.tar import format_idx, parse_idx
from ..dataset import is_url
from ..views import View
from .base import LoaderBase, ShardFiles
from .transforms import TransformConfig

log = logging.getLogger("wvdata.stream")
_INFO_LEN = 1024
# DALI's auto_aug still calls its own deprecated fn.experimental aliases
warnings.filterwarnings("ignore", message=r".*is now deprecated.*", category=DeprecationWarning)


def _pipeline(paths, index_paths, cfg: TransformConfig, batch_size: int, num_threads: int,
              device_id: int | None, shuffle: bool, initial_fill: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    decode_device = "mixed" if device_id is not None else "cpu"
    s = cfg.image_size

    @pipeline_def(enable_conditionals=cfg.train and cfg.randaug_n > 0)
    def pipe():
        jpg = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg"],
                                    random_shuffle=shuffle, initial_fill=initial_fill, seed=seed,
                                    missing_component_behavior="error", name="reader")
        info = fn.pad(fn.get_property(jpg, key="source_info"), axes=(0,), shape=(_INFO_LEN,))
        if cfg.train:
            img = fn.decoders.image_random_crop(jpg, device=decode_device, output_type=types.RGB,
                                                random_area=list(cfg.scale),
                                                random_aspect_ratio=[cfg.ratio[0], cfg.ratio[1]])
            img = fn.resize(img, resize_x=s, resize_y=s)
            if cfg.randaug_n > 0:
                img = rand_augment.rand_augment(img, n=cfg.randaug_n, m=cfg.randaug_m)
            mirror = fn.random.coin_flip() if cfg.hflip else 0
            img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        else:
            img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=int(round(s / cfg.crop_ratio)))
            if cfg.eval_crops == 1:
                img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", crop=(s, s))
            else:
                pos = [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]
                crops = [fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", crop=(s, s),
                                                  crop_pos_x=x, crop_pos_y=y, mirror=m)
                         for m in ((0, 1) if cfg.eval_crops == 10 else (0,)) for x, y in pos]
                img = fn.stack(*crops)
        return img, info

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=2)


class DaliLoader(LoaderBase):
    """Same interface and epoch semantics as TorchLoader, DALI underneath."""

    backend = "dali"

    def __init__(self, v: View, *, num_workers: int, device: str = "auto", device_id: int | None = None,
                 shuffle_buffer: int | None = None, **common: Any):
        super().__init__(v, **common)
        if is_url(v.dataset.root):
            raise ValueError("the dali backend reads local (or mounted) datasets; use backend='torch' "
                             f"for {v.dataset.root}")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("device='gpu' but CUDA is not available")
        if device == "cpu":
            device_id = None  # DALI's CPU-only mode: decode and augment on the CPU
        elif device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        self.device_id, self.num_threads, self.shuffle_buffer = device_id, max(1, num_workers), shuffle_buffer
        self._consumed: list[int] = []
        self._bad: set[int] = set()
        e = self.entries
        self._where = {(int(s), int(o)): i for i, (s, o) in enumerate(zip(e.shard_id, e.offset))}
        # repeats of one sample share one canonical position: consumption is counted per sample
        self._canon = np.array([self._where[(int(s), int(o))] for s, o in zip(e.shard_id, e.offset)],
                               dtype=np.int64)
        self._lines: dict[int, dict[int, str]] | None = None
        self._tmp = tempfile.mkdtemp(prefix="wvdata-dali-")

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def _restart(self) -> None:
        self._consumed = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "consumed": np.asarray(self._consumed, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._consumed = [int(p) for p in state.get("consumed", [])]

    def _idx_lines(self) -> dict[int, list[str]]:
        if self._lines is None:
            self._lines = {}
            for sid, shard in enumerate(self.view.shards):
                with open(self.view.dataset.shard_path(self.view.split, shard, "idx")) as f:
                    parsed = parse_idx(f.read())
                by_offset = {m[0].offset: " ".join(f"{x.ext} {x.offset} {x.size} {x.name}" for x in m
                                                   if x.ext == "jpg") for m in parsed}
                self._lines[sid] = by_offset
        return self._lines

    def _write_indexes(self, positions: list[int], tag: str) -> tuple[list[str], list[str], int]:
        """One .idx per shard touched, in order of first appearance, entries in order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for p in positions:
            groups[int(self.entries.shard_id[p])].append(p)
        lines = self._idx_lines()
        paths, idx = [], []
        for sid, ps in groups.items():
            path = os.path.join(self._tmp, f"{tag}-{sid}.idx")
            with open(path, "w") as f:
                f.write(format_idx([lines[sid][int(self.entries.offset[p])] for p in ps]))
            paths.append(self.entries.paths[sid])
            idx.append(path)
        biggest = max((len(ps) for ps in groups.values()), default=1)
        return paths, idx, max(1, min(len(positions), biggest * self.window))

    def _remaining(self, epoch: int) -> list[int]:
        planned = self._canon[self.positions(epoch)].tolist()
        left = Counter(planned)
        left.subtract(Counter(self._consumed))
        good = [p for p in planned if p not in self._bad] or [0]
        out = []
        for p in planned:
            if left[p] > 0:
                left[p] -= 1
                out.append(p if p not in self._bad else good[len(out) % len(good)])
        return out

    def _find_bad(self, positions: list[int]) -> set[int]:
        """Decode every remaining entry at 1/8 scale to find the ones DALI choked on."""
        bad = set()
        e = self.entries
        files = ShardFiles(e.paths)
        try:
            for p in dict.fromkeys(positions):
                try:
                    img = Image.open(io.BytesIO(files.read(e.shard_id[p], e.offset[p], e.size[p])))
                    img.draft("RGB", (1, 1))
                    img.load()
                except Exception as exc:  # noqa: BLE001
                    bad.add(p)
                    self._note_bad([(int(e.shard_id[p]), e.keys[p], f"{type(exc).__name__}: {exc}")])
        finally:
            files.close()
        return bad

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._begin()
        epoch = self.epoch
        total = len(self)
        while self._batch < total:
            remaining = self._remaining(epoch)
            tag = f"e{epoch}-b{self._batch}-r{self.rank}"
            paths, idx, fill = self._write_indexes(remaining, tag)
            pipe = _pipeline(paths, idx, self.cfg, self.batch_size, self.num_threads, self.device_id,
                             self.shuffle, self.shuffle_buffer or fill,
                             (hash((self.seed, epoch, self._batch)) & 0x7FFFFFFF))
            it = DALIGenericIterator(pipe, ["images", "info"], reader_name="reader", auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.PARTIAL)
            try:
                for out in it:
                    images, info = out[0]["images"], out[0]["info"].cpu().numpy()
                    pos = [self._position(bytes(row).rstrip(b"\0").decode()) for row in info]
                    self._consumed.extend(pos)
                    self._batch += 1
                    e = self.entries
                    batch = (images, torch.as_tensor(e.label[pos]), [e.keys[p] for p in pos])
                    yield (*batch, torch.as_tensor(e.sample[pos])) if self.with_index else batch
            except RuntimeError as e:  # a corrupt sample: find it, replace it, continue
                newly = self._find_bad(remaining) - self._bad
                if not newly:
                    raise
                log.debug("DALI error %s; restarting without %d bad entries", e, len(newly))
                self._bad |= newly
            finally:
                del it, pipe
        self.epoch, self._batch, self._consumed = epoch + 1, 0, []

    def _position(self, source_info: str) -> int:
        path, offset, _ = source_info.rsplit(":", 2)
        return self._where[(self.entries.paths.index(path), int(offset))]
