"""`wvdata curriculum` on features of a short CPU run over the noisy digits (20% flipped labels), the
density kernels against direct O(n^2) NumPy, and curriculum quota batches in the loader and trainer."""
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import polars as pl
import pytest
from _train import QUICK, ROOT, run_trainer

from wvdata import _density
from wvdata.curriculum import class_subsets, curriculum, find_subsets
from wvdata.embed import embed
from wvdata.stream import loader
from wvdata.stream.order import quota_order, quota_rank_plan, share_quota
from wvdata.views import select


@pytest.fixture(scope="module")
def curated(noisy_digits, noisy_digits_run, tmp_path_factory):
    """A private copy of the noisy digits, embedded with the 12-epoch run, curriculum written (auto = exact)."""
    ds = tmp_path_factory.mktemp("curriculum") / "ds"
    shutil.copytree(noisy_digits[0], ds)
    embed(ds, checkpoint=noisy_digits_run / "checkpoint.pt", name="run", workers=1, progress=False)
    table = curriculum(ds, "run", progress=False)
    return ds, noisy_digits[1], table


def _flip_rates(table, flipped):
    t = table.with_columns(pl.col("key").replace_strict(flipped, return_dtype=pl.Boolean).alias("flipped"))
    return {s: r for s, r in t.group_by("subset").agg(pl.col("flipped").mean()).iter_rows()}


def test_subset_3_holds_far_more_flipped_labels_than_subset_1(curated):
    ds, flipped, table = curated
    assert table.columns == ["key", "label", "subset", "density"] and table.height == len(flipped)
    assert table["subset"].null_count() == 0 and set(table["subset"]) == {1, 2, 3}
    rates = _flip_rates(table, flipped)
    print("flipped share per subset:", {s: round(r, 3) for s, r in sorted(rates.items())})
    assert rates[3] >= 3 * rates[1] and rates[1] < 0.2 * 0.5  # measured: 0.021 / 0.169 / 0.907
    assert rates[1] < rates[2] < rates[3]
    per_class = table.group_by("label", "subset").agg(pl.col("density").mean()).sort("label", "subset")
    for _, part in per_class.group_by("label"):
        assert part["density"].to_list() == sorted(part["density"].to_list(), reverse=True)  # 1 = densest


