"""The DALI backend: `fn.readers.webdataset` over per-rank, per-epoch `.idx` files.

Each epoch, this rank's share of the view (the same entries as the torch backend, from
`_order`) is written as one `.idx` per shard it touches; DALI reads exactly what an index
lists, repeats included. DALI's shuffle buffer (seeded by (seed, epoch)) mixes samples across
the window of shards it holds. Decoding runs on the GPU (`mixed`) when CUDA is present and on
the CPU (`device_id=None`) otherwise. Loader state records the entries already yielded, so a
restored loader yields exactly the rest; a corrupt sample is found, reported and replaced by a
repeat of a good one, so every rank keeps the same number of batches.

Curriculum quota batches (`quota=`) must hold exactly their planned entries, which a shuffle
buffer would mix: there the encoded bytes of each planned batch are fed to DALI in order with
`fn.external_source` (same decode/augment graph), and state is just the batch index.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..build.tar import format_idx
from ..dataset import is_url
from ..views import View
from .base import LoaderBase, ShardFiles, quota_groups
from .transforms import TransformConfig

log = logging.getLogger("wvdata.stream")
_INFO_LEN = 1024


@contextlib.contextmanager
def _quiet_dali_aliases():
    """DALI's own auto_aug RandAugment calls its deprecated `fn.experimental` aliases (filter,
    equalize), and DALI resets the warning filters around its `warn`, so a filter cannot hide
    them: while our pipeline is built, its deprecation hook skips those aliases (nobody using
    wvdata can act on them). Any other deprecation still warns."""
    from nvidia.dali import ops

    original = ops._handle_op_deprecation

    def hook(schemas, module, display_name):
        if not str(module).endswith(".experimental"):
            original(schemas, module, display_name)

    ops._handle_op_deprecation = hook
    try:
        yield
    finally:
        ops._handle_op_deprecation = original


def _augment(jpg, cfg: TransformConfig, decode_device: str):
    """Encoded JPEGs -> the uint8 CHW batch (train: random crop, RandAugment, flip; eval: crops);
    shared by both readers."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    s = cfg.image_size
    if cfg.train:
        img = fn.decoders.image_random_crop(jpg, device=decode_device, output_type=types.RGB,
                                            random_area=list(cfg.scale),
                                            random_aspect_ratio=[cfg.ratio[0], cfg.ratio[1]])
        img = fn.resize(img, resize_x=s, resize_y=s)
        if cfg.randaug_n > 0:
            img = rand_augment.rand_augment(img, n=cfg.randaug_n, m=cfg.randaug_m)
        mirror = fn.random.coin_flip() if cfg.hflip else 0
        return fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
    img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
    img = fn.resize(img, resize_shorter=int(round(s / cfg.crop_ratio)))
    if cfg.eval_crops == 1:
        return fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", crop=(s, s))
    pos = [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]
    crops = [fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", crop=(s, s),
                                      crop_pos_x=x, crop_pos_y=y, mirror=m)
             for m in ((0, 1) if cfg.eval_crops == 10 else (0,)) for x, y in pos]
    return fn.stack(*crops)


def _build(read, cfg: TransformConfig, batch_size: int, num_threads: int, device_id: int | None, seed: int):
    """A pipeline returning (images, *extra), where `read()` -> (encoded JPEG node, extra outputs)."""
    from nvidia.dali import pipeline_def

    decode_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(enable_conditionals=cfg.train and cfg.randaug_n > 0)
    def pipe():
        jpg, extra = read()
        return (_augment(jpg, cfg, decode_device), *extra)

    with _quiet_dali_aliases():
        return pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=2)


def _pipeline(paths, index_paths, cfg: TransformConfig, batch_size: int, num_threads: int,
              device_id: int | None, shuffle: bool, initial_fill: int, seed: int):
    """DALI's webdataset reader over .idx files; outputs (images, source_info padded to _INFO_LEN)."""
    from nvidia.dali import fn

    def read():
        jpg = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg"],
                                    random_shuffle=shuffle, initial_fill=initial_fill, seed=seed,
                                    missing_component_behavior="error", name="reader")
        return jpg, (fn.pad(fn.get_property(jpg, key="source_info"), axes=(0,), shape=(_INFO_LEN,)),)

    return _build(read, cfg, batch_size, num_threads, device_id, seed)


def _fed_pipeline(source, cfg: TransformConfig, batch_size: int, num_threads: int, device_id: int | None,
                  seed: int):
    """Encoded JPEGs fed batch by batch from `source` (an iterator of lists of uint8 arrays)."""
    from nvidia.dali import fn, types

    def read():
        return fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, name="jpg"), ()

    return _build(read, cfg, batch_size, num_threads, device_id, seed)


