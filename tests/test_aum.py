"""`wvdata aum` on real training runs (digits with 20% flipped labels) and on hand-written margins."""
from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import polars as pl
import pytest
from _train import run_trainer
from PIL import Image
from sklearn.metrics import roc_auc_score

from trainer.aum import threshold_samples
from wvdata.aum import aum, compute_aum, format_summary
from wvdata.cli import main
from wvdata.views import load_view, select, view

# the recipe of the shared `noisy_digits_run` fixture (conftest.py), minus --aum
RECIPE = ["--model", "test_resnet", "--epochs", "12", "--batch-size", "32", "--lr", "0.8", "--image-size", "32",
          "--randaug", "0,0", "--workers", "2", "--warmup-epochs", "0.3", "--no-progress"]


@pytest.fixture(scope="module")
def ds(noisy_digits, tmp_path_factory):
    """A writable copy of the shared noisy digits dataset (the tests write aum.parquet and views)."""
    out = tmp_path_factory.mktemp("aum_ds") / "ds"
    shutil.copytree(noisy_digits[0], out)
    return out


@pytest.fixture(scope="module")
def threshold_run(noisy_digits, tmp_path_factory):
    """The same recipe with threshold samples (a fake 11th class): about a minute on 2 cores. Shorter runs
    (8 epochs) leave the flipped and the threshold samples' AUMs too close for the 99th percentile."""
    out = tmp_path_factory.mktemp("aum_thr") / "run"
    run_trainer(["--data", str(noisy_digits[0]), "--out", str(out), *RECIPE, "--aum-threshold-samples"])
    return out


def _flipped(table: pl.DataFrame, truth: dict[str, bool]) -> np.ndarray:
    return np.array([truth[k] for k in table["key"]])


def test_aum_separates_flipped_labels(noisy_digits, noisy_digits_run):
    res = compute_aum(noisy_digits[0], [noisy_digits_run])
    t = res.table
    assert t.columns == ["key", "label", "aum", "n_epochs", "flagged"]
    assert t.height == len(noisy_digits[1]) and t["aum"].null_count() == 0 and (t["n_epochs"] == 11).all()
    flipped = _flipped(t, noisy_digits[1])
    auroc = roc_auc_score(flipped, -t["aum"].to_numpy())
    assert auroc >= 0.9, auroc
    flagged = t["flagged"].to_numpy()  # default rule without threshold samples: the lowest 20%
    print(f"AUROC {auroc:.3f}; lowest 20%: precision {flipped[flagged].mean():.2f}, "
          f"recall {flagged[flipped].mean():.2f} ({flipped.mean():.1%} flipped)")
    assert flagged.sum() == round(0.2 * t.height) and flipped[flagged].mean() >= 0.7
    assert "lowest 20%" in format_summary(res)


