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
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from ._args import fraction, positive_int
from ._where import safe_filter
from .build.tar import format_idx, write_atomic
from .dataset import Dataset, check_name, join, open_dataset, open_file
from .lock import dataset_lock

ENTRY_COLUMNS = ["key", "sample", "label", "shard", "data_offset", "bytes", "width", "height"]
# `sample` is the row of the entry in its split's samples.parquet: a dense id for device-side tables
_ANNOTATIONS = {"dedup": "wvdata dedup", "aum": "wvdata aum", "curriculum": "wvdata curriculum"}


@dataclass
class View:
    """A view's entries (reading order, repeats allowed) over the shards of one split."""

    dataset: Dataset
    split: str
    name: str | None
    entries: pl.DataFrame  # ENTRY_COLUMNS + shard_id

    def __len__(self) -> int:
        return self.entries.height

    @property
    def shards(self) -> list[str]:
        return [s["name"] for s in self.dataset.shards(self.split)]

    def index_paths(self) -> list[str]:
        """The `.idx` per shard that lists this view's entries (the shard's own for a full split)."""
        if self.name is None:
            return [self.dataset.shard_path(self.split, s, "idx") for s in self.shards]
        return [join(self.dataset.root, "views", self.name, f"{s}.idx") for s in self.shards]


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


