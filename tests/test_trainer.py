"""The trainer on a real 10-class set (scikit-learn's handwritten digits as colour JPEGs)."""
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from _train import (
    QUICK,
    ROOT,
    SYNTH_CLASSES,
    SYNTH_MISSING,
    SYNTH_ROWS,
    run_trainer,
    synthetic_labels,
    synthetic_rows,
)

from trainer.aum import MarginAccumulator, margins, threshold_samples, write_margins
from trainer.metrics import accuracy_report, class_averaged, topk_hits
from wvdata import build, open_dataset
from wvdata.stream import loader, normalize
from wvdata.synth import make_digits_folder
from wvdata.views import view

COMMON = QUICK


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    base = tmp_path_factory.mktemp("digits")
    make_digits_folder(base / "src")
    build(base / "src", base / "ds", shard_samples=256, workers=1, progress=False)
    view(base / "ds", "small", per_class=24)  # 240 entries for the quick runs
    return base / "ds"


_run = run_trainer


def test_ddp_two_ranks_learns_digits_and_writes_the_run_directory(digits, tmp_path):
    out = tmp_path / "run"
    _run(["--data", str(digits), "--out", str(out), "--epochs", "3", "--batch-size", "32", "--lr", "0.8",
          "--aum", "--ema-decay", "0", *COMMON], nproc=2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for field in ("train_loss", "lr", "images_per_sec", "val_top1", "val_top5", "val_class_top1", "val_class_top5"):
        assert field in metrics[-1]
    assert metrics[-1]["val_top1"] >= 0.6, metrics  # chance is 0.1
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["hardware"]["world_size"] == 2 and config["versions"]["torch"]
    scores = np.load(out / "scores" / "val.npy")
    keys = pl.read_parquet(out / "scores" / "val_keys.parquet")["key"]
    assert scores.dtype == np.float16 and scores.shape == (keys.len(), 10)
    assert np.allclose(scores.astype(np.float32).sum(1), 1, atol=1e-2)
    margins_ = pl.read_parquet(out / "margins" / "epoch-002.parquet")
    assert set(margins_.columns) == {"key", "label", "margin", "count"}
    assert margins_.height == pl.read_parquet(digits / "train" / "samples.parquet").height  # every sample seen
    assert (margins_["count"] >= 1).all()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "loader", "rng"} <= set(ckpt) and ckpt["epoch"] == 3
    # the last epoch's val metrics and the score file are those of the final model, computed directly
    direct = _direct_scores(digits, out / "checkpoint.pt", (32,), 1)
    np.testing.assert_allclose(scores.astype(np.float32), direct, atol=2e-3)
    want = accuracy_report(direct, pl.read_parquet(digits / "val" / "samples.parquet")["label"].to_numpy())
    assert {k: metrics[-1][f"val_{k}"] for k in want} == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_mid_epoch_gives_the_same_weights(digits, tmp_path, nproc):
    """... and the same AUM margins: the sums of every rank up to the stop are kept once."""
    args = ["--data", str(digits), "--view", "small", "--epochs", "2", "--batch-size", "16", "--lr", "0.2",
            "--eval-sizes", "32", "--aum", *COMMON]
    _run([*args, "--out", str(tmp_path / "a")], nproc)
    _run([*args, "--out", str(tmp_path / "b"), "--stop-after-steps", "5"], nproc)
    mid = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert mid["epoch"] == 0 and mid["loader"][0]["batch"] == 5  # stopped inside the first epoch
    _run([*args, "--out", str(tmp_path / "b"), "--resume"], nproc)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for epoch in (0, 1):  # epoch 0 was stopped and resumed
        ma, mb = (pl.read_parquet(tmp_path / r / "margins" / f"epoch-{epoch:03d}.parquet") for r in "ab")
        assert ma.height == 240 and ma.equals(mb), epoch


def test_dali_loader_trains_an_epoch_on_cpu(digits, tmp_path):
    out = tmp_path / "dali"
    _run(["--data", str(digits), "--view", "small", "--out", str(out), "--epochs", "1", "--batch-size", "32",
          "--loader", "dali", "--aum-threshold-samples", *COMMON])
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert metrics["epoch"] == 0 and np.isfinite(metrics["train_loss"])
    fake = pl.read_parquet(out / "margins" / "threshold.parquet")
    n = pl.read_parquet(digits / "train" / "samples.parquet").height
    assert fake.height == n // 11 and (fake["fake_label"] == 10).all()
    assert np.load(out / "scores" / "val.npy").shape[1] == 10  # scores over the real classes only


def test_curriculum_stages_need_the_curriculum_table(digits, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(digits), "--out",
                           str(tmp_path / "c"), "--stages", "1:1,1+2:1", *COMMON], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "wvdata curriculum" in proc.stderr