def test_fixed_fraction_and_views_on_the_written_table(ds, noisy_digits_run, tmp_path, capsys):
    t = aum(ds, [noisy_digits_run], drop_fraction=0.2)
    assert pl.read_parquet(ds / "annotations" / "aum.parquet").equals(t)
    n, n_flag = t.height, int(t["flagged"].sum())
    assert n_flag == round(0.2 * n)
    assert t.filter("flagged")["aum"].max() <= t.filter(~pl.col("flagged"))["aum"].min()
    kept = set(t.filter(~pl.col("flagged"))["key"])
    assert set(select(ds, drop_aum=0.2)["key"]) == kept  # the view's --drop-aum is the same rule
    assert set(select(ds, drop_aum_flagged=True)["key"]) == kept
    cut = float(t["aum"].median())
    assert set(select(ds, aum_below=cut)["key"]) == set(t.filter(pl.col("aum") >= cut)["key"])

    pc = aum(ds, [noisy_digits_run], drop_fraction=0.2, per_class=True)
    per = pc.group_by("label").agg(pl.len().alias("n"), pl.col("flagged").sum().alias("f"),
                                   pl.col("aum").filter("flagged").max().alias("hi"),
                                   pl.col("aum").filter(~pl.col("flagged")).min().alias("lo"))
    assert (per["f"] == (per["n"] * 0.2).round()).all() and (per["hi"] <= per["lo"]).all()
    assert main(["view", str(ds), "clean", "--drop-aum-flagged"]) == 0  # the per-class flags drive a view
    assert len(load_view(ds, "clean")) == pc.height - int(pc["flagged"].sum())
    capsys.readouterr()

    report = tmp_path / "aum.png"
    assert main(["aum", str(ds), "--run", str(noisy_digits_run), "--drop-fraction", "0.1", "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    assert "10.0% of those with an AUM" in out and "most-flagged classes:" in out and "wrote" in out
    with Image.open(report) as img:
        assert img.format == "PNG" and img.width > 700 and img.height > 600  # histogram + 6 rows of images
    html = tmp_path / "aum.html"
    assert main(["aum", str(ds), "--runs", str(noisy_digits_run), "--report", str(html)]) == 0
    assert html.read_text().count("data:image/") > 10


def test_threshold_rule_flags_mostly_flipped_samples(noisy_digits, threshold_run):
    res = compute_aum(noisy_digits[0], [threshold_run])  # every run has threshold samples: 99th percentile
    t = res.table
    fake = pl.read_parquet(threshold_run / "margins" / "threshold.parquet")
    assert fake.height == t.height // 11
    thr = t.filter(pl.col("key").is_in(fake["key"].implode()))
    assert thr["aum"].null_count() == thr.height and not thr["flagged"].any()  # judged by no run
    judged = t.filter(pl.col("aum").is_not_null())
    flipped, flagged = _flipped(judged, noisy_digits[1]), judged["flagged"].to_numpy()
    precision, recall = flipped[flagged].mean(), flagged[flipped].mean()
    print(f"threshold rule p99: {flagged.sum()} flagged, precision {precision:.2f}, recall {recall:.2f}")
    # 20% of the samples are flipped: the rule flags at >= 2x that base rate and finds most of them. (0.45, not
    # 0.5: at 64 px the same run gave 0.498 / 0.94 on one machine and 0.59 / 0.95 on another, same code and
    # seed; at 32 px it gives 0.72 / 0.94 here)
    assert precision >= 0.45 and recall >= 0.85, (precision, recall)
    assert "99th percentile" in res.stats["rule"] and "AUM cut" in format_summary(res)
    p90 = compute_aum(noisy_digits[0], [threshold_run], threshold_percentile=90).table
    flagged = p90.filter(pl.col("aum").is_not_null())["flagged"].to_numpy()  # the same rows as `judged`
    print(f"threshold rule p90: {flagged.sum()} flagged, precision {flipped[flagged].mean():.2f}, "
          f"recall {flagged[flipped].mean():.2f}")
    assert flipped[flagged].mean() >= 0.6 and flagged[flipped].mean() >= 0.75  # 0.83 / 0.89 here (see above)


# ---------------------------------------------------------------- hand-written runs


def _dataset(root, n: int = 12, classes: int = 3):
    """A dataset directory with only what `wvdata aum` reads: dataset.json and train/samples.parquet."""
    (root / "train").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"format": "wvdata", "version": 1,
                                                   "classes": [f"c{i}" for i in range(classes)],
                                                   "splits": {"train": {"shards": []}}}))
    keys = [f"train_s{i:03d}" for i in range(n)]
    pl.DataFrame({"key": keys, "label": [i % classes for i in range(n)]}).write_parquet(
        root / "train" / "samples.parquet")
    return root, keys


