"""Views: explicit entry lists over immutable shards, read exactly by DALI and torch."""
import os
import shutil
from collections import Counter

import polars as pl
import pytest

from wvdata import open_dataset
from wvdata.build.tar import parse_idx
from wvdata.cli import main
from wvdata.views import balance_per_class, load_view, select, view, write_view


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
    listed = Counter()
    for path in v.index_paths():
        for members in parse_idx(open(path).read()):
            listed[members[0].name.split(".")[0]] += 1
            assert [m.ext for m in members] == ["jpg", "cls", "json"]
    assert listed == Counter(v.entries["key"].to_list())
    again = load_view(dataset, "bal")
    assert again.entries.equals(v.entries) and again.split == "train"


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