def test_class_averaged_metrics_by_hand():
    # 3 classes; class 0 has 4 rows (3 right), class 1 has 1 row (wrong), class 2 has 1 row (right)
    scores = np.array([[.9, .05, .05], [.8, .1, .1], [.7, .2, .1], [.1, .8, .1], [.6, .3, .1], [.1, .1, .8]])
    labels = np.array([0, 0, 0, 0, 1, 2])
    hits = topk_hits(scores, labels, 1)
    assert hits.tolist() == [True, True, True, False, False, True]
    assert class_averaged(hits, labels) == pytest.approx((3 / 4 + 0 + 1) / 3)
    rep = accuracy_report(scores, labels)
    assert rep["top1"] == pytest.approx(4 / 6) and rep["class_top1"] == pytest.approx(7 / 12)
    assert topk_hits(scores, labels, 2).tolist() == [True, True, True, True, True, True]


def test_aum_margins_against_direct_computation():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 2.5], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    assert margins(logits, labels).tolist() == pytest.approx([1.0, -0.5, 0.0])
    acc = MarginAccumulator(5, torch.device("cpu"))
    acc.add(logits, labels, torch.tensor([4, 1, 4]))
    acc.add(logits[:1], labels[:1], torch.tensor([1]))
    ids, mean, count = acc.result()
    assert ids.tolist() == [1, 4] and count.tolist() == [2, 2]
    assert mean.tolist() == pytest.approx([(-0.5 + 1.0) / 2, (1.0 + 0.0) / 2])


def test_threshold_samples_are_one_in_c_plus_one():
    ids = threshold_samples(1100, 10, seed=3)
    assert len(ids) == 100 and len(set(ids.tolist())) == 100
    assert np.array_equal(ids, threshold_samples(1100, 10, seed=3))
    assert not np.array_equal(ids, threshold_samples(1100, 10, seed=4))


def test_sigterm_checkpoints_mid_epoch_and_resume_continues(digits, tmp_path):
    out = tmp_path / "term"
    base = ["--data", str(digits), "--out", str(out), "--epochs", "50", "--batch-size", "8", "--lr", "0.1",
            *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *base], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # training is under way (50 epochs would take minutes)
        if line.startswith("epoch 0:"):
            break
    proc.send_signal(15)
    rest = proc.stdout.read()
    assert proc.wait(120) == 0, rest
    assert "stopped at epoch" in rest, rest
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    batch = ckpt["loader"][0]["batch"]
    assert ckpt["epoch"] < 50 and batch >= 1  # stopped inside an epoch, after at least one step
    more = _run([*base, "--resume", "--stop-after-steps", str(ckpt["steps"] + 3)])
    assert f"resuming at batch {batch}" in more.stdout
    again = torch.load(out / "checkpoint.pt", weights_only=False)
    assert again["steps"] == ckpt["steps"] + 3


# ---------------------------------------------------------------- evaluation at scale, margins


def direct_metrics(scores: np.ndarray, labels: np.ndarray, missing=()) -> dict:
    """top-k and class-averaged top-k by hand: a row is a hit if fewer than k classes score above its label's."""
    out = {}
    for k in (1, 5):
        above = (scores > scores[np.arange(len(labels)), labels.clip(0)][:, None]).sum(1)
        hit = above < k
        hit[list(missing)] = False
        keep = labels >= 0
        out[f"top{k}"] = hit[keep].mean()
        out[f"class_top{k}"] = np.mean([hit[keep & (labels == c)].mean() for c in np.unique(labels[keep])])
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_scores_and_metrics_equal_a_direct_computation(tmp_path, nproc):
    """2 eval sizes averaged, 37 rows over 2 ranks (one padding row, poisoned), one row never yielded: the score
    file is the float16 average row by row (zeros for the missing row) and the metrics match a direct count."""
    run_trainer([str(tmp_path)], nproc=nproc, module="tests._train")
    ids = np.arange(SYNTH_ROWS)
    want = (synthetic_rows(ids, 0) + synthetic_rows(ids, 1)) / 2
    want[SYNTH_MISSING] = 0
    got = np.load(tmp_path / "scores" / "val.npy")
    assert got.dtype == np.float16 and got.shape == (SYNTH_ROWS, SYNTH_CLASSES)
    assert np.array_equal(got, want.astype(np.float16))  # the poisoned padding row was dropped, not kept
    np.save(tmp_path / "direct.npy", want.astype(np.float16))
    assert (tmp_path / "scores" / "val.npy").read_bytes() == (tmp_path / "direct.npy").read_bytes()
    report = json.loads((tmp_path / "metrics.json").read_text())
    labels = synthetic_labels()
    direct = direct_metrics(want, labels, missing=[SYNTH_MISSING])
    assert report.keys() == direct.keys()
    for k in report:
        assert report[k] == pytest.approx(direct[k], abs=1e-12), k
    assert not list((tmp_path / ".eval").iterdir())  # the part files are gone


