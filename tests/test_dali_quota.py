"""Curriculum quota batches in the DALI backend (CPU mode): the same batches as the torch backend,
every batch meeting its quota, resume at the right batch, bad samples replaced within their batch."""
import shutil
from collections import Counter

import polars as pl
import pytest
import torch

from wvdata import open_dataset
from wvdata.stream import loader

pytest.importorskip("nvidia.dali")

QUOTA = (4, 2, 2)


@pytest.fixture(scope="module")
def curated(webvision_dataset, tmp_path_factory):
    """A private copy of the small WebVision dataset with a hand-written curriculum table:
    subset 1 holds half of each class, subsets 2 and 3 the rest (no training needed)."""
    ds = tmp_path_factory.mktemp("dali_quota") / "ds"
    shutil.copytree(webvision_dataset, ds)
    samples = open_dataset(ds).samples("train").select("key", "label").sort("key")
    rank = samples.with_columns(pl.int_range(pl.len()).over("label").alias("i"),
                                pl.len().over("label").alias("n"))
    table = rank.select("key", "label",
                        pl.when(pl.col("i") < pl.col("n") // 2).then(1)
                        .otherwise(2 + pl.col("i") % 2).cast(pl.Int64).alias("subset"),
                        (1.0 / (1 + pl.col("i"))).alias("density"))
    (ds / "annotations").mkdir(exist_ok=True)
    table.write_parquet(ds / "annotations" / "curriculum.parquet")
    return ds, dict(table.select("key", "subset").iter_rows())


def _kw(world, **extra):
    return dict(batch_size=sum(QUOTA) // world, image_size=32, num_workers=1, world_size=world,
                quota=",".join(map(str, QUOTA)), seed=3, **extra)


def _batches(ld):
    out = []
    for images, labels, keys in ld:
        assert images.dtype == torch.uint8 and tuple(images.shape) == (len(keys), 3, 32, 32)
        assert labels.shape == (len(keys),)
        out.append(keys)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_dali_quota_batches_match_the_torch_backend(curated, world):
    ds, subset = curated
    truth = dict(open_dataset(ds).samples("train").select("key", "label").iter_rows())
    ones = [k for k, s in subset.items() if s == 1]
    seen = Counter()
    for r in range(world):
        dali = loader(ds, rank=r, backend="dali", device="cpu", **_kw(world))
        torch_ld = loader(ds, rank=r, num_workers=0, **{k: v for k, v in _kw(world).items() if k != "num_workers"})
        dali.set_epoch(1)
        torch_ld.set_epoch(1)
        assert len(dali) == len(torch_ld) == -(-len(ones) // QUOTA[0])
        got, want = [], [keys for _, _, keys in torch_ld]
        for _, labels, keys in dali:
            assert labels.tolist() == [truth[k] for k in keys]
            got.append(keys)
        assert [Counter(b) for b in got] == [Counter(b) for b in want]  # batch by batch, as multisets
        for keys in got:
            assert Counter(subset[k] for k in keys) == {s + 1: q // world for s, q in enumerate(QUOTA)}
        seen.update(k for keys in got for k in keys if subset[k] == 1)
        assert dali.epoch == 2 and dali.stats.skipped == 0
    # one epoch covers every subset-1 entry once (the last global batch may top up with repeats)
    assert set(seen) == set(ones) and sum(seen.values()) - len(ones) < QUOTA[0]


def test_dali_quota_resume_and_with_index(curated):
    ds, _ = curated
    full = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    full.set_epoch(2)
    batches = _batches(full)
    first = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    first.set_epoch(2)
    it = iter(first)
    head = [next(it)[2]]
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (2, 1)
    resumed = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1, with_index=True))
    resumed.load_state_dict(state)
    samples = open_dataset(ds).samples("train")["key"].to_list()
    rest = []
    for _, _, keys, ids in resumed:
        assert [samples[i] for i in ids.tolist()] == keys
        rest.append(keys)
    assert [Counter(b) for b in head + rest] == [Counter(b) for b in batches]
    assert resumed.epoch == 3 and len(rest) == len(batches) - 1


def test_dali_quota_eval_mode_and_no_randaug(curated):
    ds, subset = curated
    for extra in (dict(train=False), dict(randaug=(0, 0))):
        ld = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1, **extra))
        for keys in _batches(ld):
            assert Counter(subset[k] for k in keys) == {1: 4, 2: 2, 3: 2}


@pytest.mark.parametrize("where", [0, 1])
def test_dali_quota_replaces_a_corrupt_sample_within_its_batch(curated, tmp_path, where):
    src, subset = curated
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    v = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    plan = v.positions(0).reshape(len(v), -1)
    e = v.entries
    victim = int(plan[where][0])  # a subset-1 entry of batch `where`
    key = e.keys[victim]
    with open(e.paths[e.shard_id[victim]], "r+b") as f:
        f.seek(int(e.offset[victim]))
        f.write(b"\0" * int(e.size[victim]))  # same length, not a JPEG any more
    ld = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    got = _batches(ld)
    assert len(got) == len(plan) and ld.stats.skipped == 1
    want = [[e.keys[p] for p in b] for b in plan]
    for b, (g, w) in enumerate(zip(got, want)):
        if b != where:
            assert Counter(g) == Counter(w)
    g, w = got[where], want[where]
    assert key not in g and len(g) == len(w)
    assert Counter(subset[k] for k in g) == {1: 4, 2: 2, 3: 2}  # replaced from its own subset
    assert set(g) == set(w) - {key}  # by a repeat of a good entry of the batch


def test_dali_quota_skips_entries_of_a_truncated_shard(curated, tmp_path):
    src, _ = curated
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    v = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    plan = v.positions(0).reshape(len(v), -1)
    e = v.entries
    victim = int(plan[1][0])
    sid, cut = e.shard_id[victim], int(e.offset[victim]) + 10
    lost = {e.keys[p] for p in range(len(e.keys)) if e.shard_id[p] == sid and e.offset[p] + e.size[p] > cut}
    with open(e.paths[sid], "r+b") as f:
        f.truncate(cut)  # short reads from here on: found while feeding, not by DALI
    ld = loader(ds, rank=0, backend="dali", device="cpu", **_kw(1))
    got = _batches(ld)
    assert len(got) == len(plan) and all(len(b) == plan.shape[1] for b in got)
    assert not lost & {k for b in got for k in b}
    assert ld.stats.skipped == len(lost & {e.keys[p] for p in plan.reshape(-1)})