def _run(root, keys, labels, margins_by_epoch, threshold=None, fake=3):
    """A run directory: epoch-NNN.parquet per epoch (same margins list order as keys)."""
    (root / "margins").mkdir(parents=True)
    threshold = threshold or []
    trained = [fake if k in threshold else lab for k, lab in zip(keys, labels)]
    for e, m in enumerate(margins_by_epoch):
        pl.DataFrame({"key": keys, "label": trained, "margin": pl.Series(m, dtype=pl.Float32),
                      "count": [1] * len(keys)}).write_parquet(root / "margins" / f"epoch-{e:03d}.parquet")
    if threshold:
        pl.DataFrame({"key": threshold, "label": [labels[keys.index(k)] for k in threshold],
                      "fake_label": fake}).write_parquet(root / "margins" / "threshold.parquet")
    (root / "config.json").write_text(json.dumps({"args": {"data": "elsewhere", "aum": True}}))
    return root


def test_two_runs_with_disjoint_threshold_sets(tmp_path):
    root, keys = _dataset(tmp_path / "ds", n=8, classes=3)
    labels = [i % 3 for i in range(8)]
    # run a: threshold samples s0, s1 (AUMs -3, -1: 50th percentile -2); run b: s2, s3 (AUMs -4, 0: cut -2)
    a = [-3, -1, -5, 1, -6, -7, 2, -2.5]
    b = [-9, -6, -4, 0, -8, 3, -3, 5]
    run_a = _run(tmp_path / "a", keys, labels, [[99] * 8, a, a], threshold=keys[:2])
    run_b = _run(tmp_path / "b", keys, labels, [[99] * 8, b, b], threshold=keys[2:4])
    t = compute_aum(root, [run_a, run_b], threshold_percentile=50).table
    # s0, s1: judged by b only (-9, -6 < -2); s2, s3: by a only (-5 < -2, 1 >= -2); s4: both low;
    # s5: low in a only; s6: low in b only (-3 < -2 but 2 in a); s7: low in a (-2.5), not in b (5)
    assert t["flagged"].to_list() == [True, True, True, False, True, False, False, False]
    assert t["aum"].to_list() == pytest.approx([-9, -6, -5, 1, -7, -2, -0.5, 1.25])
    assert t["n_epochs"].to_list() == [2, 2, 2, 2, 4, 4, 4, 4]  # epoch 0 skipped
    one = compute_aum(root, [run_a], threshold_percentile=50).table  # a alone: its threshold samples get no AUM
    assert one["aum"].to_list()[:2] == [None, None] and one["n_epochs"].to_list()[:2] == [0, 0]
    assert one["flagged"].to_list() == [False, False, True, False, True, True, False, True]
    assert compute_aum(root, [run_a, run_b]).stats["threshold_percentile"] == 99  # the default with threshold runs
    # the CLI: --runs and --run both repeatable
    assert main(["aum", str(root), "--runs", str(run_a), "--run", str(run_b), "--threshold-percentile",
                 "50"]) == 0
    assert pl.read_parquet(root / "annotations" / "aum.parquet")["flagged"].to_list() == t["flagged"].to_list()


def test_threshold_parts_are_disjoint_halves():
    n, c = 10_000, 9
    a, b = threshold_samples(n, c, seed=1, part=0), threshold_samples(n, c, seed=7, part=1)
    assert len(a) == len(b) == n // (c + 1) and not set(a.tolist()) & set(b.tolist())
    assert np.array_equal(a, threshold_samples(n, c, seed=1, part=0))
    assert not np.array_equal(a, threshold_samples(n, c, seed=2, part=0))  # the draw within a half is seeded
    assert np.array_equal(threshold_samples(n, c, seed=3), threshold_samples(n, c, seed=3, part=None))


def test_trainer_threshold_part_flag(noisy_digits, tmp_path):
    """`--aum-threshold-part 1` reaches the trainer: its threshold.parquet lists half 1's draw (one quick epoch)."""
    out = tmp_path / "part1"
    run_trainer(["--data", str(noisy_digits[0]), "--out", str(out), "--model", "test_resnet", "--epochs", "1",
                 "--batch-size", "64", "--image-size", "32", "--randaug", "0,0", "--workers", "2", "--no-progress",
                 "--aum-threshold-samples", "--aum-threshold-part", "1", "--seed", "3"])
    samples = pl.read_parquet(noisy_digits[0] / "train" / "samples.parquet")
    want = samples["key"].gather(threshold_samples(samples.height, 10, seed=3, part=1))
    assert pl.read_parquet(out / "margins" / "threshold.parquet")["key"].to_list() == want.to_list()
    assert json.loads((out / "config.json").read_text())["args"]["aum_threshold_part"] == 1
    assert "part 1" in format_summary(compute_aum(noisy_digits[0], [out], skip_epochs=0))


