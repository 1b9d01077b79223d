"""Views: explicit entry lists over the immutable shards of one split (see the README).

A view combines curation tables (dedup, AUM, curriculum, class balance) into the entries a
reader visits; an entry may repeat. It is written as `views/NAME/view.json`, `entries.parquet`
(one row per entry, in reading order) and one DALI `.idx` per shard listing exactly the
view's entries of that shard, repeats included, so DALI reads a view directly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._args import fraction, positive_int
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
    order = {s: i for i, s in enumerate(s["name"] for s in ds.shards(split))}
    return (df.select(ENTRY_COLUMNS)
              .with_columns(pl.col("shard").replace_strict(order, return_dtype=pl.Int32).alias("shard_id")))


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
    ent = _entries(ds, split, df).sort(["shard_id", "data_offset"], maintain_order=True)
    with dataset_lock(ds.root, f"wvdata view {name}"):
        return _write_view_locked(ds, name, ent, split, options)


def _write_view_locked(ds: Dataset, name: str, ent: pl.DataFrame, split: str, options: dict[str, Any] | None) -> View:
    out = os.path.join(ds.root, "views", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=os.path.dirname(out))  # hidden, unique: no view's name
    shards = [s["name"] for s in ds.shards(split)]
    starts = ds.shard_starts(split)
    sid = ent["shard_id"].to_numpy()
    bounds = np.searchsorted(sid, np.arange(len(shards) + 1))  # entries are sorted by shard
    line = ent["sample"].to_numpy().astype(np.int64)
    keys = ent["key"]
    shards_meta, files = [], []
    for k, shard in enumerate(shards):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        body: Any = b""
        if hi > lo:  # the shard's own index lines of these samples (all members: jpg, cls, json)
            body = _index_lines(ds.shard_path(split, shard, "idx"), line[lo:hi] - starts[k],
                                starts[k + 1] - starts[k], keys[lo])
        files.append((os.path.join(tmp, f"{shard}.idx"), f"{IDX_VERSION} {hi - lo}\n".encode(), body))
        shards_meta.append({"name": shard, "entries": hi - lo})
    _write_files(files)
    ent.write_parquet(os.path.join(tmp, "entries.parquet"))
    meta = {"name": name, "split": split, "entries": ent.height, "unique": ent["sample"].n_unique(),
            "classes": ent["label"].n_unique(), "options": options or {}, "shards": shards_meta}
    write_atomic(os.path.join(tmp, "view.json"), json.dumps(meta, indent=2) + "\n")
    if os.path.isdir(out):  # move the old one aside first: a view is never half replaced
        old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "view"))
        shutil.rmtree(old)
    os.replace(tmp, out)
    return View(ds, split, name, ent)


def _index_lines(path: str, rows: np.ndarray, expect: int, first_key: str) -> memoryview:
    """Lines `rows` (0-based, repeats allowed) of a shard's .idx, each with its newline, as one
    buffer: an Arrow take over the file's lines, no Python work per line. The shard's .idx lists
    its samples in samples.parquet order; the count and the first key taken are checked."""
    with open(path, "rb") as f:
        raw = f.read()
    head = raw.find(b"\n") + 1
    ends = np.flatnonzero(np.frombuffer(raw, np.uint8)[head:] == 10) + head + 1
    if len(ends) != expect:
        raise ValueError(f"{path} lists {len(ends)} samples but samples.parquet has {expect} in that shard")
    offsets = np.concatenate([[head], ends]).astype(np.int64)
    lines = pa.LargeStringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(raw))
    text = concat_text(lines.take(pa.array(rows)))
    first = bytes(text[:4096]).split(b"\n", 1)[0].split(b" ", 4)  # ext offset size KEY.ext ...
    if len(first) < 4 or first[3].split(b".", 1)[0].decode() != first_key:
        raise ValueError(f"{path} does not list its samples in samples.parquet order (expected {first_key!r})")
    return text


def concat_text(arr: pa.Array) -> memoryview:
    """The bytes of a (large) string array's values back to back: with newline-terminated values,
    a whole text file."""
    arr = arr.cast(pa.large_string())
    if len(arr) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(arr.buffers()[1], np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    return memoryview(arr.buffers()[2])[int(offsets[0]):int(offsets[-1])]


def _write_files(files: Sequence[tuple[str, bytes, Any]]) -> None:
    """Write (path, head, body) files, then fsync them from a few threads (fsync releases the GIL;
    one by one, thousands of small files take seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    for path, head, body in files:
        with open(path, "wb") as f:
            f.write(head)
            f.write(body)

    def sync(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sync, [p for p, _, _ in files]))


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
