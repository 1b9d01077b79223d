"""Built shards read by webdataset's own `WebDataset` and by DALI's `fn.readers.webdataset`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _crawls import check_dataset, crop, encode, exif_jpeg, manifest, quiet_build, samples, write
from wvdata.synth import make_webvision_crawl

WDS2IDX = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A WebVision crawl (kept and re-encoded JPEGs) plus a few odd inputs, in several shards."""
    root = tmp_path_factory.mktemp("readers")
    crawl = make_webvision_crawl(root / "src", classes=3, train_per_class=(4, 6), val_per_class=2,
                                 test=3, sizes=((160, 120), (96, 128)), seed=11)
    rgba = np.dstack([crop("coffee", 64, 48), np.full((48, 64), 99, np.uint8)])
    odd = {"odd/q0001/exif6.jpg": exif_jpeg(crop("chelsea", 120, 80), 6),
           "odd/q0001/cmyk.jpg": encode(Image.fromarray(crop("rocket", 70, 90)).convert("CMYK")),
           "odd/q0001/rgba.png": encode(rgba, "PNG"),
           "odd/q0001/gray.png": encode(crop("astronaut", 50, 50)[..., 0], "PNG")}
    with open(crawl.root / "info" / "train_filelist_google.txt", "a") as f:
        for i, (rel, data) in enumerate(odd.items()):
            write(crawl.root / rel, data)
            f.write(f"{rel} {i % 3}\n")
    quiet_build(crawl.root, root / "ds", resize_short=100, shard_samples=4)
    check_dataset(root / "ds")
    kept = samples(root / "ds")["reencoded"].value_counts()
    assert kept.height == 2  # both original and re-encoded bytes are in the shards
    return root / "ds"


def _shards(ds: Path, split: str) -> list[Path]:
    return [ds / split / f"{s['name']}.tar" for s in manifest(ds)["splits"][split]["shards"]]


def _expected(ds: Path, split: str) -> list[tuple]:
    """(key, sha1, label, width, height) of every sample in the order the shards hold them."""
    df = samples(ds, split)
    order = {p.stem: i for i, p in enumerate(_shards(ds, split))}
    rows = sorted(df.to_dicts(), key=lambda r: (order[r["shard"]], r["data_offset"]))
    return [(r["key"], r["sha1"], r["label"], r["width"], r["height"]) for r in rows]


def test_idx_equals_what_wds2idx_writes(dataset, tmp_path):
    assert os.path.exists(WDS2IDX), "DALI's wds2idx tool is not installed"
    n = 0
    for split in manifest(dataset)["splits"]:
        for tar in _shards(dataset, split):
            ref = tmp_path / f"{split}-{tar.stem}.idx"
            subprocess.run([WDS2IDX, str(tar), str(ref)], check=True, capture_output=True)
            assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes(), tar
            n += 1
    assert n >= 6


def test_webdataset_reads_every_shard(dataset):
    import webdataset as wds

    for split in manifest(dataset)["splits"]:
        urls = [str(p) for p in _shards(dataset, split)]
        got = []
        for sample in wds.WebDataset(urls, shardshuffle=False):
            assert set(sample) >= {"__key__", "jpg", "cls", "json"}
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"]
            got.append((sample["__key__"], hashlib.sha1(sample["jpg"]).hexdigest(),
                        int(sample["cls"])))
        assert got == [e[:3] for e in _expected(dataset, split)]


def test_dali_reads_every_shard_with_its_index(dataset):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    batch = 4
    for split in manifest(dataset)["splits"]:
        tars = _shards(dataset, split)
        expected = _expected(dataset, split)

        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
        def pipe(tars=tars):
            jpg, cls = fn.readers.webdataset(
                paths=[str(p) for p in tars], index_paths=[str(p.with_suffix(".idx")) for p in tars],
                ext=["jpg", "cls"], missing_component_behavior="error", random_shuffle=False,
                pad_last_batch=True, name="reader")
            return fn.decoders.image(jpg, device="cpu"), jpg, cls

        p = pipe()
        p.build()
        assert p.epoch_size("reader") == len(expected)
        got = []
        while len(got) < len(expected):
            images, jpgs, labels = p.run()
            for i in range(len(images)):
                img = np.asarray(images[i])
                got.append((hashlib.sha1(np.asarray(jpgs[i]).tobytes()).hexdigest(),
                            int(np.asarray(labels[i]).tobytes()), img.shape[1], img.shape[0], img.shape[2]))
        got = got[:len(expected)]
        assert got == [(e[1], e[2], e[3], e[4], 3) for e in expected], split
        del p
