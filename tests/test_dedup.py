"""wvdata.dedup on real datasets built from bundled photos: near-duplicate copies, hard
negatives (texture tiles, regions of one photo, handwritten digits, icons, flat images),
train/val/test leaks, the keep rule, the output table and the CLI."""
from __future__ import annotations

import argparse
import itertools
import os
import re

import numpy as np
import polars as pl
import pytest
from PIL import Image

from wvdata.build import build
from wvdata.dataset import open_dataset
from wvdata.dedup import OUT_SCHEMA, add_cli, dedup, find_duplicates, format_summary
from wvdata.synth import duplicates as synth

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "clock", "moon", "page")


def _write(root, split, cls, name, data: bytes) -> str:
    d = root / split / cls
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.jpg").write_bytes(data)
    return f"{split}/{cls}/{name}.jpg"


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """A folder crawl and its ground truth: src_path -> duplicate group."""
    root = tmp_path_factory.mktemp("dedup_src")
    truth: dict[str, str] = {}
    for name, orig, copies in synth.near_duplicates(PHOTOS):
        truth[_write(root, "train", "photo", name, orig)] = name
        for t, data in copies.items():
            truth[_write(root, "train", "photo", f"{name}-{t}", data)] = name
    for group, images in synth.look_alikes().items():
        if group.startswith("digit") and group not in ("digit1", "digit2", "digit4", "digit6"):
            continue
        for i, data in enumerate(images[:8]):
            truth[_write(root, "train", "lookalike", f"{group}-{i}", data)] = f"{group}-{i}"
    # flat images: two white ones are the same blank, the black one is not
    for name, value in (("white-a", 255), ("white-b", 252), ("black", 0)):
        truth[_write(root, "train", "flat", name, synth.flat(value))] = \
            "white" if value > 128 else name
    # leaks: a val photo with a resized copy in train, a test photo with a cropped copy
    for split, name, copy in (("val", "rocket", "resize50"), ("test", "coins", "crop5_all_sides")):
        im = synth.photo(name) if name != "rocket" else synth.photo("rocket").transpose(
            Image.Transpose.FLIP_LEFT_RIGHT)
        truth[_write(root, split, "photo", f"{name}-{split}", synth.jpeg(im))] = f"{name}-{split}"
        truth[_write(root, "train", "photo", f"{name}-{split}-copy", synth.TRANSFORMS[copy](im))] = \
            f"{name}-{split}"
    # distinct val / test images
    for split, name in (("val", "immunohistochemistry"), ("test", "retina")):
        truth[_write(root, split, "photo", name, synth.jpeg(synth.photo(name)))] = name
    return root, truth


