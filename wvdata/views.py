"""Views: explicit entry lists over the immutable shards of one split (see the README).

A view combines curation tables (dedup, AUM, curriculum, class balance) into the entries a
reader visits; an entry may repeat. It is written as `views/NAME/view.json`, `entries.parquet`
(one row per entry, in reading order) and one DALI `.idx` per shard listing exactly the
view's entries of that shard, repeats included, so DALI reads a view directly: each line is
`jpg OFFSET SIZE N.jpg cls OFFSET SIZE N.cls` (the image and its label; N the sample's place in
its shard), numbers zero-padded to one width, formatted by numpy from the entry columns.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._args import fraction, positive_int
from ._fixed_text import fixed_lines, width
from ._where import safe_filter
from .build.tar import IDX_VERSION, write_atomic
from .dataset import Dataset, check_name, is_url, join, open_dataset, open_file
from .lock import dataset_lock

ENTRY_COLUMNS = ["key", "sample", "label", "shard", "data_offset", "bytes", "width", "height"]
# `sample` is the row of the entry in its split's samples.parquet: a dense id for device-side tables
_ANNOTATIONS = {"dedup": "wvdata dedup", "aum": "wvdata aum", "curriculum": "wvdata curriculum"}


class View:
    """A view's entries (reading order, repeats allowed) over the shards of one split.

    A view read from disk (a named view, or a whole split) loads its polars frame only when
    `entries` is first used: the loader reads just the columns it needs into flat arrays, so a
    16M-entry view never has to sit in the main process as a frame next to them.
    """

    def __init__(self, dataset: Dataset, split: str, name: str | None, entries: pl.DataFrame | None = None,
                 *, length: int | None = None):
        self.dataset, self.split, self.name = dataset, split, name
        self._entries, self._length = entries, length

    def __repr__(self) -> str:
        return f"View({self.dataset.root!r}, {self.split!r}, {self.name!r}, {len(self)} entries)"

    @property
    def entries(self) -> pl.DataFrame:
        """ENTRY_COLUMNS + shard_id, one row per entry (read from disk on first use)."""
        if self._entries is None:
            self._entries = pl.from_arrow(self.table())
        return self._entries

    def __len__(self) -> int:
        if self._entries is not None:
            return self._entries.height
        if self._length is None:
            self._length = self.dataset.shard_starts(self.split)[-1] if self.name is None \
                else int(_read_meta(self.dataset, self.name)["entries"])
        return self._length

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Entry columns as an Arrow table (all of ENTRY_COLUMNS + shard_id by default), from the
        frame when it is loaded, else straight from entries.parquet / samples.parquet."""
        want = list(columns or [*ENTRY_COLUMNS, "shard_id"])
        if self._entries is not None:
            return self._entries.select(want).to_arrow()
        if self.name is not None:
            path = join(self.dataset.root, "views", self.name, "entries.parquet")
            with open_file(path) as f:
                t = pq.read_table(f, columns=want)
            if "shard_id" in want:
                _check_shard_ids(t.column("shard_id"), len(self.dataset.shards(self.split)), path)
            return t
        read = [c for c in want if c not in ("sample", "shard_id")]
        if "shard_id" in want and "shard" not in read:
            read.append("shard")
        with open_file(self.dataset.samples_path(self.split)) as f:  # shard names as a dictionary:
            t = pq.read_table(f, columns=read, read_dictionary=["shard"])  # no string per row decoded
        if "sample" in want:
            t = t.append_column("sample", pa.array(np.arange(t.num_rows, dtype=np.uint32)))
        if "shard_id" in want:
            t = t.append_column("shard_id", self._shard_ids(t.column("shard")))
        if "shard" in want:
            t = t.set_column(t.schema.get_field_index("shard"), "shard", pc.cast(t.column("shard"), pa.string()))
        return t.select(want)

    def _shard_ids(self, shard: pa.ChunkedArray) -> pa.Array:
        """Each row's shard as its index in dataset.json (dictionary-encoded names: one look-up per
        distinct shard, then a gather)."""
        chunks = []
        for chunk in shard.chunks:
            if not pa.types.is_dictionary(chunk.type):
                chunk = chunk.dictionary_encode()
            ids = pc.index_in(chunk.dictionary, value_set=pa.array(self.shards, chunk.dictionary.type))
            if ids.null_count:
                raise ValueError(f"{self.dataset.samples_path(self.split)}: samples in shards that dataset.json "
                                 "does not list")
            chunks.append(pc.take(pc.cast(ids, pa.int32()), chunk.indices))
        return pa.chunked_array(chunks, pa.int32()).combine_chunks()

    @property
    def shards(self) -> list[str]:
        return [s["name"] for s in self.dataset.shards(self.split)]

    def index_paths(self) -> list[str]:
        """The `.idx` per shard that lists this view's entries (the shard's own for a full split)."""
        if self.name is None:
            return [self.dataset.shard_path(self.split, s, "idx") for s in self.shards]
        return [join(self.dataset.root, "views", self.name, f"{s}.idx") for s in self.shards]

    def dali_files(self) -> tuple[list[str], list[str]]:
        """(tar paths, .idx paths) of the shards holding at least one entry: what to give DALI's
        `fn.readers.webdataset(paths=, index_paths=, ext=["jpg", "cls"])` (it refuses an empty index)."""
        counts = np.bincount(self.table(["shard_id"]).column("shard_id").to_numpy(), minlength=len(self.shards))
        used = np.flatnonzero(counts)
        idx = self.index_paths()
        return ([self.dataset.shard_path(self.split, self.shards[k], "tar") for k in used], [idx[k] for k in used])