def _direct(x, t=0.6):
    """The reference, straight: the full float64 distance matrix, d_c over all pairs, rho by row sums."""
    x = np.asarray(x, dtype=np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    dc = np.quantile(d[np.triu_indices(len(x), 1)], t, method="lower")
    return (d < dc).sum(1) - (np.diag(d) < dc), dc


def _kmeans_sse(values, clusters):
    return sum(((values[clusters == c] - values[clusters == c].mean()) ** 2).sum() for c in np.unique(clusters))


def _brute_kmeans3(values):
    """Optimal 3-means of 1-D values by trying every pair of cuts of the sorted distinct values."""
    u = np.unique(values)
    best = min((_kmeans_sse(values, (values >= u[a]).astype(int) + (values >= u[b])), a, b)
               for a in range(1, len(u)) for b in range(a + 1, len(u)))
    return 2 - ((values >= u[best[1]]).astype(int) + (values >= u[best[2]]))


def test_exact_equals_a_direct_numpy_implementation_on_every_class(curated):
    ds, _, table = curated
    from wvdata.embed import load_features

    feats, keys = load_features(ds, "run")
    labels = dict(table.select("key", "label").iter_rows())
    ours = dict(table.select("key", "subset").iter_rows())
    y = np.array([labels[k] for k in keys])
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rho, dc = _direct(feats[idx])
        sub, dens, used = class_subsets(feats[idx], 3, "exact")
        assert used == "exact" and np.array_equal(dens, rho)
        assert np.isclose(_density.exact_density(feats[idx])[1], dc, rtol=1e-12)
        ref = _brute_kmeans3(rho.astype(np.float64)) + 1
        assert np.isclose(_kmeans_sse(rho, sub), _kmeans_sse(rho, ref))  # optimal (ties may split differently)
        assert np.array_equal(sub, [ours[keys[int(i)]] for i in idx])


@pytest.mark.parametrize("n,dim", [(2, 3), (3, 5), (301, 16), (1500, 40)])
def test_blocked_exact_density_equals_direct_with_duplicates_and_small_blocks(n, dim):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, dim)) * rng.uniform(0.3, 3, (n, 1))).astype(np.float16)
    x[: n // 5] = x[0]  # duplicated rows: many equal distances
    rho, dc = _density.exact_density(x, block=128)
    ref, ref_dc = _direct(x)
    assert np.array_equal(rho, ref) and np.isclose(dc, ref_dc, rtol=1e-12)
    assert np.array_equal(_density.exact_density(np.ones((50, 4)))[0], np.zeros(50))  # all equal: nobody closer


def test_sampled_cutoff_for_big_classes_and_knn_agree_with_exact(curated):
    ds, flipped, table = curated
    from wvdata.embed import load_features

    feats, keys = load_features(ds, "run")
    y = np.array([dict(table.select("key", "label").iter_rows())[k] for k in keys])
    same_sampled, same_knn, same_knn64, n = 0, 0, 0, 0
    for c in range(10):
        x = feats[y == c]
        ref = class_subsets(x, 3, "exact")[0]
        rho, _ = _density.exact_density(x, all_pairs_max=10)  # d_c from 4M sampled pairs instead of all
        same_sampled += (_density.kmeans_1d(rho, 3) + 1 == ref).sum()
        same_knn += (class_subsets(x, 3, "knn")[0] == ref).sum()  # anchors >= class: every sample an anchor
        rho64, _ = _density.knn_density(x, anchors=64)  # 64 anchors of ~144: a real approximation
        same_knn64 += (_density.kmeans_1d(rho64, 3) + 1 == ref).sum()
        n += len(x)
    print(f"same subset as exact: sampled d_c {same_sampled / n:.3f}, knn {same_knn / n:.3f}, "
          f"knn with 64 anchors {same_knn64 / n:.3f}")
    assert same_sampled / n >= 0.97 and same_knn / n >= 0.97 and same_knn64 / n >= 0.85  # 1.0 / 1.0 / 0.93


def test_kmeans_1d_is_optimal():
    rng = np.random.default_rng(3)
    for _ in range(100):
        v = rng.integers(0, rng.integers(4, 50), rng.integers(4, 80)).astype(np.float64)
        if len(np.unique(v)) < 4:
            continue
        assert np.isclose(_kmeans_sse(v, _density.kmeans_1d(v, 3)), _kmeans_sse(v, _brute_kmeans3(v)))
    assert _density.kmeans_1d([5, 5, 5], 3).tolist() == [0, 0, 0]  # fewer distinct values than clusters
    assert _density.kmeans_1d([1, 9, 5, 9], 3).tolist() == [2, 0, 1, 0]  # highest = cluster 0 (subset 1)


def test_wide_features_are_reduced_by_pca_and_keep_their_subsets(curated, tmp_path):
    src, _, table = curated
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    from wvdata.embed import load_features

    feats, keys = load_features(ds, "run")
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(320, 96)))  # 96-d features in a 320-d space
    _write_features(ds, "wide", keys, feats.astype(np.float64) @ q.T)
    res = find_subsets(ds, "wide", progress=False)
    assert res.stats["dims"] == 256
    same = (res.table["subset"] == table["subset"]).mean()  # rank 96 < 256: distances kept (float16 storage)
    assert same >= 0.97, same


def _write_features(ds, name, keys, feats):
    out = ds / "features" / name
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", np.asarray(feats, dtype=np.float16))
    pl.DataFrame({"key": list(keys)}).write_parquet(out / "keys.parquet")