def test_a_run_on_a_view_leaves_the_rest_unscored(tmp_path):
    root, keys = _dataset(tmp_path / "ds", n=10, classes=2)
    labels = [i % 2 for i in range(10)]
    half = keys[:6]  # the run trained on a view of 6 samples
    run = _run(tmp_path / "r", half, labels[:6], [[0] * 6, [-2, -1, 0, 1, 2, 3]])
    t = compute_aum(root, [run], drop_fraction=0.5).table
    assert t["n_epochs"].to_list() == [1] * 6 + [0] * 4 and t["aum"].null_count() == 4
    assert t["flagged"].to_list() == [True, True, True] + [False] * 7  # half of the 6 scored


def test_ties_are_broken_by_key_like_the_view(tmp_path):
    root, keys = _dataset(tmp_path / "ds", n=10, classes=2)
    labels = [i % 2 for i in range(10)]
    run = _run(tmp_path / "r", keys[::-1], labels[::-1], [[0] * 10, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    t = aum(root, [run], drop_fraction=0.3)  # AUM 0 for s000-s004 (tied), 1 for the rest
    assert t.filter("flagged")["key"].to_list() == keys[:3]
    assert set(select(root, drop_aum=0.3)["key"]) == set(keys[3:])
    pc = compute_aum(root, [run], drop_fraction=0.4, per_class=True).table  # 2 of 5 per class
    assert pc.filter("flagged")["key"].to_list() == [keys[0], keys[1], keys[2], keys[3]]


def test_key_mapping_survives_hash_collisions(tmp_path, monkeypatch):
    """Keys map to samples by a 64-bit hash join checked by a second hash; collisions change nothing."""
    seeds = importlib.import_module("wvdata.aum")._SEEDS  # (`wvdata.aum` the attribute is the function)
    root, keys = _dataset(tmp_path / "ds", n=10, classes=2)
    labels = [i % 2 for i in range(10)]
    order = keys[::-1][:7]  # a run over 7 samples in another order: the join path
    run = _run(tmp_path / "r", order, [labels[keys.index(k)] for k in order], [[0] * 7, list(range(7))])
    want = compute_aum(root, [run], drop_fraction=0.2).table
    assert want["aum"].to_list() == [None] * 3 + [6, 5, 4, 3, 2, 1, 0]
    foreign = ["train_x005"] + order[1:]
    stranger = _run(tmp_path / "s", foreign, [labels[keys.index(k)] for k in order], [[0] * 7, [1] * 7])
    real = pl.Series.hash

    def first_by_suffix(self, seed=0, *args):  # the join hash: "train_x005" collides with "train_s005"
        return self.str.slice(-3).cast(pl.UInt64) if seed == seeds[0] else real(self, seed, *args)

    monkeypatch.setattr(pl.Series, "hash", first_by_suffix)
    assert compute_aum(root, [run], drop_fraction=0.2).table.equals(want)
    with pytest.raises(ValueError, match="1 keys are not samples of split"):
        compute_aum(root, [stranger])
    monkeypatch.setattr(pl.Series, "hash", lambda self, *a: pl.Series([7] * len(self), dtype=pl.UInt64))
    assert compute_aum(root, [run], drop_fraction=0.2).table.equals(want)  # the split's keys collide: by string
    with pytest.raises(ValueError, match="1 keys are not samples of split"):
        compute_aum(root, [stranger])


def test_bad_inputs_are_clear_one_line_errors(noisy_digits, noisy_digits_run, tmp_path, capsys):
    root, keys = _dataset(tmp_path / "ds", n=6, classes=2)
    labels = [i % 2 for i in range(6)]
    good = _run(tmp_path / "good", keys, labels, [[0] * 6, [1] * 6])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_aum(root, [tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="has no margins"):
        compute_aum(root, [tmp_path / "empty"])
    (tmp_path / "empty" / "margins").mkdir()
    with pytest.raises(FileNotFoundError, match="epoch-NNN"):
        compute_aum(root, [tmp_path / "empty"])
    with pytest.raises(ValueError, match="before --skip-epochs 5"):
        compute_aum(root, [good], skip_epochs=5)
    stranger = _run(tmp_path / "stranger", keys[:5] + ["train_zzz"], labels, [[0] * 6, [1] * 6])
    with pytest.raises(ValueError, match="1 keys are not samples of split 'train'.*another dataset"):
        compute_aum(root, [good, stranger])
    with pytest.raises(ValueError, match="not samples of split.*another dataset"):  # runs over other datasets
        compute_aum(noisy_digits[0], [noisy_digits_run, good])
    relabelled = _run(tmp_path / "relabelled", keys, [1 - x for x in labels], [[0] * 6, [1] * 6])
    with pytest.raises(ValueError, match="trained on labels other than the dataset's"):
        compute_aum(root, [relabelled])
    nan = _run(tmp_path / "nan", keys, labels, [[0] * 6, [float("nan")] + [1] * 5])
    with pytest.raises(ValueError, match="1 non-finite margins"):
        compute_aum(root, [nan])
    twice = _run(tmp_path / "twice", keys + keys[:1], labels + labels[:1], [[0] * 7, [1] * 7])
    with pytest.raises(ValueError, match="more than once"):
        compute_aum(root, [twice])
    with pytest.raises(ValueError, match="given twice"):
        compute_aum(root, [good, tmp_path / "good"])
    with pytest.raises(ValueError, match="needs runs trained with --aum-threshold-samples"):
        compute_aum(root, [good], threshold_percentile=99)
    with pytest.raises(ValueError, match="per_class applies to drop_fraction only"):
        compute_aum(root, [good], threshold_percentile=99, per_class=True)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\)"):
        compute_aum(root, [good], drop_fraction=1.5)
    capsys.readouterr()
    assert main(["aum", str(root), "--runs", str(stranger)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wvdata aum: error: run ") and err.count("\n") == 1, err
    assert not (root / "annotations" / "aum.parquet").exists()  # nothing written on error


# ---------------------------------------------------------------- the retrain that shows the gain


@pytest.mark.slow
def test_retrain_without_the_lowest_aum_beats_training_on_everything(ds, noisy_digits, tmp_path):
    """The WebVision 2020 recipe on digits with 20% flipped labels: class-balanced sampling (144 entries per
    class and epoch, so both runs take the same steps), AUM from the first run, the 20% lowest dropped, the
    same recipe and seed again on the rest; clean val accuracy compared (two runs, about 2.5 minutes)."""
    recipe = [*RECIPE, "--per-class", "144"]
    run_trainer(["--data", str(ds), "--out", str(tmp_path / "all"), *recipe, "--aum"])
    t = aum(ds, [tmp_path / "all"], drop_fraction=0.2)
    flipped = _flipped(t, noisy_digits[1])
    view(ds, "aum80", drop_aum_flagged=True)
    run_trainer(["--data", str(ds), "--view", "aum80", "--out", str(tmp_path / "aum80"), *recipe])
    base, new = ({k: v for k, v in json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1]).items()
                  if k.startswith("val_")} for r in ("all", "aum80"))
    print(f"retrain: AUROC {roc_auc_score(flipped, -t['aum'].to_numpy()):.3f}; flipped share {flipped.mean():.3f} "
          f"of all {t.height} -> {flipped[~t['flagged'].to_numpy()].mean():.3f} of the view "
          f"({t.height - int(t['flagged'].sum())}); all samples {base} -> without the lowest-AUM 20% {new}")
    assert new["val_top1"] > base["val_top1"] and new["val_class_top1"] > base["val_class_top1"]
