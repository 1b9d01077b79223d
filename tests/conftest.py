"""Shared fixtures: small real crawls and datasets made by the tests themselves."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("_crawls")  # the check helpers' asserts report their values

from wvdata import build  # noqa: E402
from wvdata.synth import make_webvision_crawl  # noqa: E402


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
