"""Views: explicit entry lists over immutable shards, read exactly by DALI and torch."""
import os
import shutil
from collections import Counter

import polars as pl
import pytest

from wvdata import open_dataset
from wvdata.build.tar import parse_idx
from wvdata.cli import main
from wvdata.views import ENTRY_COLUMNS, balance_per_class, load_view, select, view, write_view


@pytest.fixture()
def dataset(webvision_dataset, tmp_path):
    """A private copy (views and annotations get written into it)."""
    dst = tmp_path / "ds"
    shutil.copytree(webvision_dataset, dst)
    return dst


def test_per_class_balance_is_exact_with_duplication_where_short():
    df = pl.DataFrame({"key": [f"k{i}" for i in range(13)], "label": [0] * 10 + [1] * 3})
    out = balance_per_class(df, 5, seed=1)
    counts = Counter(out["label"].to_list())
    assert counts == {0: 5, 1: 5}
    assert out.filter(pl.col("label") == 0)["key"].n_unique() == 5  # no repeats when enough
    assert set(out.filter(pl.col("label") == 1)["key"]) == {"k10", "k11", "k12"}  # all, repeated
    assert balance_per_class(df, 5, seed=1).equals(out)
    assert not balance_per_class(df, 5, seed=2).equals(out)


def test_view_idx_files_list_exactly_the_entries(dataset):
    v = view(dataset, "bal", per_class=9, seed=0)
    assert len(v) == 9 * 10
    e = v.entries
    starts = open_dataset(dataset).shard_starts("train")
    row = 0  # the .idx files list the entries in entries.parquet order, shard by shard
    for k, (path, shard) in enumerate(zip(v.index_paths(), v.shards)):
        tar = (dataset / "train" / f"{shard}.tar").read_bytes()
        for jpg, cls in parse_idx(open(path).read()):
            assert (jpg.ext, cls.ext) == ("jpg", "cls") and e["shard"][row] == shard
            assert jpg.offset == e["data_offset"][row] and jpg.size == e["bytes"][row]
            assert int(jpg.name.split(".")[0]) == e["sample"][row] - starts[k]  # the sample's place in its shard
            assert tar[jpg.offset - 512:jpg.offset - 412].rstrip(b"\0").decode() == f"{e['key'][row]}.jpg"
            assert tar[cls.offset - 512:cls.offset - 412].rstrip(b"\0").decode() == f"{e['key'][row]}.cls"
            assert tar[cls.offset:cls.offset + cls.size] == str(e["label"][row]).encode()
            row += 1
    assert row == len(v)
    again = load_view(dataset, "bal")
    assert again.entries.equals(v.entries) and again.split == "train"


def test_view_rejects_entries_whose_shard_is_not_their_samples(dataset):
    e = select(dataset, columns=ENTRY_COLUMNS).head(3)
    other = open_dataset(dataset).shards("train")[-1]["name"]
    with pytest.raises(ValueError, match="not the shard of their `sample`"):
        write_view(dataset, "bad", e.with_columns(pl.lit(other).alias("shard")))
    assert not (dataset / "views" / "bad").exists()


def test_dali_reads_a_view_through_its_idx_files(dataset):
    pytest.importorskip("nvidia.dali")
    import hashlib

    import numpy as np
    from nvidia.dali import fn, pipeline_def

    v = view(dataset, "bal", per_class=7, seed=3)  # repeats where a class is short
    tars, idx = load_view(dataset, "bal").dali_files()  # the shards it uses (DALI refuses an empty index)
    assert len(tars) == len(set(v.entries["shard"])) and all(os.path.exists(p) for p in tars + idx)

    @pipeline_def(batch_size=5, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=idx,
                                         ext=["jpg", "cls"], missing_component_behavior="error",
                                         random_shuffle=False, pad_last_batch=True, name="reader")
        return fn.decoders.image(jpg, device="cpu"), jpg, cls

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == len(v)
    got = []
    while len(got) < len(v):
        images, jpgs, labels = p.run()
        got += [(hashlib.sha1(np.asarray(jpgs[i]).tobytes()).hexdigest(), int(np.asarray(labels[i]).tobytes()),
                 np.asarray(images[i]).shape[:2]) for i in range(len(images))]
    samples = open_dataset(dataset).samples("train").select("key", "sha1", "label", "width", "height")
    by_key = {k: (s, lab, (h, w)) for k, s, lab, w, h in samples.iter_rows()}
    assert got[:len(v)] == [by_key[k] for k in v.entries["key"]]


