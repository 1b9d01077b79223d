"""Helpers for the `wvdata build` tests: small real inputs and checks of a built dataset.

Input images come from `wvdata.synth` (crops of scikit-image's bundled photographs, encoded in
whatever format a test needs; nothing is downloaded), re-exported here for the tests.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from wvdata import build
from wvdata.build.tar import parse_idx
from wvdata.synth import crop, encode, exif_jpeg, photo  # noqa: F401  (the tests import them from here)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def decode(data: bytes) -> np.ndarray:
    """Decode stored image bytes to HxWx3 int (for pixel comparisons)."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG", im.format
        assert im.mode == "RGB", im.mode
        return np.asarray(im).astype(np.int64)


def quiet_build(src, out, **kw):
    """`wvdata.build` with the test defaults: one worker, no progress bar."""
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return build(src, out, **kw)


def tree(root: str | os.PathLike) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a, b) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb), (f"only in {a}: {sorted(set(ta) - set(tb))}",
                                      f"only in {b}: {sorted(set(tb) - set(ta))}")
    differ = [name for name in ta if ta[name] != tb[name]]
    assert not differ, f"files differ: {differ}"


def manifest(root) -> dict:
    return json.loads((Path(root) / "dataset.json").read_text())


def samples(root, split: str | None = None) -> pl.DataFrame:
    splits = [split] if split else list(manifest(root)["splits"])
    return pl.concat([pl.read_parquet(Path(root) / s / "samples.parquet") for s in splits])


def errors(root, split: str | None = None) -> pl.DataFrame:
    splits = [split] if split else list(manifest(root)["splits"])
    return pl.concat([pl.read_parquet(Path(root) / s / "errors.parquet") for s in splits])


def tar_members(path) -> list[tuple[str, int, int, bytes]]:
    """(name, data offset, size, data) of every member of a tar, read with tarfile."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf:
            assert m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0, m
            out.append((m.name, m.offset_data, m.size, tf.extractfile(m).read()))
    return out


def stored_image(root, row: dict) -> bytes:
    """The stored JPEG of one samples.parquet row, read by its byte range."""
    with open(Path(root) / row["split"] / f"{row['shard']}.tar", "rb") as f:
        f.seek(row["data_offset"])
        return f.read(row["bytes"])


def key_json(root, row: dict) -> dict:
    """The KEY.json of one samples.parquet row, read from its shard."""
    for name, _, _, data in tar_members(Path(root) / row["split"] / f"{row['shard']}.tar"):
        if name == f"{row['key']}.json":
            return json.loads(data)
    raise AssertionError(f"{row['key']}.json not in {row['shard']}")


def check_dataset(root) -> dict[str, pl.DataFrame]:
    """Invariants every built dataset must hold; returns samples.parquet per split.

    dataset.json lists exactly the shard files on disk with their sample counts and sizes;
    every sample's tar members are KEY.jpg / KEY.cls / KEY.json in that order; the .idx
    lists exactly those members with their data offsets and sizes; the stored JPEG has the
    recorded sha1, width and height; .cls is the label; keys are unique and dot-free;
    nothing of the build's work area is left behind.
    """
    root = Path(root)
    man = manifest(root)
    assert man["format"] == "wvdata" and man["version"] == 1
    classes = man["classes"]
    assert not (root / ".build").exists()
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    all_keys: list[str] = []
    out = {}
    for split, info in man["splits"].items():
        df = pl.read_parquet(root / split / "samples.parquet")
        err = pl.read_parquet(root / split / "errors.parquet")
        assert df.height == info["samples"] and err.height == info["errors"]
        assert set(df["split"]) <= {split} and set(err["split"]) <= {split}
        assert err["reason"].null_count() == 0 and all(err["reason"].str.len_chars() > 0)
        on_disk = sorted(p.name for p in (root / split).iterdir() if p.suffix in (".tar", ".idx"))
        names = [s["name"] for s in info["shards"]]
        assert on_disk == sorted([f"{n}.tar" for n in names] + [f"{n}.idx" for n in names])
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
        assert df["shard"].unique().sort().to_list() == sorted(names)
        for shard in info["shards"]:
            tar = root / split / f"{shard['name']}.tar"
            assert tar.stat().st_size == shard["bytes"]
            rows = df.filter(pl.col("shard") == shard["name"]).sort("data_offset").to_dicts()
            assert len(rows) == shard["samples"] > 0
            members = tar_members(tar)
            assert len(members) == 3 * len(rows)
            idx = parse_idx((root / split / f"{shard['name']}.idx").read_text())
            assert len(idx) == len(rows)
            for row, entry, i in zip(rows, idx, range(0, len(members), 3)):
                key = row["key"]
                (jn, joff, jsize, jpg), (cn, _, _, cls), (sn, _, _, js) = members[i:i + 3]
                assert (jn, cn, sn) == (f"{key}.jpg", f"{key}.cls", f"{key}.json")
                assert [(m.ext, m.offset, m.size, m.name) for m in entry] == [
                    (n.rsplit(".", 1)[1], off, size, n) for n, off, size, _ in members[i:i + 3]]
                assert (joff, jsize) == (row["data_offset"], row["bytes"])
                assert sha1(jpg) == row["sha1"]
                with Image.open(io.BytesIO(jpg)) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert im.size == (row["width"], row["height"])
                    im.load()
                assert cls == str(row["label"]).encode()
                doc = json.loads(js)
                assert doc["key"] == key and doc["label"] == row["label"]
                assert doc["src_path"] == row["src_path"] and doc["source"] == row["source"]
                assert doc["class_name"] == row["class_name"]
                if row["label"] >= 0:
                    assert row["class_name"] == classes[row["label"]]
                else:
                    assert split == "test" and row["class_name"] == ""
        all_keys += df["key"].to_list()
        out[split] = df
    assert len(all_keys) == len(set(all_keys)), "keys are not unique"
    assert not [k for k in all_keys if "." in k or "/" in k or not k]
    return out
