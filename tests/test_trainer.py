"""The trainer on a real 10-class set (scikit-learn's handwritten digits as colour JPEGs)."""
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from _train import QUICK, ROOT, run_trainer

from trainer.aum import MarginAccumulator, margins, threshold_samples
from trainer.metrics import accuracy_report, class_averaged, topk_hits
from wvdata import build
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


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_mid_epoch_gives_the_same_weights(digits, tmp_path, nproc):
    args = ["--data", str(digits), "--view", "small", "--epochs", "2", "--batch-size", "16", "--lr", "0.2",
            "--eval-sizes", "32", *COMMON]
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