def test_samples_without_features_get_a_null_subset_and_views_say_which_they_want(curated, tmp_path):
    src, _, _ = curated
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    samples = pl.read_parquet(ds / "train" / "samples.parquet")
    from wvdata.embed import load_features

    feats, keys = load_features(ds, "run")
    label = dict(samples.select("key", "label").iter_rows())
    zero = [i for i, k in enumerate(keys) if label[k] == 0]
    keep = [i for i, k in enumerate(keys) if label[k] != 0] + zero[:2]  # class 0: 2 samples < 3 subsets
    _write_features(ds, "part", [keys[i] for i in keep], feats[keep])
    res = find_subsets(ds, "part", progress=False)
    t = res.table
    assert t.height == samples.height and t["subset"].null_count() == samples.height - len(keep)
    assert t.filter(pl.col("label") == 0)["subset"].drop_nulls().to_list() == [1, 1]  # too small: subset 1
    assert res.stats["small_classes"] == 1
    curriculum(ds, "part", progress=False)
    n_null = samples.height - len(keep)
    assert select(ds, subsets=[1, 2, 3]).height == len(keep)
    assert select(ds, subsets=[None]).height == n_null
    assert select(ds, subsets=[1, None]).height == n_null + t.filter(pl.col("subset") == 1).height
    with pytest.raises(ValueError, match="no curriculum subset"):
        loader(ds, batch_size=16, quota="8,4,4", rank=0, world_size=1, num_workers=0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wvdata.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_summary_report_and_one_line_errors(curated, tmp_path):
    src, _, _ = curated
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    proc = _cli("curriculum", ds, "--features", "run", "--method", "knn", "--report", tmp_path / "r.html",
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"subset 3: +\d+ \( *\d+\.\d%\)", proc.stdout) and "10 knn" in proc.stdout
    assert (tmp_path / "r.html").read_text().count("<img") >= 3 * 3 and "subset 3" in (tmp_path / "r.html").read_text()
    feats = np.load(ds / "features" / "run" / "features.npy")
    keys = pl.read_parquet(ds / "features" / "run" / "keys.parquet")["key"].to_list()
    nan = feats.copy()
    nan[5, 3] = np.nan
    _write_features(ds, "nan", keys, nan)
    _write_features(ds, "alien", keys[:-1] + ["not_a_sample"], feats)
    _write_features(ds, "dups", keys[:-1] + keys[:1], feats)
    for name, message in (("nan", "NaN"), ("alien", "not samples of split"), ("dups", "duplicate keys"),
                          ("missing", "run `wvdata embed`")):
        proc = _cli("curriculum", ds, "--features", name, "--no-progress")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr


# ---------------------------------------------------------------- quota batches


def _groups_labels(n=700, classes=40, seed=0):  # every class fits once per batch: <= 31 in subset 1
    rng = np.random.default_rng(seed)
    return rng.choice(3, n, p=[0.5, 0.3, 0.2]), rng.integers(0, classes, n)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_quota_batch_meets_the_quota_on_every_rank(world):
    groups, labels = _groups_labels()
    quota, bs = (11, 7, 6), 24 // world  # shares that do not divide: q / world, +-1
    n1 = int((groups == 0).sum())
    for epoch in range(3):
        order = quota_order(groups, labels, quota, seed=1, epoch=epoch)
        plans = [quota_rank_plan(order, r, world, bs) for r in range(world)]
        assert len({len(p) for p in plans}) == 1 and len(plans[0]) == -(-n1 // 11)
        for b in range(len(plans[0])):
            shares = [Counter(groups[p.batch(b)].tolist()) for p in plans]
            assert sum(shares, Counter()) == {0: 11, 1: 7, 2: 6}  # the global batch holds the quota
            for s in shares:  # each rank its share
                assert all(abs(s[g] - q / world) < 1 for g, q in enumerate(quota)) and sum(s.values()) == bs
            first = np.concatenate([p.batch(b) for p in plans])
            first = first[groups[first] == 0]
            assert len(set(labels[first].tolist())) == 11  # subset 1: 11 different classes
        seen = Counter(order[groups[order] == 0].tolist())
        assert set(seen) == set(np.flatnonzero(groups == 0).tolist())  # every subset-1 entry...
        assert sum(seen.values()) - n1 < 11  # ...once, the last batch topped up


def test_subsets_2_and_3_cycle_through_seeded_permutations_across_epochs():
    groups, labels = _groups_labels()
    epochs = [quota_order(groups, labels, (11, 7, 6), 1, e).reshape(-1, 24) for e in range(6)]
    for g, (lo, hi) in ((1, (11, 18)), (2, (18, 24))):
        drawn = np.concatenate([o[:, lo:hi].ravel() for o in epochs])
        members = np.flatnonzero(groups == g)
        assert len(drawn) > 2 * len(members) and set(groups[drawn]) == {g}
        counts = Counter(drawn.tolist())  # whole cycles and one partial one: every entry k or k + 1 times
        assert set(counts) == set(members.tolist()) and max(counts.values()) - min(counts.values()) <= 1
    assert not np.array_equal(epochs[0][:, 11:18], epochs[1][:, 11:18])
    assert np.array_equal(quota_order(groups, labels, (11, 7, 6), 1, 4).reshape(-1, 24), epochs[4])


def test_a_class_too_big_for_one_per_batch_repeats_as_little_as_possible():
    groups = np.zeros(400, int)
    labels = np.r_[np.zeros(200, int), np.arange(200) % 50 + 1]  # class 0: half of subset 1
    order = quota_order(groups, labels, (16,), 0, 0).reshape(-1, 16)  # 25 batches, class 0 needs 8 a batch
    assert max(Counter(labels[b].tolist())[0] for b in order) == 8
    assert share_quota((128, 64, 64), [10, 5]) == (171, 85, 0) and share_quota((128, 64, 64), [9]) == (256, 0, 0)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_quota_batches_and_resume(curated, world):
    ds, _, table = curated
    subset = dict(table.select("key", "subset").iter_rows())
    label = dict(table.select("key", "label").iter_rows())
    kw = dict(batch_size=16 // world, image_size=32, num_workers=0, world_size=world, quota="8,4,4", seed=3)
    for r in range(world):
        ld = loader(ds, rank=r, **kw)
        ld.set_epoch(1)
        n1 = table.filter(pl.col("subset") == 1).height
        assert len(ld) == -(-n1 // 8)
        batches = [keys for _, _, keys in ld]
        for keys in batches:
            assert Counter(subset[k] for k in keys) == {1: 8 // world, 2: 4 // world, 3: 4 // world}
            ones = [label[k] for k in keys if subset[k] == 1]
            assert len(set(ones)) == len(ones)  # one per class
        first = loader(ds, rank=r, **kw)
        first.set_epoch(1)
        it = iter(first)
        head = [next(it)[2] for _ in range(5)]
        state = first.state_dict()
        resumed = loader(ds, rank=r, **kw)
        resumed.load_state_dict(state)
        assert head + [keys for _, _, keys in resumed] == batches  # continues exactly
    with pytest.raises(ValueError, match="sums to 16"):
        loader(ds, batch_size=8, quota="8,4,4", rank=0, world_size=1, num_workers=0)


def test_trainer_stages_and_batch_quota_on_the_real_curriculum(curated, tmp_path):
    ds, _, table = curated
    n = dict(table.group_by("subset").len().iter_rows())
    proc = run_trainer(["--data", str(ds), "--out", str(tmp_path / "run"), "--stages", "1:1,1+2:1,1+2+3:1",
                        "--batch-size", "32", "--batch-quota", "16,8,8", *QUICK])
    epochs = re.findall(r"epoch (\d): (\d+) entries, (\d+) batches", proc.stdout)
    assert [(int(e), int(m)) for e, m, _ in epochs] == [(0, n[1]), (1, n[1] + n[2]), (2, n[1] + n[2] + n[3])]
    # a stage's absent subsets give their quota to the others: 32 / 21 + 11 / 16 + 8 + 8 from subsets 1 / 2 / 3
    assert share_quota((16, 8, 8), [n[1]]) == (32, 0, 0) and share_quota((16, 8, 8), [n[1], n[2]]) == (21, 11, 0)
    assert [int(b) for _, _, b in epochs] == [-(-n[1] // 32), -(-n[1] // 21), -(-n[1] // 16)]