def _check_shard_ids(ids: pa.ChunkedArray, n_shards: int, path: str) -> None:
    lo, hi = pc.min(ids).as_py(), pc.max(ids).as_py()
    if ids.null_count or (lo is not None and (lo < 0 or hi >= n_shards)):
        raise ValueError(f"{path}: shard_id outside the {n_shards} shards of its split")


def _read_meta(ds: Dataset, name: str) -> dict[str, Any]:
    path = join(ds.root, "views", check_name("view", name), "view.json")
    try:
        with open_file(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"view {name!r} not found ({path}); make it with `wvdata view`") from None


def annotation(ds: Dataset, name: str, split: str) -> pl.DataFrame:
    """The annotation table NAME (dedup, aum, curriculum) for one split; a missing one is an error
    that names the command which makes it."""
    path = ds.annotation_path(name)
    try:
        with open_file(path) as f:
            table = pl.read_parquet(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: run `{_ANNOTATIONS.get(name, 'wvdata ' + name)}` on this dataset "
            "first") from None
    return table.filter(pl.col("split") == split) if "split" in table.columns else table


def _with_annotations(ds: Dataset, split: str, samples: pl.LazyFrame, names: Sequence[str]) -> pl.LazyFrame:
    for name in names:
        table = annotation(ds, name, split)
        have = samples.collect_schema().names()
        extra = [c for c in table.columns if c == "key" or c not in have]
        samples = samples.join(table.select(extra).lazy(), on="key", how="left", maintain_order="left")
    return samples


def balance_per_class(df: pl.DataFrame, n: int, seed: int = 0) -> pl.DataFrame:
    """Exactly n entries per class: without replacement when a class has >= n, else all of
    its samples repeated, topped up by a random draw (the WebVision 2020 class-level balance).

    Vectorised: each row gets a seeded hash of its key; a row of rank r (by that hash) in a class
    of c rows is taken n // c times, plus once more when r < n % c. The draw depends on the
    keys and the seed, not on the row order; rows keep their order, repeats side by side."""
    if df.height == 0:
        return df.clear()
    h = pl.col("key").hash(seed=int(seed) & 0xFFFFFFFFFFFFFFFF)
    plan = df.select(h.rank("ordinal").over("label").alias("r"), pl.len().over("label").alias("c"))
    r = plan["r"].to_numpy().astype(np.int64) - 1
    c = plan["c"].to_numpy().astype(np.int64)
    reps = n // c + (r < n % c)
    return df[np.repeat(np.arange(df.height), reps)]