class DaliLoader(LoaderBase):
    """Same interface and epoch semantics as TorchLoader, DALI underneath."""

    backend = "dali"

    def __init__(self, v: View, *, num_workers: int, device: str = "auto", device_id: int | None = None,
                 shuffle_buffer: int | None = None, quota: Any = None, **common: Any):
        super().__init__(v, **common)
        if quota is not None:  # fed batch by batch (`_quota_iter`), so quota batches stay exact
            self.quota = quota_groups(v, quota, self.batch_size * self.world_size)
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
        self._tmp = tempfile.mkdtemp(prefix="wvdata-dali-")
        self._checked = not self.verify
        # a missing shard file is found now, not by DALI mid-epoch: its entries are skipped,
        # counted and replaced by repeats of good ones, as the torch backend would skip them
        for sid in np.unique(e.shard_id):
            if not os.path.isfile(e.paths[sid]):
                lost = np.flatnonzero(e.shard_id == sid)
                self._bad |= set(lost.tolist())
                self._note_bad([(int(sid), e.keys[p], "FileNotFoundError: missing shard file") for p in lost])

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def _restart(self) -> None:
        self._consumed = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "consumed": np.asarray(self._consumed, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._consumed = [int(p) for p in state.get("consumed", [])]

    def _write_indexes(self, positions: list[int], tag: str) -> tuple[list[str], list[str], int]:
        """One .idx per shard touched, in order of first appearance, entries in order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for p in positions:
            groups[int(self.entries.shard_id[p])].append(p)
        e = self.entries
        paths, idx = [], []
        for sid, ps in groups.items():
            path = os.path.join(self._tmp, f"{tag}-{sid}.idx")
            with open(path, "w") as f:
                # each entry's .jpg member, from the entry arrays: no shard .idx needed
                f.write(format_idx([f"jpg {e.offset[p]} {e.size[p]} {e.keys[p]}.jpg" for p in ps]))
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

    def _find_bad(self, positions: list[int], decode: bool = True) -> set[int]:
        """Read (and with `decode`, decode at 1/8 scale) entries to find the ones DALI would choke
        on; with verify=True each one's sha1 is compared with the recorded one too."""
        bad = set()
        e = self.entries
        files = ShardFiles(e.paths)
        try:
            for p in dict.fromkeys(positions):
                if p in self._bad:
                    continue
                try:
                    data = e.check(p, files.read(e.shard_id[p], e.offset[p], e.size[p]))
                    if decode:
                        img = Image.open(io.BytesIO(data))
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
        if not self._checked:  # verify=True: every sample's sha1, once per loader, before DALI reads it
            self._bad |= self._find_bad(np.unique(self._canon).tolist(), decode=False)
            self._checked = True
        if self.quota is not None:
            yield from self._quota_iter()
            return
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

    # ------------------------------------------------------------ curriculum quota batches

    def _quota_iter(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Quota batches: batch b holds exactly batch b of `positions(epoch)` (a corrupt entry
        replaced by a repeat of a good one of its batch, of its subset where the batch has one).
        The encoded bytes are fed to DALI batch by batch (`fn.external_source`), so DALI's batches
        follow the plan; labels, keys and sample ids come from the positions fed."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch, total, bs = self.epoch, len(self), self.batch_size
        batches = self.positions(epoch).reshape(total, bs) if total else np.zeros((0, bs), np.int64)
        while self._batch < total:
            fed: deque[np.ndarray] = deque()  # the positions of each batch fed, not yet yielded
            pipe = _fed_pipeline(self._feed(batches, self._batch, fed), self.cfg, bs, self.num_threads,
                                 self.device_id, (hash((self.seed, epoch, self._batch)) & 0x7FFFFFFF))
            it = None
            try:
                it = DALIGenericIterator(pipe, ["images"], auto_reset=False)  # prefetches: may fail too
                for out in it:
                    pos = fed.popleft()
                    self._batch += 1
                    e = self.entries
                    batch = (out[0]["images"], torch.as_tensor(e.label[pos]), [e.keys[p] for p in pos])
                    yield (*batch, torch.as_tensor(e.sample[pos])) if self.with_index else batch
            except RuntimeError as e:  # a corrupt sample: find it among the batches fed, restart there
                newly = self._find_bad([int(self._canon[p]) for ps in fed for p in ps]) - self._bad
                if not newly:
                    raise
                log.debug("DALI error %s; restarting at batch %d without %d bad entries", e, self._batch,
                          len(newly))
                self._bad |= newly
            finally:
                del it, pipe
        self.epoch, self._batch = epoch + 1, 0

    def _feed(self, batches: np.ndarray, start: int, fed: deque) -> Iterator[list[np.ndarray]]:
        """Encoded bytes of batches[start:], in order; records each batch's positions in `fed`.
        An entry that cannot be read is counted and replaced like a known bad one."""
        e = self.entries
        files = ShardFiles(e.paths)
        try:
            for b in range(start, len(batches)):
                while True:
                    ps = self._replace_bad(batches[b])
                    try:
                        data = [np.frombuffer(files.read(e.shard_id[p], e.offset[p], e.size[p]), np.uint8)
                                for p in ps]
                        break
                    except Exception:  # noqa: BLE001 - find which, mark it bad, refill the batch
                        newly = self._find_bad([int(self._canon[p]) for p in ps], decode=False) - self._bad
                        if not newly:
                            raise
                        self._bad |= newly
                fed.append(ps)
                yield data
        finally:
            files.close()

    def _replace_bad(self, batch: np.ndarray) -> np.ndarray:
        """`batch` with each known-bad entry replaced by a good one of the batch, of the same subset
        if it has one (so the quota holds), else of any subset."""
        bad = np.array([int(c) in self._bad for c in self._canon[batch]], dtype=bool)
        if not bad.any():
            return batch
        groups = self.quota[1]
        good = batch[~bad]
        if not len(good):  # a whole batch unreadable: borrow good entries from the rest of the view
            good = np.array([p for p in range(len(self._canon)) if int(self._canon[p]) not in self._bad][:1]
                            or [int(batch[0])], dtype=np.int64)
        out = batch.copy()
        for j in np.flatnonzero(bad):
            same = good[groups[good] == groups[batch[j]]]
            pick = same if len(same) else good
            out[j] = pick[j % len(pick)]
        return out
