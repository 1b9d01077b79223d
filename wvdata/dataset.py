"""Read side of the dataset directory (see the README): manifest, sample tables, image bytes.

Every later stage (views, stream, dedup, embed, curriculum) opens a dataset through here.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import polars as pl

from ._store import Store, is_url, join

__all__ = ["Dataset", "open_dataset", "open_file", "check_name", "is_url", "join", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "wvdata"
FORMAT_VERSION = 1
# Names read back from dataset files become paths only after matching these (a tampered
# dataset.json, samples.parquet or view.json must not open anything outside the dataset).
_NAME_RULES = {
    "split": (re.compile(r"(train|val|test)"), "train, val or test"),
    "shard": (re.compile(r"shard-[0-9]{6,9}"), "shard-NNNNNN"),
    "view": (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
             "1-64 letters, digits, '_', '-' or '.', not starting with '.' or '-'"),
}


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid split, shard or view name; else a ValueError saying the rule."""
    rule, text = _NAME_RULES[kind]
    if not isinstance(name, str) or not rule.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:77] + "..."
        raise ValueError(f"invalid {kind} name {shown!r}: {kind} names are {text}")
    return name


def open_file(path: str, mode: str = "rb"):
    """Open a local path or an fsspec URL."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path.removeprefix("file://"), mode)


@dataclass
class Dataset:
    """A built dataset directory (local path or fsspec URL)."""

    root: str

    def __post_init__(self) -> None:
        self.root = str(self.root).rstrip("/")

    @cached_property
    def manifest(self) -> dict[str, Any]:
        path = join(self.root, "dataset.json")
        try:
            with open_file(path) as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: {self.root} is not a finished dataset (run `wvdata build`)") from None
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a wvdata dataset manifest")
        return data

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        """Shard records of a split: name, samples, bytes (only complete shards are listed)."""
        self._check_split(split)
        shards = list(self.manifest["splits"][split]["shards"])
        for rec in shards:
            check_name("shard", rec["name"])
        return shards

    def shard_path(self, split: str, shard: str, ext: str = "tar") -> str:
        return join(self.root, check_name("split", split), f"{check_name('shard', shard)}.{ext}")

    def _check_split(self, split: str) -> None:
        check_name("split", split)
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in dataset {self.root} (has {self.splits})")

    def samples(self, split: str | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """samples.parquet of one split, or of all splits concatenated; only `columns` when given
        (at 16M samples the wide text columns, src_path and meta, cost gigabytes)."""
        splits = [split] if split else self.splits
        frames = []
        for s in splits:
            self._check_split(s)
            with open_file(self.samples_path(s)) as f:
                frames.append(pl.read_parquet(f, columns=columns))
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()

    def samples_path(self, split: str) -> str:
        return join(self.root, check_name("split", split), "samples.parquet")

    def shard_starts(self, split: str) -> list[int]:
        """Row of each shard's first sample in samples.parquet (rows are grouped by shard, in
        manifest order, each shard's rows in its tar's order), plus the total at the end."""
        out = [0]
        for rec in self.shards(split):
            out.append(out[-1] + int(rec["samples"]))
        return out

    def errors(self, split: str | None = None) -> pl.DataFrame:
        splits = [split] if split else self.splits
        frames = []
        for s in splits:
            self._check_split(s)
            with open_file(join(self.root, s, "errors.parquet")) as f:
                frames.append(pl.read_parquet(f))
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()

    def annotation_path(self, name: str) -> str:
        return join(self.root, "annotations", f"{name}.parquet")

    def write_annotation(self, name: str, table: pl.DataFrame) -> str:
        """Write annotations/NAME.parquet whole (temporary name + rename on disk, one PUT in a
        bucket), so a reader never sees half a table; return its path."""
        import io

        buf = io.BytesIO()
        table.write_parquet(buf)
        st = Store(self.root)
        st.makedirs("annotations")
        st.write_atomic(f"annotations/{name}.parquet", buf.getvalue())
        return self.annotation_path(name)

    def read_image_bytes(self, split: str, shard: str, data_offset: int, size: int) -> bytes:
        """The stored JPEG of one sample, read by byte range."""
        with open_file(self.shard_path(split, shard)) as f:
            f.seek(data_offset)
            return f.read(size)

    def iter_images(self, split: str) -> Iterator[tuple[str, bytes]]:
        """(key, jpeg bytes) for every sample of a split, each shard read sequentially once."""
        df = self.samples(split, ["key", "shard", "data_offset", "bytes"])
        for (shard,), part in df.group_by("shard", maintain_order=True):
            with open_file(self.shard_path(split, shard)) as f:
                for key, off, size in part.select("key", "data_offset", "bytes").iter_rows():
                    f.seek(off)
                    yield key, f.read(size)


def open_dataset(root: str | os.PathLike) -> Dataset:
    """Open a dataset directory built by `wvdata build`."""
    return Dataset(str(root))