def select(dataset: str | os.PathLike | Dataset, split: str = "train", *,
           keys: Sequence[str] | pl.Series | pl.DataFrame | None = None,
           drop_duplicates: bool = False, drop_leaks: bool = False,
           drop_aum: float | None = None, aum_below: float | None = None, drop_aum_flagged: bool = False,
           subsets: Sequence[int | None] | None = None, per_class: int | None = None,
           where: str | pl.Expr | None = None, seed: int = 0,
           columns: Sequence[str] | None = None) -> pl.DataFrame:
    """The entries a view would hold (repeats allowed), without writing anything.

    `columns`: only these columns of the result (e.g. ENTRY_COLUMNS); samples.parquet is read
    lazily, so the wide text columns (src_path, meta) are never decoded when not asked for."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    lf = _scan_samples(ds, split).with_row_index("sample")
    needed = []
    if drop_duplicates or drop_leaks:
        needed.append("dedup")
    if drop_aum is not None or aum_below is not None or drop_aum_flagged:
        needed.append("aum")
    if subsets:
        needed.append("curriculum")
    if isinstance(where, str):
        needed += [n for n in _ANNOTATIONS if n not in needed and _exists(ds.annotation_path(n))]
    lf = _with_annotations(ds, split, lf, needed)
    if keys is not None:
        wanted = (keys.select("key") if isinstance(keys, pl.DataFrame)
                  else pl.DataFrame({"key": keys if isinstance(keys, pl.Series) else list(keys)},
                                    schema={"key": pl.String}))
        unknown = wanted.lazy().join(lf.select("key"), on="key", how="anti").collect()
        if unknown.height:
            raise KeyError(f"{unknown.height} keys are not samples of split {split!r}, "
                           f"e.g. {unknown['key'][0]!r}")
        lf = wanted.lazy().join(lf, on="key", how="left", maintain_order="left")
    if drop_duplicates:
        lf = lf.filter(pl.col("keep").fill_null(True))
    if drop_leaks:
        lf = lf.filter(~pl.col("leak").fill_null(False))
    if aum_below is not None:
        lf = lf.filter(pl.col("aum").is_null() | (pl.col("aum") >= aum_below))
    if drop_aum_flagged:
        lf = lf.filter(~pl.col("flagged").fill_null(False))
    if drop_aum is not None:
        if not 0 <= drop_aum < 1:
            raise ValueError(f"drop_aum must be a fraction in [0, 1), got {drop_aum}")
        scored = lf.filter(pl.col("aum").is_not_null()).select("key", "aum").unique("key").collect()
        cut = scored.sort(["aum", "key"]).head(int(round(drop_aum * scored.height)))["key"]
        lf = lf.filter(~pl.col("key").is_in(cut.implode()))
    if subsets:  # samples without a curriculum subset (no features) are kept only when None is listed
        keep = pl.col("subset").is_in([s for s in subsets if s is not None])
        lf = lf.filter(keep | pl.col("subset").is_null() if None in subsets else keep.fill_null(False))
    if where is not None:
        try:
            lf = lf.filter(safe_filter(where, lf.collect_schema().names()) if isinstance(where, str) else where)
        except pl.exceptions.PolarsError as e:
            raise ValueError(f"--where {where!r}: {str(e).strip().splitlines()[0]}") from None
    out = list(columns) if columns is not None else None
    if out is not None:
        lf = lf.select(list(dict.fromkeys([*out, *(["key", "label"] if per_class else [])])))
    try:
        df = lf.collect()
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"--where {where!r}: {str(e).strip().splitlines()[0]}") from None
    if per_class:
        df = balance_per_class(df, per_class, seed)
    return df.select(out) if out is not None else df


def _scan_samples(ds: Dataset, split: str) -> pl.LazyFrame:
    ds.shards(split)  # a checked split name
    path = ds.samples_path(split)
    if is_url(path):
        with open_file(path) as f:
            return pl.read_parquet(f).lazy()
    return pl.scan_parquet(path)


def _exists(path: str) -> bool:
    try:
        with open_file(path):
            return True
    except FileNotFoundError:
        return False


def _entries(ds: Dataset, split: str, df: pl.DataFrame) -> pl.DataFrame:
    """ENTRY_COLUMNS + shard_id. The shard of an entry follows from its `sample` (samples.parquet
    rows are grouped by shard, in manifest order): a binary search per entry instead of a string
    look-up; the `shard` names at both ends of every run of one shard are checked against it."""
    starts = np.asarray(ds.shard_starts(split), np.int64)
    sample = df["sample"].to_numpy()
    if len(sample) and (int(sample.min()) < 0 or int(sample.max()) >= starts[-1]):
        raise ValueError(f"entries name samples outside the {starts[-1]} of split {split!r}")
    if len(sample) > 1 and (np.diff(sample.astype(np.int64)) >= 0).all():  # in sample order: runs per shard
        sid = np.repeat(np.arange(len(starts) - 1, dtype=np.int32), np.diff(np.searchsorted(sample, starts)))
    else:
        sid = (np.searchsorted(starts, sample, side="right") - 1).astype(np.int32)
    ends = np.flatnonzero(np.diff(sid)) if len(sid) else np.zeros(0, np.int64)
    probe = np.unique(np.r_[0, ends, ends + 1, len(sid) - 1]) if len(sid) else ends
    names = np.array([s["name"] for s in ds.shards(split)], dtype=object)
    if not (df["shard"].gather(probe).cast(pl.String).to_numpy() == names[sid[probe]]).all():
        raise ValueError(f"entries whose `shard` is not the shard of their `sample` in split {split!r}")
    return df.select(ENTRY_COLUMNS).with_columns(pl.Series("shard_id", sid))


def memory_view(dataset: str | os.PathLike | Dataset, entries: pl.DataFrame, split: str = "train") -> View:
    """A view held in memory only (e.g. a per-epoch resample), from `select()`'s output."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    return View(ds, split, None, _entries(ds, split, entries))