def _with_annotations(ds: Dataset, split: str, samples: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    for name in names:
        table = annotation(ds, name, split)
        extra = [c for c in table.columns if c == "key" or c not in samples.columns]
        samples = samples.join(table.select(extra), on="key", how="left")
    return samples


def balance_per_class(df: pl.DataFrame, n: int, seed: int = 0) -> pl.DataFrame:
    """Exactly n entries per class: without replacement when a class has >= n, else all of
    its samples repeated, topped up by a random draw (the WebVision 2020 class-level balance)."""
    rng = np.random.default_rng(seed)
    picks = []
    for _, part in df.sort("key").group_by("label", maintain_order=True):
        idx = np.arange(part.height)
        if part.height >= n:
            take = rng.choice(idx, n, replace=False)
        else:
            take = np.concatenate([np.tile(idx, n // part.height),
                                   rng.choice(idx, n % part.height, replace=False)])
        picks.append(part[np.sort(take)])
    return pl.concat(picks) if picks else df.clear()


def select(dataset: str | os.PathLike | Dataset, split: str = "train", *,
           keys: Sequence[str] | pl.Series | pl.DataFrame | None = None,
           drop_duplicates: bool = False, drop_leaks: bool = False,
           drop_aum: float | None = None, aum_below: float | None = None, drop_aum_flagged: bool = False,
           subsets: Sequence[int | None] | None = None, per_class: int | None = None,
           where: str | pl.Expr | None = None, seed: int = 0) -> pl.DataFrame:
    """The entries a view would hold (repeats allowed), without writing anything."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    samples = ds.samples(split).with_row_index("sample")
    needed = []
    if drop_duplicates or drop_leaks:
        needed.append("dedup")
    if drop_aum is not None or aum_below is not None or drop_aum_flagged:
        needed.append("aum")
    if subsets:
        needed.append("curriculum")
    if isinstance(where, str):
        needed += [n for n in _ANNOTATIONS if n not in needed and _exists(ds.annotation_path(n))]
    df = _with_annotations(ds, split, samples, needed)
    if keys is not None:
        wanted = keys.select("key") if isinstance(keys, pl.DataFrame) else pl.DataFrame({"key": list(keys)})
        unknown = wanted.join(df, on="key", how="anti")
        if unknown.height:
            raise KeyError(f"{unknown.height} keys are not samples of split {split!r}, "
                           f"e.g. {unknown['key'][0]!r}")
        df = wanted.join(df, on="key", how="left", maintain_order="left")
    if drop_duplicates:
        df = df.filter(pl.col("keep").fill_null(True))
    if drop_leaks:
        df = df.filter(~pl.col("leak").fill_null(False))
    if aum_below is not None:
        df = df.filter(pl.col("aum").is_null() | (pl.col("aum") >= aum_below))
    if drop_aum_flagged:
        df = df.filter(~pl.col("flagged").fill_null(False))
    if drop_aum is not None:
        if not 0 <= drop_aum < 1:
            raise ValueError(f"drop_aum must be a fraction in [0, 1), got {drop_aum}")
        scored = df.filter(pl.col("aum").is_not_null()).unique("key")
        cut = scored.sort(["aum", "key"]).head(int(round(drop_aum * scored.height)))["key"]
        df = df.filter(~pl.col("key").is_in(cut.implode()))
    if subsets:  # samples without a curriculum subset (no features) are kept only when None is listed
        keep = pl.col("subset").is_in([s for s in subsets if s is not None])
        df = df.filter(keep | pl.col("subset").is_null() if None in subsets else keep.fill_null(False))
    if where is not None:
        try:
            df = df.filter(safe_filter(where, df.columns) if isinstance(where, str) else where)
        except pl.exceptions.PolarsError as e:
            raise ValueError(f"--where {where!r}: {str(e).strip().splitlines()[0]}") from None
    if per_class:
        df = balance_per_class(df, per_class, seed)
    return df


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
        else select(ds, split, keys=entries)
    ent = _entries(ds, split, df).sort(["shard_id", "data_offset"], maintain_order=True)
    with dataset_lock(ds.root, f"wvdata view {name}"):
        return _write_view_locked(ds, name, ent, split, options)


def _write_view_locked(ds: Dataset, name: str, ent: pl.DataFrame, split: str, options: dict[str, Any] | None) -> View:
    out = os.path.join(ds.root, "views", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=os.path.dirname(out))  # hidden, unique: no view's name
    lines_by_key = {}
    shards_meta = []
    for shard_id, shard in enumerate(s["name"] for s in ds.shards(split)):
        part = ent.filter(pl.col("shard_id") == shard_id)
        if part.height:
            with open(ds.shard_path(split, shard, "idx")) as f:
                lines_by_key = {line.split(" ", 4)[3].split(".", 1)[0]: line
                                for line in f.read().splitlines()[1:]}
        write_atomic(os.path.join(tmp, f"{shard}.idx"), format_idx([lines_by_key[k] for k in part["key"]]))
        shards_meta.append({"name": shard, "entries": part.height})
    ent.write_parquet(os.path.join(tmp, "entries.parquet"))
    meta = {"name": name, "split": split, "entries": ent.height, "unique": ent["key"].n_unique(),
            "classes": ent["label"].n_unique(), "options": options or {}, "shards": shards_meta}
    write_atomic(os.path.join(tmp, "view.json"), json.dumps(meta, indent=2) + "\n")
    if os.path.isdir(out):  # move the old one aside first: a view is never half replaced
        old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "view"))
        shutil.rmtree(old)
    os.replace(tmp, out)
    return View(ds, split, name, ent)


def view(dataset: str | os.PathLike | Dataset, name: str, split: str = "train", **options: Any) -> View:
    """Select entries (see `select`) and write them as view NAME."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    df = select(ds, split, **options)
    return write_view(ds, name, df, split, {k: v for k, v in options.items() if k != "keys"})


def load_view(dataset: str | os.PathLike | Dataset, name: str | None = None, split: str = "train") -> View:
    """A written view by name, or the whole split (every sample once) when name is None."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    if name is None:
        return View(ds, split, None, _entries(ds, split, ds.samples(split).with_row_index("sample")))
    path = join(ds.root, "views", check_name("view", name), "view.json")
    try:
        with open_file(path) as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"view {name!r} not found ({path}); make it with `wvdata view`") from None
    with open_file(join(ds.root, "views", name, "entries.parquet")) as f:
        entries = pl.read_parquet(f)
    return View(ds, check_name("split", meta["split"]), name, entries)


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
