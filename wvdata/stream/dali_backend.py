"""The DALI backend: `fn.readers.webdataset` over per-rank, per-epoch `.idx` files.

Each epoch, this rank's share of the view (the same entries as the torch backend, from
`order`) is read in segments: consecutive runs of whole batches of the plan, the first about
one shard window of entries and each next one GROWTH (4) times bigger (16M entries on one rank:
6 segments). A segment is one DALI pipeline over one `.idx` per shard it touches, written when
the segment starts and removed when it ends (formatted with Arrow string kernels, no Python work
per entry); DALI reads exactly what an index lists, repeats included. The first batch so waits
for one window's index lines, not the epoch's (DALI parses ~1.5 us per line when it builds a
reader: 24 s for 16M), and the next segment's pipeline is written, defined and built in a
thread while the current one runs, so the switch does not stall either. DALI's shuffle buffer
(seeded by (seed, epoch, segment)) mixes samples across the window of shards it holds.
Decoding runs on the GPU (`mixed`) when CUDA is present and on the CPU (`device_id=None`)
otherwise. The keys load in a thread while the epoch is planned and the first pipeline built.
A dataset at an s3:// URL is read by DALI's own S3 client (the same `AWS_*` environment) from
the tar URLs, with the index files local as always; other URL schemes need the torch backend.

Pipelines are built with DALI's checkpointing: loader state carries the segment and the DALI
checkpoint of the last batch yielded, and a restored loader rebuilds that segment from it and
continues in exactly the order of the uninterrupted epoch. A corrupt sample is found, reported
and replaced by a repeat of a good one, so every rank keeps the same number of batches; the
rest of that epoch is then read from a fresh pipeline over the entries not yet yielded (state
records them), in a fresh order.

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
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..build.tar import IDX_VERSION
from ..dataset import is_url
from ..views import View, concat_text
from .base import LoaderBase, ShardFiles, _Deferred, quota_groups
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


def _build(read, cfg: TransformConfig, batch_size: int, num_threads: int, device_id: int | None, seed: int,
           checkpointing: bool = False, checkpoint: bytes | str | None = None):
    """A pipeline returning (images, *extra), where `read()` -> (encoded JPEG node, extra outputs);
    with `checkpointing`, restorable, and restored from `checkpoint` when given."""
    from nvidia.dali import pipeline_def

    decode_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(enable_conditionals=cfg.train and cfg.randaug_n > 0)
    def pipe():
        jpg, extra = read()
        return (_augment(jpg, cfg, decode_device), *extra)

    with _quiet_dali_aliases():
        return pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=2, enable_checkpointing=checkpointing, checkpoint=checkpoint)


def _pipeline(paths, index_paths, cfg: TransformConfig, batch_size: int, num_threads: int,
              device_id: int | None, shuffle: bool, initial_fill: int, seed: int,
              checkpoint: bytes | str | None = None):
    """DALI's webdataset reader over .idx files; outputs (images, source_info padded to _INFO_LEN)."""
    from nvidia.dali import fn

    def read():
        jpg = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg"],
                                    random_shuffle=shuffle, initial_fill=initial_fill, seed=seed,
                                    missing_component_behavior="error", name="reader")
        return jpg, (fn.pad(fn.get_property(jpg, key="source_info"), axes=(0,), shape=(_INFO_LEN,)),)

    return _build(read, cfg, batch_size, num_threads, device_id, seed, True, checkpoint)


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
    key_read = "thread"  # the keys load while the epoch is planned and the pipeline built
    GROWTH = 4  # each segment of an epoch this many times the previous one

    def __init__(self, v: View, *, num_workers: int, device: str = "auto", device_id: int | None = None,
                 shuffle_buffer: int | None = None, quota: Any = None, **common: Any):
        super().__init__(v, **common)
        if quota is not None:  # fed batch by batch (`_quota_iter`), so quota batches stay exact
            self.quota = quota_groups(v, quota, self.batch_size * self.world_size)
        if is_url(v.dataset.root) and not v.dataset.root.startswith("s3://"):
            raise ValueError("the dali backend reads local (or mounted) datasets and s3:// URLs (its "
                             f"reader's own S3 client); use backend='torch' for {v.dataset.root}")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("device='gpu' but CUDA is not available")
        if device == "cpu":
            device_id = None  # DALI's CPU-only mode: decode and augment on the CPU
        elif device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        self.device_id, self.num_threads, self.shuffle_buffer = device_id, max(1, num_workers), shuffle_buffer
        e = self.entries
        # DALI reports a sample as (shard path, offset): sorted codes find its position; repeats of
        # one sample share one canonical position (its first), so consumption is counted per sample
        code = (e.shard_id.astype(np.int64) << 40) | e.offset.astype(np.int64)
        if len(code) and (code[1:] >= code[:-1]).all():  # in shard order (a split, a written view): no sort
            new = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
            self._codes, self._first = code[new], new.astype(np.int64)
            self._canon = np.repeat(self._first, np.diff(np.r_[new, len(code)]))
        else:
            self._codes, first, inverse = np.unique(code, return_index=True, return_inverse=True)
            self._first = first.astype(np.int64)
            self._canon = self._first[inverse.reshape(-1)]
        self._path_id = {p: i for i, p in enumerate(e.paths)}
        self._bad = np.zeros(len(e), dtype=bool)  # by canonical position
        self._consumed: list[np.ndarray] = []
        self._it: Any = None  # the live DALI iterator of an exactly planned segment
        self._seg: int | None = None  # ... and its segment
        self._restore: tuple[int, bytes | str] | None = None  # (segment, DALI checkpoint) to continue from
        counts = np.bincount(e.shard_id, minlength=len(e.paths))
        self._window_entries = int(counts.max(initial=1)) * max(1, self.window)
        self._tmp = tempfile.mkdtemp(prefix="wvdata-dali-")
        self._checked = not self.verify
        # a missing shard file is found now, not by DALI mid-epoch: its entries are skipped,
        # counted and replaced by repeats of good ones, as the torch backend would skip them
        for sid in np.flatnonzero(counts) if not is_url(v.dataset.root) else []:  # (a bucket: DALI reports it)
            if not os.path.isfile(e.paths[sid]):
                lost = np.flatnonzero(e.shard_id == sid)
                self._bad[lost] = True
                self._note_bad([(int(sid), e.keys[p], "FileNotFoundError: missing shard file") for p in lost])

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def _restart(self) -> None:
        self._consumed, self._it, self._seg, self._restore = [], None, None, None

    def state_dict(self) -> dict[str, Any]:
        """Base state + the entries yielded this epoch + the segment and DALI checkpoint after the
        last batch yielded (None at an epoch's start, or once a corrupt sample forced a fresh
        pipeline)."""
        seg, dali = self._restore if self._restore is not None else (None, None)
        if self._it is not None and self._batch:
            seg, dali = self._seg, self._it.checkpoints()[0]
        consumed = np.concatenate(self._consumed) if self._consumed else np.zeros(0, np.int64)
        return {**super().state_dict(), "consumed": consumed.astype(np.int64), "dali": dali, "segment": seg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._it = self._seg = None
        self._consumed = [np.asarray(state.get("consumed", []), dtype=np.int64)]
        # a checkpoint without its segment (taken before epochs were segmented) is not used
        has = state.get("dali") is not None and state.get("segment") is not None
        self._restore = (int(state["segment"]), state["dali"]) if has else None

    def segments(self, total: int | None = None) -> np.ndarray:
        """Batch boundaries of an epoch's segments, one DALI pipeline (and set of index files)
        each: the first about one shard window of entries, so the first batch waits for few
        index lines (DALI parses ~1.5 us per line when it builds a reader: 24 s for 16M), then
        each GROWTH times the previous, so an epoch has few of them (16M entries: 6)."""
        total = len(self) if total is None else total
        bounds, size = [0], max(1, -(-self._window_entries // self.batch_size))
        while bounds[-1] < total:
            bounds.append(min(total, bounds[-1] + size))
            size *= self.GROWTH
        return np.asarray(bounds, np.int64)

    def _plan(self, epoch: int) -> np.ndarray:
        """This rank's canonical positions for `epoch`, known-bad ones replaced by good ones."""
        planned = self._canon[self.positions(epoch)]
        bad = self._bad[planned]
        if bad.any():
            good = planned[~bad] if (~bad).any() else np.zeros(1, np.int64)
            planned = planned.copy()
            planned[bad] = good[np.flatnonzero(bad) % len(good)]
        return planned

    def _remaining(self, epoch: int) -> np.ndarray:
        """The plan minus the entries already yielded (as multisets), in plan order."""
        planned = self._plan(epoch)
        consumed = np.concatenate(self._consumed) if self._consumed else np.zeros(0, np.int64)
        if not len(consumed):
            return planned
        done = np.bincount(consumed, minlength=len(self._canon))
        order = np.argsort(planned, kind="stable")
        ranked = planned[order]
        run_start = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        occurrence = np.empty(len(planned), np.int64)
        occurrence[order] = np.arange(len(planned)) - np.repeat(run_start, np.diff(np.r_[run_start, len(planned)]))
        return planned[occurrence >= done[planned]]

    def _write_indexes(self, positions: np.ndarray, tag: str) -> tuple[list[str], list[str], int]:
        """One .idx per shard touched, in order of first appearance, entries in order; the lines
        (`jpg OFFSET SIZE N.jpg`, N the line number: entries are known by (shard, offset), so the
        names only need to differ) formatted by Arrow kernels over the whole plan at once."""
        e = self.entries
        sid = e.shard_id[positions]
        by_shard = np.argsort(sid, kind="stable")  # one (radix) sort: plan order within each shard
        ranked = sid[by_shard]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if len(sid) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(sid)]
        runs = np.argsort(by_shard[starts], kind="stable")  # shards in order of first appearance
        starts, ends = starts[runs], ends[runs]
        sizes = ends - starts
        grouped = positions[by_shard[np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes)
                                     + np.arange(len(sid))]]
        bounds = np.r_[0, np.cumsum(sizes)]
        text, line_at = _idx_text(e, grouped, np.arange(len(grouped)) - np.repeat(bounds[:-1], sizes))
        paths, idx = [], []
        for k, s in enumerate(ranked[starts]):
            path = os.path.join(self._tmp, f"{tag}-{s}.idx")
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            with open(path, "wb") as f:
                f.write(f"{IDX_VERSION} {hi - lo}\n".encode())
                f.write(text[line_at[lo] - line_at[0]:line_at[hi] - line_at[0]])
            paths.append(e.paths[s])
            idx.append(path)
        biggest = int(sizes.max()) if len(sizes) else 1
        return paths, idx, max(1, min(len(positions), biggest * self.window))

    def _find_bad(self, positions: list[int], decode: bool = True) -> set[int]:
        """Read (and with `decode`, decode at 1/8 scale) entries to find the ones DALI would choke
        on; with verify=True each one's sha1 is compared with the recorded one too."""
        bad = set()
        e = self.entries
        files = ShardFiles(e.paths)
        try:
            for p in dict.fromkeys(positions):
                if self._bad[p]:
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

    def _mark_bad(self, found: set[int]) -> set[int]:
        """Record `found` as bad; return the ones that were not known before."""
        newly = {p for p in found if not self._bad[p]}
        self._bad[list(newly)] = True
        return newly

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self._begin()
        if not self._checked:  # verify=True: every sample's sha1, once per loader, before DALI reads it
            self._mark_bad(self._find_bad(np.unique(self._canon).tolist(), decode=False))
            self._checked = True
        if self.quota is not None:
            yield from self._quota_iter()
            return
        epoch, total, bs = self.epoch, len(self), self.batch_size
        restore, self._restore = self._restore, None
        bounds, plan = self.segments(total), None
        exact = self._batch == 0 or restore is not None
        ahead: tuple[int, _Deferred] | None = None  # (segment, its pipeline being built in a thread)
        try:
            while self._batch < total:
                # exact: the segment holding the next batch, from its start or from the restored DALI
                # checkpoint; after a corrupt sample or from a state without a checkpoint, one
                # pipeline over the entries not yielded yet
                got = None
                if ahead is not None:
                    got = (ahead[0], _result(ahead[1]))
                    ahead = None
                if exact:
                    seg = int(np.searchsorted(bounds, self._batch, side="right")) - 1
                    checkpoint = restore[1] if restore is not None and restore[0] == seg else None
                    if checkpoint is None and self._batch != bounds[seg]:
                        exact = False  # mid-segment without its checkpoint
                        _drop(got)
                        continue
                    plan = self._plan(epoch) if plan is None else plan
                    todo = plan[bounds[seg] * bs:bounds[seg + 1] * bs]
                    if got is not None and got[0] == seg and got[1] is not None and checkpoint is None:
                        pipe, idx = got[1]
                    else:
                        _drop(got)
                        pipe, idx = self._segment(todo, epoch, seg, checkpoint)
                else:
                    _drop(got)
                    seg, todo = None, self._remaining(epoch)
                    if not len(todo):
                        break
                    pipe, idx = self._segment(todo, epoch, -1 - self._batch, None)
                restore = None
                it = self._iterator(pipe)  # builds (unless built ahead) and prefetches
                self._it, self._seg = (it, seg) if exact else (None, None)
                if exact and seg + 2 < len(bounds):  # the next segment's pipeline, built meanwhile
                    nxt = plan[bounds[seg + 1] * bs:bounds[seg + 2] * bs]
                    job = _Deferred(lambda n=seg + 1, t=nxt: self._segment(t, epoch, n, None, True))
                    ahead = (seg + 1, job.start("wvdata-dali-ahead"))
                try:
                    for out in it:
                        images, info = out[0]["images"], out[0]["info"].cpu().numpy()
                        pos = self._positions(info)
                        self._consumed.append(pos)
                        self._batch += 1
                        e = self.entries
                        batch = (images, torch.as_tensor(e.label[pos].astype(np.int64)), e.keys.take(pos))
                        yield (*batch, torch.as_tensor(e.sample[pos].astype(np.int64))) if self.with_index else batch
                except RuntimeError as err:  # a corrupt sample: find it, replace it, continue
                    # (an exact pipeline reads its segment only: the culprit is among those entries)
                    newly = self._mark_bad(self._find_bad((todo if exact else self._remaining(epoch)).tolist()))
                    if not newly:
                        raise
                    log.debug("DALI error %s; restarting without %d bad entries", err, len(newly))
                    exact, self._it, self._seg = False, None, None
                else:
                    if exact and self._batch < bounds[seg + 1]:  # (never expected) a short segment
                        exact = False
                    elif not exact:
                        break
                finally:
                    del it
                    _remove_files(idx)
                    del pipe
        finally:
            if ahead is not None:
                _drop((ahead[0], _result(ahead[1])))
        self.epoch, self._batch, self._consumed, self._it, self._seg = epoch + 1, 0, [], None, None

    def _segment(self, todo: np.ndarray, epoch: int, key: int, checkpoint, build: bool = False):
        """(pipeline, index files) over `todo`, seeded by (seed, epoch, key); with `build`, built
        (DALI parses the index then: done in a thread for the segment after the current one)."""
        paths, idx, fill = self._write_indexes(todo, f"e{epoch}-k{key}-r{self.rank}")
        pipe = _pipeline(paths, idx, self.cfg, self.batch_size, self.num_threads, self.device_id, self.shuffle,
                         self.shuffle_buffer or fill, hash((self.seed, epoch, key)) & 0x7FFFFFFF, checkpoint)
        if build:
            pipe.build()
        return pipe, idx

    def _iterator(self, pipe):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        return DALIGenericIterator(pipe, ["images", "info"], reader_name="reader", auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.PARTIAL)

    def _positions(self, info: np.ndarray) -> np.ndarray:
        """Canonical positions of a batch from DALI's source_info rows (`path:offset:...`)."""
        codes = np.empty(len(info), np.int64)
        for i, row in enumerate(info):
            path, offset, _ = bytes(row).rstrip(b"\0").decode().rsplit(":", 2)
            codes[i] = (self._path_id[path] << 40) | int(offset)
        return self._first[np.searchsorted(self._codes, codes)]

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
                    batch = (out[0]["images"], torch.as_tensor(e.label[pos].astype(np.int64)), e.keys.take(pos))
                    yield (*batch, torch.as_tensor(e.sample[pos].astype(np.int64))) if self.with_index else batch
            except RuntimeError as e:  # a corrupt sample: find it among the batches fed, restart there
                newly = self._mark_bad(self._find_bad([int(self._canon[p]) for ps in fed for p in ps]))
                if not newly:
                    raise
                log.debug("DALI error %s; restarting at batch %d without %d bad entries", e, self._batch,
                          len(newly))
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
                        if not self._mark_bad(self._find_bad([int(self._canon[p]) for p in ps], decode=False)):
                            raise
                fed.append(ps)
                yield data
        finally:
            files.close()

    def _replace_bad(self, batch: np.ndarray) -> np.ndarray:
        """`batch` with each known-bad entry replaced by a good one of the batch, of the same subset
        if it has one (so the quota holds), else of any subset."""
        bad = self._bad[self._canon[batch]]
        if not bad.any():
            return batch
        groups = self.quota[1]
        good = batch[~bad]
        if not len(good):  # a whole batch unreadable: borrow good entries from the rest of the view
            good = np.flatnonzero(~self._bad[self._canon])[:1]
            if not len(good):
                good = batch[:1]
        out = batch.copy()
        for j in np.flatnonzero(bad):
            same = good[groups[good] == groups[batch[j]]]
            pick = same if len(same) else good
            out[j] = pick[j % len(pick)]
        return out


def _result(job: _Deferred):
    """A pipeline built ahead, or None where building it failed (it is then built again in line,
    where the error surfaces)."""
    try:
        return job.result()
    except Exception:  # noqa: BLE001
        return None


def _drop(got) -> None:
    """Forget a (segment, (pipeline, index files)) pair: the files go."""
    if got is not None and got[1] is not None:
        _remove_files(got[1][1])


def _remove_files(paths) -> None:
    """A finished pipeline's index files (16M entries: ~0.4 GB an epoch)."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def _idx_text(e, positions: np.ndarray, names: np.ndarray) -> tuple[memoryview, np.ndarray]:
    """`jpg OFFSET SIZE NAME.jpg` lines of `positions`, newline-terminated, back to back, and the
    byte offset of each line's start (plus the end): Arrow string kernels, no loop per entry.
    Arrow values are made from buffers: pyarrow's conversions of Python or numpy values
    (`pa.array`, `pa.scalar`) import pandas, 2-3 s of a first batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lt = pa.large_string()

    def text(a: np.ndarray):
        a = np.ascontiguousarray(a, dtype=np.int64)
        return pc.cast(pa.Array.from_buffers(pa.int64(), len(a), [None, pa.py_buffer(a)]), lt)

    def lit(s: str):
        b = s.encode()
        return pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(b)], np.int64)), pa.py_buffer(b))[0]

    lines = pc.binary_join_element_wise(
        lit("jpg"), text(e.offset[positions]), text(e.size[positions]),
        pc.binary_join_element_wise(text(names), lit(".jpg\n"), lit("")), lit(" "))
    lines = lines.cast(lt)
    offsets = np.frombuffer(lines.buffers()[1], np.int64, count=len(lines) + 1, offset=lines.offset * 8)
    return concat_text(lines), offsets
