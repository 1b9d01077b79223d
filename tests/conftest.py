"""Shared fixtures: small real crawls and datasets made by the tests themselves."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("_crawls")  # the check helpers' asserts report their values

from wvdata import build  # noqa: E402
from wvdata.synth import make_noisy_digits, make_webvision_crawl  # noqa: E402


@pytest.fixture(scope="session")
def webvision_crawl(tmp_path_factory):
    """A small WebVision-layout crawl (real digits over real photos), shared read-only."""
    return make_webvision_crawl(tmp_path_factory.mktemp("crawl"), train_per_class=(4, 8),
                                val_per_class=2, test=6, label_noise=0.1, seed=1)


@pytest.fixture(scope="session")
def webvision_dataset(webvision_crawl, tmp_path_factory):
    """That crawl built with --resize-short 256 into several small shards, shared read-only."""
    out = tmp_path_factory.mktemp("ds") / "dataset"
    build(webvision_crawl.root, out, resize_short=256, shard_samples=16, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def noisy_digits(tmp_path_factory):
    """scikit-learn's 1,797 handwritten digits as JPEGs with 20% of the train labels flipped
    (val clean), built from its manifest: (dataset dir, {train key: True if flipped}).
    Shared read-only by the label-noise tests (AUM, curriculum, ensemble)."""
    import polars as pl

    base = tmp_path_factory.mktemp("noisy_digits")
    crawl = make_noisy_digits(base / "src", flip=0.2)
    build(crawl.root / "manifest.csv", base / "ds", shard_samples=256, workers=1, progress=False)
    flipped = {rel: true != given for rel, true, given in crawl.items["train"]}
    train = pl.read_parquet(base / "ds" / "train" / "samples.parquet")
    return base / "ds", {k: flipped[p] for k, p in train.select("key", "src_path").iter_rows()}


@pytest.fixture(scope="session")
def noisy_digits_run(noisy_digits, tmp_path_factory):
    """One 12-epoch `--aum` training run on it (test_resnet at 32 px, the digits being 8x8: about
    a minute on 2 CPU cores; AUM separates the flipped labels with an AUROC of about 0.98): its run directory."""
    from _train import run_trainer

    out = tmp_path_factory.mktemp("noisy_run") / "run"
    run_trainer(["--data", str(noisy_digits[0]), "--out", str(out), "--model", "test_resnet", "--epochs", "12",
                 "--batch-size", "32", "--lr", "0.8", "--image-size", "32", "--randaug", "0,0", "--workers", "2",
                 "--warmup-epochs", "0.3", "--no-progress", "--aum"])
    return out