@pytest.fixture(scope="module")
def dataset(crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup_ds") / "ds"
    build(crawl[0], out, layout="folder", shard_samples=40, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def result(dataset):
    table = dedup(dataset, workers=2, progress=False)
    return table


def _groups(dataset, truth) -> pl.DataFrame:
    samples = open_dataset(dataset).samples()
    df = samples.select("key", "src_path", "width", "height", "bytes")
    return df.with_columns(group=pl.col("src_path").replace_strict(truth)) if truth else df


def _pairs(df: pl.DataFrame, col: str) -> set[tuple[str, str]]:
    out = set()
    for _, part in df.filter(pl.col(col).is_not_null()).group_by(col):
        keys = sorted(part["key"].to_list())
        out |= set(itertools.combinations(keys, 2))
    return out


def test_precision_recall_at_default_radius(dataset, crawl, result):
    g = _groups(dataset, crawl[1]).join(result, on="key")
    truth = _pairs(g, "group")
    found = _pairs(g.with_columns(cluster=pl.when(pl.col("cluster") >= 0).then(pl.col("cluster"))), "cluster")
    tp = len(truth & found)
    precision, recall = tp / max(len(found), 1), tp / len(truth)
    missed = sorted(truth - found)[:5]
    wrong = sorted(found - truth)[:5]
    assert len(truth) > 300  # 8 photos x 10 images each, the leak copies, the blanks
    assert precision == 1.0, wrong
    assert recall >= 0.98, missed
    # every transform kind is recovered: each copy shares its original's cluster
    copies = g.filter(pl.col("src_path").str.contains("-")).filter(pl.col("group").is_in(list(PHOTOS)))
    assert (copies["cluster"] >= 0).all()


def test_hard_negatives_and_flat_images(dataset, crawl, result):
    g = _groups(dataset, crawl[1]).join(result, on="key")
    look = g.filter(pl.col("src_path").str.contains("lookalike"))
    assert look.height == 3 * 5 + 7 * 5 + 4 * 8 + 8
    assert (look["cluster"] == -1).all(), look.filter(pl.col("cluster") >= 0)["src_path"].to_list()
    assert look["keep"].all()
    flat = g.filter(pl.col("src_path").str.contains("/flat/")).sort("src_path")
    black, wa, wb = flat.rows(named=True)
    assert black["cluster"] == -1
    assert wa["cluster"] == wb["cluster"] >= 0 and wa["cluster_size"] == 2


def test_leaks_found_and_never_kept(dataset, crawl, result):
    g = _groups(dataset, crawl[1]).join(result, on="key")
    leaks = g.filter(pl.col("leak"))
    assert sorted(leaks["src_path"].to_list()) == [
        "train/photo/coins-test-copy.jpg", "train/photo/rocket-val-copy.jpg"]
    assert not leaks["keep"].any()
    for row in leaks.iter_rows(named=True):
        other = g.filter(pl.col("key") == row["nearest_key"]).row(0, named=True)
        assert other["split"] in ("val", "test") and other["keep"]
        assert other["cluster"] == row["cluster"]
    assert g.filter(pl.col("split") != "train")["keep"].all()


def test_keep_rule_and_table(dataset, crawl, result):
    assert result.schema == pl.Schema(OUT_SCHEMA)
    ds = open_dataset(dataset)
    assert result.height == ds.samples().height
    assert result.equals(pl.read_parquet(ds.annotation_path("dedup")))
    assert not [p for p in os.listdir(os.path.dirname(ds.annotation_path("dedup"))) if "tmp" in p]
    g = _groups(dataset, crawl[1]).join(result, on="key")
    for _, part in g.filter(pl.col("cluster") >= 0).group_by("cluster"):
        assert part["keep"].sum() == 1
        assert (part["cluster_size"] == part.height).all()
        best = part.filter(~pl.col("leak")).with_columns(area=pl.col("width") * pl.col("height")).sort(
            ["area", "bytes", "key"], descending=[True, True, False]).row(0, named=True)
        assert part.filter(pl.col("keep"))["key"].item() == best["key"]
    # astronaut: four copies keep the full 512x512 (original, q30, grayscale, brightness+10%);
    # of those the largest file is the brightened one (71 kB against 68, 60 and 21)
    astro = g.filter(pl.col("group") == "astronaut")
    full = astro.filter((pl.col("width") == 512) & (pl.col("height") == 512)).sort("bytes", descending=True)
    assert full.height == 4 and astro.height == 10
    kept = astro.filter(pl.col("keep"))["src_path"].item()
    assert kept == full["src_path"][0] == "train/photo/astronaut-brightness+10%.jpg"
    single = g.filter(pl.col("cluster") == -1)
    assert (single["cluster_size"] == 1).all() and single["keep"].all()
    assert g["hash"].str.len_chars().eq(16).all()
    # cluster ids: 0..K-1, numbered by each cluster's smallest key
    firsts = g.filter(pl.col("cluster") >= 0).group_by("cluster").agg(pl.col("key").min()).sort("key")
    assert firsts["cluster"].to_list() == list(range(firsts.height))


def test_keep_rule_tie_breaks(tmp_path):
    """Same resolution: the larger file wins; same bytes (sha1 copies): the smaller key."""
    src = tmp_path / "src"
    im = synth.photo("chelsea")
    _write(src, "train", "a", "big", synth.jpeg(im, 95))
    _write(src, "train", "a", "small", synth.jpeg(im, 60))
    _write(src, "train", "a", "zz-lowres", synth.jpeg(im.resize((225, 150)), 95))
    for name in ("copy1", "copy2"):
        _write(src, "train", "b", name, synth.jpeg(synth.photo("rocket")))
    build(src, tmp_path / "ds", layout="folder", workers=1, progress=False)
    g = _groups(tmp_path / "ds", {}).join(
        dedup(tmp_path / "ds", progress=False, workers=1), on="key")
    kept = sorted(g.filter(pl.col("keep"))["src_path"].to_list())
    copies = sorted(g.filter(pl.col("src_path").str.contains("copy"))["key"].to_list())
    assert kept[0] == "train/a/big.jpg"
    assert g.filter(pl.col("keep") & pl.col("src_path").str.contains("copy"))["key"].item() == copies[0]
    assert g.filter(pl.col("src_path").str.contains("copy"))["nearest_distance"].to_list() == [0, 0]


def test_no_duplicates_no_clusters(tmp_path):
    src = tmp_path / "src"
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "moon"):
        _write(src, "train", "x", name, synth.jpeg(synth.photo(name)))
    for i, data in enumerate(synth.icons(6, seed=3)):
        _write(src, "val", "x", f"icon{i}", data)
    build(src, tmp_path / "ds", layout="folder", workers=1, progress=False)
    table = dedup(tmp_path / "ds", progress=False, workers=1)
    assert table.height == 13
    assert (table["cluster"] == -1).all() and table["keep"].all() and not table["leak"].any()
    assert "0 clusters" in format_summary(table)


def test_unverified_hash_matches_are_false_duplicates(dataset, crawl):
    """Without the 256-bit check, raw 64-bit matches merge look-alikes: the check is load-bearing."""
    res = find_duplicates(dataset, splits=("train",), workers=1, progress=False, verify=False)
    g = _groups(dataset, crawl[1]).join(res.table, on="key")
    look = g.filter(pl.col("src_path").str.contains("lookalike"))
    assert (look["cluster"] >= 0).sum() >= 5
    assert res.stats["splits"] == ["train"] and res.table["split"].unique().to_list() == ["train"]


def test_multihash_equals_flat(dataset):
    a = find_duplicates(dataset, workers=1, progress=False, method="flat").table
    b = find_duplicates(dataset, workers=1, progress=False, method="multihash").table
    c = find_duplicates(dataset, workers=1, progress=False, method="mih").table  # the large-set default
    assert a.equals(b) and a.equals(c)


def test_cli_and_reports(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    args = parser.parse_args(["dedup", str(dataset), "--splits", "train,val", "--workers", "1",
                              "--no-progress", "--report", str(png)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "clusters" in out and "train images matching val: 1" in out
    table = pl.read_parquet(open_dataset(dataset).annotation_path("dedup"))
    assert set(table["split"]) == {"train", "val"} and table["leak"].sum() == 1
    with Image.open(png) as im:
        assert im.width >= 4 * 128 and im.height > 1000
    args = parser.parse_args(["dedup", str(dataset), "--workers", "1", "--no-progress",
                              "--report", str(page)])
    assert args.func(args) == 0
    text = page.read_text()
    assert text.count("data:image/jpeg;base64") > 40
    assert re.search(r"CLUSTERS: showing the \d+ largest of \d+", text) and "KEEP = the one kept" in text
    assert "LEAKS: 2 train/val-test pairs" in text and text.count(">LEAK train d=") == 2  # each leak once


def test_exact_mode_hash_equals_imagehash(dataset):
    import io

    import imagehash

    ds = open_dataset(dataset)
    table = find_duplicates(dataset, splits=("val", "test"), workers=1, progress=False, exact=True).table
    want = {k: str(imagehash.phash(Image.open(io.BytesIO(b)))) for split in ("val", "test")
            for k, b in ds.iter_images(split)}
    assert dict(zip(table["key"], table["hash"])) == want


@pytest.mark.ray
def test_ray_engine_matches_local(dataset):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        a = find_duplicates(dataset, engine="ray", progress=False)
    finally:
        ray.shutdown()
    b = find_duplicates(dataset, workers=1, progress=False)
    assert a.table.equals(b.table)
    assert a.stats["checks"] == b.stats["checks"] > 0


@pytest.mark.parametrize("radius", [2, 3, 5, 8, 10, 12])
def test_mih_search_is_exact_against_brute_force(radius, monkeypatch):
    from wvdata.dedup import _mih
    from wvdata.dedup.search import brute_force_pairs, range_pairs

    if radius == 12:  # every chunk overflows its one-pass buffer: the count-then-fill path
        monkeypatch.setattr(_mih, "_CAP", 1)

    rng = np.random.default_rng(radius)
    codes = rng.integers(0, 256, size=(30000, 8), dtype=np.uint8)
    for k in range(radius + 3):  # planted pairs at every distance around the radius
        bits = np.unpackbits(codes[k])
        bits[rng.choice(64, k, replace=False)] ^= 1
        codes[100 + k] = np.packbits(bits)
    queries = codes[:3000]
    got = set(zip(*(a.tolist() for a in range_pairs(codes, queries, radius, "mih"))))
    want = set(zip(*(a.tolist() for a in brute_force_pairs(codes, queries, radius))))
    assert got == want
    assert all((k, 100 + k, k) in got for k in range(radius + 1))
    assert not any((k, 100 + k, k) in got for k in range(radius + 1, radius + 3))


def test_mih_search_is_exact_in_a_dense_region(monkeypatch):
    """A crawl's popular image: thousands of codes within a few bits of one centre fill a few
    buckets far beyond the kernel's gather buffer and every chunk's one-pass output."""
    from wvdata.dedup import _mih
    from wvdata.dedup.search import brute_force_pairs, range_pairs

    rng = np.random.default_rng(7)
    codes = rng.integers(0, 256, size=(8000, 8), dtype=np.uint8)
    centre = np.unpackbits(codes[0])
    for r in range(1, 6000):
        bits = centre.copy()
        bits[rng.choice(64, rng.integers(0, 7), replace=False)] ^= 1
        codes[r] = np.packbits(bits)
    queries = np.concatenate([codes[::40], codes[:20]])
    bq, bi, bd = brute_force_pairs(codes, queries, 10)
    want = np.sort(bq * len(codes) + bi)
    assert len(want) > 100_000
    for cap in (4096, 1):  # the one-pass buffers overflow: those chunks are searched again
        monkeypatch.setattr(_mih, "_CAP", cap)
        q, i, d = range_pairs(codes, queries, 10, "mih")
        got = np.sort(q * len(codes) + i)  # each pair once (reported by one table only)
        assert np.array_equal(got, want)
        assert np.array_equal(d[np.argsort(q * len(codes) + i)], bd[np.argsort(bq * len(codes) + bi)])


@pytest.mark.parametrize("nhash", [2, 3, 4, 5])
def test_mih_table_flips_cover_every_pair_within_the_radius(nhash):
    """The refined pigeonhole: every split of a distance <= radius over the substrings has a
    table whose substring distance is within that table's probed flips."""
    import itertools

    from wvdata.dedup._mih import table_flips

    for radius in range(0, 13):
        flips = table_flips(nhash, radius)
        for d in itertools.product(range(radius + 1), repeat=nhash):
            if sum(d) <= radius:
                assert any(x <= f for x, f in zip(d, flips)), (radius, d, flips)
        assert sum(f < radius // nhash for f in flips) == nhash - 1 - radius % nhash