def test_accuracy_report_in_chunks_of_a_memory_mapped_float16_file(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.random((1000, 30)).astype(np.float16)
    labels = rng.integers(-1, 30, 1000)
    np.save(tmp_path / "s.npy", scores)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    whole = accuracy_report(scores.astype(np.float32), labels, chunk_rows=10**6)
    assert accuracy_report(mapped, labels, chunk_rows=64) == whole
    keep = labels >= 0
    hits = topk_hits(scores[keep].astype(np.float32), labels[keep], 5)
    assert whole["top5"] == hits.mean()
    per_class = [hits[labels[keep] == c].mean() for c in np.unique(labels[keep])]
    assert whole["class_top5"] == pytest.approx(np.mean(per_class), abs=1e-12)


@pytest.mark.parametrize("seen", [1.0, 0.6])
def test_margins_file_as_the_trainer_wrote_it_before(tmp_path, seen):
    """write_margins gives the table the trainer's earlier code gave (keys gathered by sample id, then polars)."""
    n = 500
    rng = np.random.default_rng(1)
    keys = pl.Series("key", [f"train/{i % 7}/{i:05d}.jpg" for i in range(n)])
    labels = rng.integers(0, 11, n)
    acc = MarginAccumulator(n, torch.device("cpu"))
    ids = torch.from_numpy(np.sort(rng.permutation(n)[:int(seen * n)]))
    for _ in range(2):  # two visits per sample, as with padding or resampling
        acc.add(torch.from_numpy(rng.normal(size=(len(ids), 11))), torch.from_numpy(labels)[ids], ids)
    write_margins(acc, tmp_path / "margins" / "epoch-000.parquet", keys, labels, rank=0)
    got = pl.read_parquet(tmp_path / "margins" / "epoch-000.parquet")
    old_ids, mean, count = acc.result()
    before = pl.DataFrame({"key": keys.gather(old_ids), "label": labels[old_ids], "margin": mean, "count": count})
    assert got.equals(before) and got.height == len(ids) and got.schema == before.schema
    assert got["margin"].dtype == pl.Float32 and (got["count"] == 2).all()


def _direct_scores(ds_path, model_file, sizes, crops):
    """The softmax of a checkpoint's model over val, averaged over sizes and crops, one process, in sample order."""
    import timm

    ds = open_dataset(ds_path)
    model = timm.create_model("test_resnet", num_classes=ds.num_classes)
    model.load_state_dict(torch.load(model_file, weights_only=False)["model"])
    model.eval()
    total = np.zeros((ds.samples("val").height, ds.num_classes), np.float32)
    with torch.no_grad():
        for size in sizes:
            for images, _, _, ids in loader(ds, "val", batch_size=50, train=False, image_size=size, eval_crops=crops,
                                            num_workers=1, with_index=True):
                x = normalize(images)
                c = x.shape[1] if x.dim() == 5 else 1
                p = model(x.flatten(0, 1) if x.dim() == 5 else x).softmax(1).view(-1, c, ds.num_classes).mean(1)
                total[ids.numpy()] += p.numpy()
    return total / len(sizes)


@pytest.mark.slow  # about 2 minutes on 2 cores; test_eval_scores_and_metrics_equal_a_direct_computation[2]
# covers 2 ranks in the default suite
def test_scores_one_rank_equal_two_ranks_multi_size_multi_crop(digits, tmp_path):
    """A seeded model scored (--epochs 0) with 2 sizes x 5 crops: 1 rank and 2 ranks (val padded) write the same
    rows for the same keys, equal to a direct computation; rows are averages (sum to 1)."""
    import timm

    torch.manual_seed(0)
    timm_model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        timm_model.get_classifier().weight.mul_(30)  # confident rows, different from image to image
    torch.save({"model": timm_model.state_dict()}, tmp_path / "model.pt")
    n = pl.read_parquet(digits / "val" / "samples.parquet").height
    assert n % 2  # 2 ranks need a padding row
    args = ["--data", str(digits), "--epochs", "0", "--pretrained-file", str(tmp_path / "model.pt"),
            "--eval-sizes", "32,40", "--eval-crops", "5", "--batch-size", "50", *COMMON]
    for nproc in (1, 2):
        run_trainer([*args, "--out", str(tmp_path / f"r{nproc}")], nproc=nproc)
    one, two = (np.load(tmp_path / f"r{p}" / "scores" / "val.npy") for p in (1, 2))
    keys = pl.read_parquet(tmp_path / "r1" / "scores" / "val_keys.parquet")["key"]
    assert keys.equals(pl.read_parquet(tmp_path / "r2" / "scores" / "val_keys.parquet")["key"])
    assert keys.equals(pl.read_parquet(digits / "val" / "samples.parquet")["key"])
    direct = _direct_scores(digits, tmp_path / "model.pt", (32, 40), 5)
    assert one.shape == two.shape == direct.shape == (n, 10)
    assert np.median(np.abs(direct[1:] - direct[:-1]).max(1)) > 0.05  # rows differ: a misaligned one would show
    np.testing.assert_allclose(one.astype(np.float32), direct, atol=2e-3)
    np.testing.assert_allclose(two.astype(np.float32), direct, atol=2e-3)
    np.testing.assert_allclose(one.astype(np.float32).sum(1), 1, atol=1e-2)
    assert not (tmp_path / "r2" / ".eval").exists()