def test_missing_annotation_names_the_command(dataset):
    with pytest.raises(FileNotFoundError, match="wvdata dedup"):
        select(dataset, drop_duplicates=True)
    with pytest.raises(FileNotFoundError, match="wvdata aum"):
        select(dataset, drop_aum=0.2)
    with pytest.raises(FileNotFoundError, match="wvdata curriculum"):
        select(dataset, subsets=[1])
    assert main(["view", str(dataset), "x", "--subsets", "1"]) == 2


def test_annotations_filter_and_where(dataset):
    ds = open_dataset(dataset)
    s = ds.samples("train").sort("key")
    os.makedirs(dataset / "annotations")
    n = s.height
    pl.DataFrame({"key": s["key"], "split": "train", "keep": [i % 3 != 0 for i in range(n)],
                  "leak": [i == 1 for i in range(n)]}).write_parquet(dataset / "annotations/dedup.parquet")
    pl.DataFrame({"key": s["key"], "label": s["label"], "aum": [float(i) for i in range(n)],
                  "n_epochs": 3, "flagged": False}).write_parquet(dataset / "annotations/aum.parquet")
    pl.DataFrame({"key": s["key"], "label": s["label"], "subset": [1 + i % 3 for i in range(n)],
                  "density": 0.5}).write_parquet(dataset / "annotations/curriculum.parquet")
    kept = set(select(dataset, drop_duplicates=True)["key"])
    assert kept == {k for i, k in enumerate(s["key"]) if i % 3}
    assert s["key"][1] not in set(select(dataset, drop_leaks=True)["key"])
    low = select(dataset, drop_aum=0.25)
    assert low.height == n - round(0.25 * n) and s["key"][0] not in set(low["key"])
    assert set(select(dataset, aum_below=5)["key"]) == set(s["key"][5:])
    assert set(select(dataset, subsets=[1, 2])["subset"]) == {1, 2}
    flickr = select(dataset, where="source = 'flickr' AND subset = 1")
    assert flickr.height and set(flickr["source"]) == {"flickr"}
    assert main(["view", str(dataset), "clean", "--drop-duplicates", "--drop-leaks",
                 "--per-class", "4"]) == 0
    assert len(load_view(dataset, "clean")) == 40


def test_key_list_api_keeps_repeats_and_rejects_unknown_keys(dataset):
    keys = open_dataset(dataset).samples("train")["key"].to_list()
    v = write_view(dataset, "mine", [keys[0], keys[0], keys[3]])
    assert sorted(v.entries["key"].to_list()) == sorted([keys[0], keys[0], keys[3]])
    with pytest.raises(KeyError, match="not samples"):
        write_view(dataset, "bad", ["nope"])


def test_view_over_a_shard_of_another_layout_is_refused_and_leaves_nothing(dataset):
    e = select(dataset, columns=ENTRY_COLUMNS)
    first = e.filter(pl.col("shard") == "shard-000000").row(0, named=True)
    tar = dataset / "train" / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    at = first["data_offset"] + -(-first["bytes"] // 512) * 512  # the .cls header after the jpg
    assert data[at:at + 100].rstrip(b"\0").decode() == f"{first['key']}.cls"
    data[at:at + 100] = f"{first['key']}.txt".encode().ljust(100, b"\0")
    tar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not stored as KEY.jpg then KEY.cls"):
        write_view(dataset, "bal", e)
    assert not (dataset / "views").exists() or not any((dataset / "views").iterdir())
    for p in (dataset / "train").glob("*.idx"):
        p.unlink()  # the view's index comes from the tables and the tars, not the shards' .idx
    v = write_view(dataset, "rest", e.filter(pl.col("shard") != "shard-000000"))
    assert len(v) == e.height - e.filter(pl.col("shard") == "shard-000000").height


def test_empty_and_one_entry_views(dataset):
    keys = open_dataset(dataset).samples("train")["key"].to_list()
    empty = write_view(dataset, "none", [])
    assert len(empty) == 0 and empty.dali_files() == ([], [])
    assert all(open(p).read() == "v1.2 0\n" for p in empty.index_paths())
    one = load_view(dataset, write_view(dataset, "one", [keys[-1]]).name)
    tars, idx = one.dali_files()
    (jpg, cls), = parse_idx(open(idx[0]).read())
    assert len(one) == 1 and tars[0].endswith(f"{one.entries['shard'][0]}.tar") and jpg.size == one.entries["bytes"][0]