def write_view(dataset: str | os.PathLike | Dataset, name: str, entries: pl.DataFrame | Sequence[str],
               split: str = "train", options: dict[str, Any] | None = None) -> View:
    """Write a view from any key list or frame with a `key` column (repeats allowed)."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    check_name("view", name)
    df = entries if isinstance(entries, pl.DataFrame) and "sample" in entries.columns \
        else select(ds, split, keys=entries, columns=ENTRY_COLUMNS)
    ent = _in_shard_order(_entries(ds, split, df))
    with dataset_lock(ds.root, f"wvdata view {name}"):
        return _write_view_locked(ds, name, ent, split, options)


def _in_shard_order(ent: pl.DataFrame) -> pl.DataFrame:
    """Entries by (shard_id, data_offset), repeats side by side; a frame already in that order
    (a whole split, most selections) is checked in one pass and not sorted again."""
    sid, off = ent["shard_id"].to_numpy(), ent["data_offset"].to_numpy()
    if len(off) < 2:
        return ent
    if int(off.max()) < 2**40 and int(off.min()) >= 0:
        if (np.diff((sid.astype(np.int64) << 40) | off) >= 0).all():
            return ent
    return ent.sort(["shard_id", "data_offset"], maintain_order=True)


def _view_meta(ent: pl.DataFrame, name: str, split: str, options: dict[str, Any] | None, shards: list[str],
               bounds: np.ndarray) -> str:
    meta = {"name": name, "split": split, "entries": ent.height, "unique": _distinct(ent["sample"].to_numpy()),
            "classes": _distinct(ent["label"].to_numpy()), "options": options or {},
            "shards": [{"name": s, "entries": int(bounds[k + 1] - bounds[k])} for k, s in enumerate(shards)]}
    return json.dumps(meta, indent=2) + "\n"


def _write_view_url(ds: Dataset, name: str, ent: pl.DataFrame, split: str, options: dict[str, Any] | None) -> View:
    """A view in a bucket (no rename): its old view.json goes first (the view disappears), then
    entries.parquet and every shard's .idx are PUT, then view.json last: a view is listed
    complete or not at all."""
    from ._store import Store

    st, base = Store(ds.root), f"views/{name}"
    st.remove(f"{base}/view.json")
    shards = [s["name"] for s in ds.shards(split)]
    bounds = np.searchsorted(ent["shard_id"].to_numpy(), np.arange(len(shards) + 1))
    buf = io.BytesIO()
    ent.write_parquet(buf, compression="zstd", compression_level=1, statistics=False)
    st.write_atomic(f"{base}/entries.parquet", buf.getvalue())
    _write_indexes([st.path(f"{base}/{s}.idx") for s in shards], [ds.shard_path(split, s, "tar") for s in shards],
                   bounds, ds.shard_starts(split), ent)
    st.write_atomic(f"{base}/view.json", _view_meta(ent, name, split, options, shards, bounds))
    return View(ds, split, name, ent)


def _write_view_locked(ds: Dataset, name: str, ent: pl.DataFrame, split: str, options: dict[str, Any] | None) -> View:
    """entries.parquet (in a thread) and the .idx files, each fsynced, under a hidden temporary
    name; then view.json; then one rename: a view appears complete or not at all."""
    if is_url(ds.root):
        return _write_view_url(ds, name, ent, split, options)
    out = os.path.join(ds.root, "views", name)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)  # hidden, unique: no view's name
    shards = [s["name"] for s in ds.shards(split)]
    bounds = np.searchsorted(ent["shard_id"].to_numpy(), np.arange(len(shards) + 1))  # sorted by shard
    try:
        with ThreadPoolExecutor(1) as pool:  # entries.parquet beside the .idx files
            table = pool.submit(_write_parquet, ent, os.path.join(tmp, "entries.parquet"))
            _write_indexes([os.path.join(tmp, f"{s}.idx") for s in shards],
                           [ds.shard_path(split, s, "tar") for s in shards], bounds, ds.shard_starts(split), ent)
            table.result()
        write_atomic(os.path.join(tmp, "view.json"), _view_meta(ent, name, split, options, shards, bounds))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    if os.path.isdir(out):  # move the old one aside first: a view is never half replaced
        old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
        os.replace(out, os.path.join(old, "view"))
        shutil.rmtree(old)
    os.replace(tmp, out)
    _fsync_dir(parent)
    return View(ds, split, name, ent)


_CHUNK_ROWS = 1 << 20  # index lines formatted at a time (~50 MB of text)


def _write_indexes(paths: Sequence[str], tars: Sequence[str], bounds: np.ndarray, starts: Sequence[int],
                   ent: pl.DataFrame) -> None:
    """One .idx per shard: `jpg OFFSET SIZE N.jpg cls OFFSET SIZE N.cls` per entry, N the sample's
    position in its shard (its row in samples.parquet less the shard's first), the same field
    widths in every file. Chunks of shards are formatted by numpy in two threads while eight
    write and fsync the files (concurrent fsyncs share the filesystem's journal commits)."""
    off = ent["data_offset"].to_numpy()
    size = ent["bytes"].to_numpy()
    label = ent["label"].to_numpy()
    # the tar layout every build writes: KEY.jpg then KEY.cls, one 512-byte header per member,
    # data padded to 512 bytes; the .cls holds str(label) (_check_layout checks each shard's tar)
    cls_off = off + (size + 511) // 512 * 512 + 512
    mag = np.abs(label)
    cls_size = (label < 0).astype(np.int64) + 1
    for j in range(1, width(mag) if len(mag) else 1):
        cls_size += mag >= 10 ** j
    keys = ent["key"]
    sid = ent["shard_id"].to_numpy()
    pos = ent["sample"].to_numpy().astype(np.int64) - np.asarray(starts, np.int64)[sid] if len(sid) else sid
    w_off, w_size, w_pos, w_cls = width(cls_off), width(size), width(pos), width(cls_size)
    io = ThreadPoolExecutor(8)
    room = threading.BoundedSemaphore(4)  # chunks of text held at once

    def chunk(k: int, stop: int) -> list[Future]:
        lo, hi = int(bounds[k]), int(bounds[stop])
        for j in range(k, stop):
            if bounds[j + 1] > bounds[j]:
                e = int(bounds[j])
                _check_layout(tars[j], keys[e], int(off[e]), int(cls_off[e]))
        p = pos[lo:hi]
        text = fixed_lines([b"jpg ", (off[lo:hi], w_off), b" ", (size[lo:hi], w_size), b" ", (p, w_pos),
                            b".jpg cls ", (cls_off[lo:hi], w_off), b" ", (cls_size[lo:hi], w_cls), b" ", (p, w_pos),
                            b".cls\n"], hi - lo)
        jobs = [io.submit(_write_synced, paths[j], f"{IDX_VERSION} {bounds[j + 1] - bounds[j]}\n".encode(),
                          text[int(bounds[j]) - lo:int(bounds[j + 1]) - lo]) for j in range(k, stop)]
        jobs[-1].add_done_callback(lambda _: room.release())  # FIFO: the chunk's files are written
        return jobs

    chunks, k = [], 0
    while k < len(paths):  # runs of whole shards, about _CHUNK_ROWS lines each
        stop = k + 1
        while stop < len(paths) and bounds[stop + 1] - bounds[k] <= _CHUNK_ROWS:
            stop += 1
        chunks.append((k, stop))
        k = stop
    try:
        with ThreadPoolExecutor(2) as fmt:
            def held(c: tuple[int, int]) -> list[Future]:
                room.acquire()
                try:
                    return chunk(*c)
                except BaseException:
                    room.release()
                    raise
            for jobs in list(fmt.map(held, chunks)):
                for f in jobs:
                    f.result()
    finally:
        io.shutdown(cancel_futures=True)


def _check_layout(tar: str, key: str, jpg: int, cls: int) -> None:
    """The tar headers of a shard's first entry in the view: NAME.jpg right before its data,
    NAME.cls right after it (the layout `_write_indexes` computes offsets from; whether NAME is
    the key and the .cls the label is `wvdata verify`'s business)."""
    heads = []
    with open_file(tar) as f:  # a local file or a URL (two ranged reads)
        for at in (jpg, cls):
            f.seek(max(at - 512, 0))
            heads.append(f.read(512) if at >= 512 else b"")
    jpg_name, cls_name = (_tar_name(h) for h in heads)
    if not (jpg_name.endswith(b".jpg") and cls_name == jpg_name[:-3] + b"cls"):
        raise ValueError(f"{tar}: {key} is not stored as KEY.jpg then KEY.cls tar members at the offsets "
                         "samples.parquet gives (a shard not written by `wvdata build`?); cannot index a view over it")


def _tar_name(header: bytes) -> bytes:
    name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
    return prefix + b"/" + name if prefix else name


def _write_synced(path: str, head: bytes, body: Any) -> None:
    if is_url(path):  # one PUT: whole or nothing
        from ._store import url_fs

        fs, key = url_fs(path)
        fs.pipe_file(key, bytes(head) + bytes(body))
        return
    with open(path, "wb") as f:
        f.write(head)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def _write_parquet(df: pl.DataFrame, path: str) -> None:
    """entries.parquet, fsynced: zstd level 1 and no statistics (readers read whole columns)
    take half the CPU of the defaults for about the same size."""
    df.write_parquet(path, compression="zstd", compression_level=1, statistics=False)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distinct(a: np.ndarray) -> int:
    """Number of distinct integers: one pass when sorted or of a small range, else polars."""
    if len(a) < 2:
        return len(a)
    d = np.diff(a)
    if (d >= 0).all():
        return 1 + int(np.count_nonzero(d))
    lo, hi = int(a.min()), int(a.max())
    if hi - lo < 1 << 24:
        return int(np.count_nonzero(np.bincount(a - lo)))
    return int(pl.Series(a).n_unique())


def concat_text(arr: pa.Array) -> memoryview:
    """The bytes of a (large) string array's values back to back: with newline-terminated values,
    a whole text file."""
    arr = arr.cast(pa.large_string())
    if len(arr) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(arr.buffers()[1], np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    return memoryview(arr.buffers()[2])[int(offsets[0]):int(offsets[-1])]


def view(dataset: str | os.PathLike | Dataset, name: str, split: str = "train", **options: Any) -> View:
    """Select entries (see `select`) and write them as view NAME."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    df = select(ds, split, columns=ENTRY_COLUMNS, **options)
    return write_view(ds, name, df, split, {k: v for k, v in options.items() if k != "keys"})


def load_view(dataset: str | os.PathLike | Dataset, name: str | None = None, split: str = "train") -> View:
    """A written view by name, or the whole split (every sample once) when name is None; its
    entries are read on first use."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    if name is None:
        ds.shards(split)  # a known split
        return View(ds, split, None)
    meta = _read_meta(ds, name)
    return View(ds, check_name("split", meta["split"]), name, length=int(meta["entries"]))


def add_cli(sub: Any) -> None:
    """Register `wvdata view`."""
    p = sub.add_parser("view", help="write a view: filtered / class-balanced entries of a split",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("name", help="view name: written to DATASET/views/NAME")
    p.add_argument("--split", default="train", help="split the view is over (default: train)")
    p.add_argument("--drop-duplicates", action="store_true", help="keep one image per dedup cluster")
    p.add_argument("--drop-leaks", action="store_true", help="drop train images that leak into val/test")
    p.add_argument("--drop-aum", type=fraction, default=None, metavar="FRACTION",
                   help="drop this fraction of samples with the lowest AUM")
    p.add_argument("--aum-below", type=float, default=None, metavar="VALUE", help="drop AUM < VALUE")
    p.add_argument("--drop-aum-flagged", action="store_true", help="drop the samples `wvdata aum` flagged")
    p.add_argument("--subsets", default=None, help="curriculum subsets to keep, e.g. 1,2 ('none': samples without one)")
    p.add_argument("--per-class", type=positive_int, default=None, metavar="N", help="exactly N entries per class")
    p.add_argument("--where", default=None, help="SQL filter over samples + annotations, "
                   "e.g. \"source = 'flickr' AND width >= 300\"")
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class draw (default: 0)")
    p.set_defaults(func=_cmd_view)


def _cmd_view(args) -> int:
    subsets = [None if s.strip() == "none" else int(s) for s in args.subsets.split(",")] if args.subsets else None
    v = view(args.dataset, args.name, args.split, drop_duplicates=args.drop_duplicates,
             drop_leaks=args.drop_leaks, drop_aum=args.drop_aum, aum_below=args.aum_below,
             drop_aum_flagged=args.drop_aum_flagged,
             subsets=subsets, per_class=args.per_class, where=args.where, seed=args.seed)
    e = v.entries
    print(f"view {args.name}: {e.height} entries ({e['key'].n_unique()} unique samples, "
          f"{e['label'].n_unique()} classes) over {len(v.shards)} shards of {args.split}")
    return 0
