"""wvdata.dedup on duplicate-heavy input: a few hundred near-copies of one photo form one
cluster with the right keep at near-linear cost (representatives, union-find, signature
checks), and the collapse path agrees with the plain pairwise path on a small case."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageEnhance

from wvdata.build import build
from wvdata.dataset import open_dataset
from wvdata.dedup import find_duplicates
from wvdata.synth import duplicates as synth

COPIES = 300


def _copy(im: Image.Image, rng: np.random.Generator) -> bytes:
    """A re-upload: maybe a border crop (one of the kinds crawls show), a resize, a brightness
    change, a JPEG quality."""
    kind = rng.integers(0, 4)
    w, h = im.size
    if kind == 1:  # a few percent off every side
        c = rng.choice([0.03, 0.05])
        im = im.crop((round(c * w), round(c * h), w - round(c * w), h - round(c * h)))
    elif kind == 2:  # 5% off one side
        dx, dy = round(0.05 * w), round(0.05 * h)
        im = im.crop([(dx, 0, w, h), (0, dy, w, h), (0, 0, w - dx, h), (0, 0, w, h - dy)][rng.integers(0, 4)])
    s = rng.uniform(0.4, 0.9)
    im = im.resize((max(32, int(im.width * s)), max(32, int(im.height * s))), Image.Resampling.BICUBIC)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.92, 1.08))
    return synth.jpeg(im, int(rng.integers(60, 96)))


def _write(root, cls, name, data):
    d = root / cls
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.jpg").write_bytes(data)


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """COPIES near-copies of chelsea plus its full-size original, and distinct photos and
    look-alike digits that must stay apart."""
    root = tmp_path_factory.mktemp("heavy_src")
    rng = np.random.default_rng(0)
    im = synth.photo("chelsea")
    _write(root, "cat", "original", synth.jpeg(im, 95))
    for i in range(COPIES):
        _write(root, "cat", f"copy{i:03d}", _copy(im, rng))
    for name in ("astronaut", "coffee", "rocket", "camera", "moon"):
        _write(root, "other", name, synth.jpeg(synth.photo(name)))
    for k, (label, data) in enumerate(synth.digits(per_class=4)):
        if label in (1, 4):
            _write(root, "digits", f"d{label}-{k}", data)
    out = tmp_path_factory.mktemp("heavy_ds") / "ds"
    build(root, out, layout="folder", shard_samples=128, workers=2, progress=False)
    return out


def _clusters(table: pl.DataFrame) -> set[frozenset]:
    return {frozenset(g["key"]) for _, g in table.filter(pl.col("cluster") >= 0).group_by("cluster")}


def test_hundreds_of_copies_are_one_cluster_at_linear_cost(heavy):
    res = find_duplicates(heavy, workers=2, progress=False)
    src = open_dataset(heavy).samples().select("key", "src_path")
    t = res.table.join(src, on="key")
    cat = t.filter(pl.col("src_path").str.starts_with("cat/"))
    assert cat.height == COPIES + 1
    assert cat["cluster"].n_unique() == 1 and (cat["cluster"] >= 0).all()
    assert (cat["cluster_size"] == COPIES + 1).all()
    kept = cat.filter(pl.col("keep"))
    assert kept["src_path"].to_list() == ["cat/original.jpg"]  # the highest resolution
    others = t.filter(~pl.col("src_path").str.starts_with("cat/"))
    assert (others["cluster"] == -1).all() and others["keep"].all()
    s = res.stats
    # collapsed: a few representatives queried, the copies joined them; checks stay ~linear
    # (the pairwise path would see ~COPIES^2/2 = 45,000 candidate pairs)
    assert 1 <= s["representatives"] < COPIES // 4
    assert s["checks"] < 3 * COPIES, s
    assert s["candidates"] < 20 * COPIES, s


def test_collapse_path_agrees_with_pairwise_path(heavy):
    a = find_duplicates(heavy, workers=1, progress=False)  # collapse (dense_min default)
    b = find_duplicates(heavy, workers=1, progress=False, dense_min=None)  # every image queries
    c = find_duplicates(heavy, workers=1, progress=False, dense_min=2)  # every shared bucket dense
    assert b.stats["representatives"] == 0 and c.stats["representatives"] > 0
    for res in (a, c):
        assert _clusters(res.table) == _clusters(b.table)
        assert res.table.select("key", "keep", "leak").equals(b.table.select("key", "keep", "leak"))
