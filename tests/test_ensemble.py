"""The ensembler (trainer/ensemble.py): synthetic score files of known quality keyed by the noisy-digits
val split, and a real end-to-end fusion of three short CPU trainings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import wvdata
from trainer import ensemble as E
from trainer.metrics import accuracy_report, class_averaged, topk_hits

C = 10


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_run(root: Path, probs: np.ndarray, keys: np.ndarray, split: str = "val") -> Path:
    """A run directory holding only scores/{split}.npy (float16) + {split}_keys.parquet, as the trainer writes."""
    d = root / "scores"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / f"{split}.npy", probs.astype(np.float16))
    pl.DataFrame({"key": keys}).write_parquet(d / f"{split}_keys.parquet")
    return root


@pytest.fixture(scope="module")
def val(noisy_digits):
    """(dataset dir, val keys, val labels) of the shared noisy-digits dataset (359 val images, 10 classes)."""
    v = wvdata.open_dataset(noisy_digits[0]).samples("val")
    return noisy_digits[0], v["key"].to_numpy(), v["label"].to_numpy()


def synthetic(labels: np.ndarray, seed: int = 0, n_test: int = 0) -> dict[str, np.ndarray]:
    """Two strong models and six weak ones whose mistakes are correlated (a decoy pattern shared per
    image): the plain average is dragged towards the decoys, a good weighting is not."""
    rng = np.random.default_rng(seed)
    n = len(labels) + n_test
    onehot = np.eye(C)[np.concatenate([labels, rng.integers(0, C, n_test)])]
    decoy = rng.normal(size=(n, C)) * 2.0
    out = {f"strong{j}": softmax(3.0 * onehot + rng.normal(size=(n, C)) * 1.2) for j in range(2)}
    out.update({f"weak{j}": softmax(1.0 * onehot + decoy + rng.normal(size=(n, C)) * 0.7) for j in range(6)})
    return out


@pytest.fixture(scope="module")
def synth_runs(val, tmp_path_factory):
    """The synthetic models as run directories (val rows in the dataset's order, weak1's shuffled),
    plus test scores for 40 made-up test keys: (runs dir, {name: val probs}, test keys, {name: test probs})."""
    _, keys, labels = val
    root = tmp_path_factory.mktemp("synth") / "runs"
    test_keys = np.array([f"test_{i:03d}" for i in range(40)])
    models = synthetic(labels, n_test=len(test_keys))
    rng = np.random.default_rng(1)
    for name, p in models.items():
        order = rng.permutation(len(keys)) if name == "weak1" else np.arange(len(keys))
        write_run(root / name, p[:len(keys)][order], keys[order])
        write_run(root / name, p[len(keys):], test_keys, "test")
    return (root, {k: p[:len(keys)] for k, p in models.items()}, test_keys,
            {k: p[len(keys):] for k, p in models.items()})


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = E.main([*args, "--no-progress"])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_ga_favours_the_strong_models_and_beats_the_average(val, synth_runs, tmp_path, capsys):
    ds, keys, labels = val
    runs, probs, test_keys, test_probs = synth_runs
    out = tmp_path / "ens"
    code, stdout, err = cli(["--runs", f"{runs}/*", "--data", str(ds), "--out", str(out), "--generations", "15"],
                            capsys)
    assert code == 0, err
    weights = json.loads((out / "weights.json").read_text())
    names = [f"strong{j}" for j in range(2)] + [f"weak{j}" for j in range(6)]
    assert list(weights) == names  # named relative to the runs' parent, in --runs (sorted glob) order
    assert sum(weights.values()) == pytest.approx(1)
    assert min(weights["strong0"], weights["strong1"]) > max(weights[f"weak{j}"] for j in range(6))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"models", "average", "ga"} and list(metrics["models"]) == names
    ga, avg = metrics["ga"], metrics["average"]
    assert ga["heldout_class_top5"] >= avg["heldout_class_top5"]
    assert ga["heldout_class_top1"] >= avg["heldout_class_top1"] + 0.3  # the decoys cost the average dearly
    best = max(m["heldout_class_top1"] for m in metrics["models"].values())
    assert ga["heldout_class_top1"] >= best  # and the weighting beats each model alone

    # the reported figures are those of the written scores, on the held-out half
    half = E.split_halves(labels, 0)
    fused = np.load(out / "val.npy")
    assert fused.dtype == np.float16 and fused.shape == (len(keys), C)
    assert (pl.read_parquet(out / "val_keys.parquet")["key"].to_numpy() == keys).all()
    w = np.array([weights[n] for n in names])
    expect = sum(wi * probs[n].astype(np.float16).astype(np.float32) for wi, n in zip(w, names))
    np.testing.assert_allclose(fused, expect, atol=2e-3)
    rep = accuracy_report(expect[half == 1], labels[half == 1])
    for k in ("top1", "top5", "class_top1", "class_top5"):
        assert ga[f"heldout_{k}"] == pytest.approx(rep[k])
    rep = accuracy_report(probs["weak1"][half == 1], labels[half == 1])  # the shuffled file, aligned by key
    assert metrics["models"]["weak1"]["heldout_class_top1"] == pytest.approx(rep["class_top1"], abs=0.01)
    # the table printed: one row per model and fusion, held-out percentages
    assert stdout.splitlines()[0].startswith(f"held-out half: {(half == 1).sum()} images")
    assert any(line.split()[:2] == ["ga", f"{100 * ga['heldout_top1']:.2f}"] for line in stdout.splitlines())

    # test: float16 scores, keys, and the top-5 class ids per key by fused score
    t16 = np.load(out / "test.npy")
    assert t16.shape == (len(test_keys), C)
    pred = pl.read_csv(out / "predictions.csv")
    assert pred.columns == ["key", "top1", "top2", "top3", "top4", "top5"]
    assert (pred["key"].to_numpy() == test_keys).all()
    top = pred.select("top1", "top2", "top3", "top4", "top5").to_numpy()
    expect = sum(wi * test_probs[n].astype(np.float16).astype(np.float32) for wi, n in zip(w, names))
    np.testing.assert_allclose(t16, expect, atol=2e-3)
    assert (top == np.argsort(-expect, axis=1)[:, :5]).mean() > 0.95  # float16 vs float64 sums: rare near-ties
    assert (top[:, 0] == expect.argmax(axis=1)).mean() > 0.95


def test_ga_is_deterministic_for_a_seed(val, synth_runs):
    runs = synth_runs[0]
    scores = E.load_scores([f"{runs}/*"], val[0])
    a = E.genetic_weights(scores, population=12, generations=6, seed=3)
    b = E.genetic_weights(scores, population=12, generations=6, seed=3)
    c = E.genetic_weights(scores, population=12, generations=6, seed=4)
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.history] for r in (a, b)]
    assert (a.weights == b.weights).all() and untimed[0] == untimed[1]
    assert not np.array_equal(a.weights, c.weights)
    # elitism: the best fitness never goes down, and generation 0 holds the plain average
    best = [(h["best_class_top5"], h["best_class_top1"]) for h in a.history]
    assert best == sorted(best) and len(best) == 7
    avg = E.reduced_fitness(scores).fitness(np.ones((1, 8)))[0]
    assert tuple(best[0]) >= tuple(avg)


@pytest.mark.parametrize("space", E.SPACES)
def test_reduced_fitness_is_exact(val, synth_runs, space):
    """Fitness on top-K candidates (+ bounds, + closing the open images) equals the dense count on the
    fused scores, ties included, even for K = 1 and 2 of 10 classes where most images need the
    exactness cases; it differs from trainer.metrics.topk_hits only where the label ties another class."""
    runs = synth_runs[0]
    labels = val[2]
    scores = E.load_scores([f"{runs}/*"], val[0])
    fit = np.flatnonzero(E.split_halves(labels, 0) == 0)
    lab = labels[fit]
    x = E.to_space(scores.read("val", fit), space)
    w = np.random.default_rng(0).random((10, 8)) ** 3  # skewed weights, many near zero
    w[0], w[1] = 1, [1, 0, 0, 0, 1, 1, 0, 0]  # the plain average, and exact zeros
    w /= w.sum(axis=1, keepdims=True)  # as the GA passes them
    dense = E.weighted_sum(x, w)
    reach = (dense >= np.take_along_axis(dense, lab[None, :, None], 2)).sum(axis=2) - 1
    want = np.stack([[class_averaged(r < k, lab) for k in (5, 1)] for r in reach])
    for k, budget in ((1, 4 << 30), (2, 4 << 30), (2, 0), (4, 4 << 30)):
        red = E.reduced_fitness(scores, space, k=k)
        red.closure_budget = budget
        assert (np.minimum(red.counts(w), 5) == np.minimum(reach, 5)).all(), (k, budget)  # exact up to 5
        np.testing.assert_allclose(red.fitness(w), want, rtol=0, atol=1e-12)
        assert red.stats["candidates_mean"] < 10
        if k <= 2:
            assert red.stats["reopened"] > 0  # the fallback was needed and exercised
        if budget == 0:
            assert red.stats["dense_rereads"] == red.stats["reopened"] and not red.closures
    tied = (dense == np.take_along_axis(dense, lab[None, :, None], 2)).sum(axis=2) > 1
    for r, d, t in zip(reach, dense, tied):
        assert (topk_hits(d, lab, 5)[~t] == (r < 5)[~t]).all()
    if space == "rank":
        assert tied[0].any()  # equal weights on integer ranks: ties happen, and the two paths agree on them


def test_spaces(val, tmp_path, capsys):
    """An over-confident weak model (temperature 1/8) dominates a probability average; per-image ranks
    are immune to the scale of its scores. logits/rank outputs have the documented form."""
    ds, keys, labels = val
    rng = np.random.default_rng(5)
    onehot = np.eye(C)[labels]
    for j in range(3):
        write_run(tmp_path / "runs" / f"good{j}", softmax(2.0 * onehot + rng.normal(size=(len(keys), C))), keys)
    write_run(tmp_path / "runs" / "loud", softmax(8 * (0.3 * onehot + rng.normal(size=(len(keys), C)))), keys)
    res = {}
    for space in E.SPACES:
        out = tmp_path / space
        code, _, err = cli(["--runs", str(tmp_path / "runs" / "*"), "--data", str(ds), "--out", str(out),
                            "--method", "average", "--space", space], capsys)
        assert code == 0, err
        res[space] = json.loads((out / "metrics.json").read_text())
        assert "ga" not in res[space] and not (out / "test.npy").exists()
        fused = np.load(out / "val.npy").astype(np.float32)
        if space == "rank":
            assert fused.min() >= 0 and fused.max() <= 1
        else:  # prob: the weighted mean of distributions; logits: softmax of the weighted mean log-probability
            np.testing.assert_allclose(fused.sum(axis=1), 1, atol=5e-3)
        assert json.loads((out / "weights.json").read_text()) == {n: 0.25 for n in ["good0", "good1", "good2", "loud"]}
    assert res["rank"]["average"]["heldout_class_top1"] > res["prob"]["average"]["heldout_class_top1"] + 0.05
    assert res["logits"]["models"] == res["prob"]["models"]  # per-model figures never depend on the space


def test_rank_space_by_hand():
    p = np.array([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]], np.float32)
    np.testing.assert_allclose(E.to_space(p, "rank"), [[0, 1, 0, 2 / 3], [0, 0, 0, 0]])
    np.testing.assert_allclose(E.to_space(np.array([[0.0, 1.0]]), "logits"), [[np.log(1e-7), 0]])


def test_halves_are_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [1, 2, 7, 10, 31])
    labels = np.concatenate([labels, [-1, -1]])
    a, b = E.split_halves(labels, 0), E.split_halves(labels, 1)
    assert (a[-2:] == -1).all() and set(a[:-2]) == {0, 1}
    for c in range(5):
        fit, held = (a[labels == c] == 0).sum(), (a[labels == c] == 1).sum()
        assert fit - held in (0, 1)
    assert (a == E.split_halves(labels, 0)).all() and (a != b).any()


def test_alignment_errors_name_the_file(val, synth_runs, tmp_path):
    ds, keys, labels = val
    runs, probs = synth_runs[:2]
    good = [str(runs / "strong0"), str(runs / "weak0")]
    p = probs["strong1"]
    write_run(tmp_path / "missing", p[1:], keys[1:])
    write_run(tmp_path / "classes", np.concatenate([p, p[:, :1]], axis=1), keys)
    train = wvdata.open_dataset(ds).samples("train")["key"].to_numpy()[:len(keys)]
    write_run(tmp_path / "split", p, train)
    write_run(tmp_path / "notest", p, keys)  # the other runs have test scores, this one has none
    cases = {"missing": "1 of the 359 val keys are missing", "classes": "11 classes, but the dataset has 10",
             "split": "its keys are the dataset's train split, not val", "notest": "test.npy is missing"}
    for name, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "trainer.ensemble", "--runs", *good, str(tmp_path / name),
                               "--data", str(ds), "--out", str(tmp_path / "out"), "--no-progress"],
                              capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert message in lines[0] and str(tmp_path / name / "scores") in lines[0], lines[0]
    for args, message in (([str(tmp_path / "nowhere")], "nowhere does not exist"),
                          ([f"{tmp_path}/zz*"], "the glob matches nothing"),
                          ([good[0], good[0]], "is given twice"),
                          ([good[0], f"strong0={runs / 'weak0'}"], "two models are named 'strong0'")):
        with pytest.raises(E.EnsembleError, match=message):
            E.load_scores(args, ds)
    scores = E.load_scores([f"a={good[0]}", f"b={good[1]}"], ds)
    assert scores.names == ["a", "b"] and "test" in scores.keys


def test_usage_errors_are_one_line(val, synth_runs, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        E.main(["--runs", str(synth_runs[0] / "strong0"), "--data", str(val[0]), "--out", "x", "--space", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice: 'bogus'" in err
    code, _, err = cli(["--runs", str(synth_runs[0] / "strong0"), "--data", str(tmp_path), "--out", "x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dataset.json not found" in err


def test_end_to_end_three_short_trainings(noisy_digits, noisy_digits_run, tmp_path, capsys):
    """The shared 12-epoch run plus two 3-epoch runs at 32 px with other seeds, fused by the CLI."""
    from _train import run_trainer

    ds = noisy_digits[0]
    runs = [noisy_digits_run]
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        run_trainer(["--data", str(ds), "--out", str(out), "--model", "test_resnet", "--image-size", "32",
                     "--epochs", "3", "--batch-size", "32", "--lr", "0.8", "--randaug", "0,0", "--workers", "1",
                     "--no-progress", "--warmup-epochs", "0.3", "--seed", str(seed)])
        runs.append(out)
    out = tmp_path / "ens"
    code, stdout, err = cli(["--runs", *map(str, runs), "--data", str(ds), "--out", str(out),
                             "--generations", "10", "--population", "16"], capsys)
    assert code == 0, err
    names = [f"{Path(r).parent.name}/{Path(r).name}" for r in runs]  # relative to their common parent
    metrics = json.loads((out / "metrics.json").read_text())
    weights = json.loads((out / "weights.json").read_text())
    assert list(weights) == names == list(metrics["models"])
    assert sum(weights.values()) == pytest.approx(1) and min(weights.values()) >= 0
    v = wvdata.open_dataset(ds).samples("val")
    labels, half = v["label"].to_numpy(), E.split_halves(v["label"].to_numpy(), 0)
    for r, name in zip(runs, names):  # per-model figures are the run's own scores on the held-out half
        own = accuracy_report(np.load(Path(r) / "scores" / "val.npy").astype(np.float32)[half == 1],
                              labels[half == 1])
        assert metrics["models"][name]["heldout_class_top1"] == pytest.approx(own["class_top1"])
    best = max(m["heldout_class_top1"] for m in metrics["models"].values())
    assert metrics["ga"]["heldout_class_top1"] >= best - 0.03
    assert metrics["average"]["heldout_class_top1"] >= best - 0.05
    assert metrics["ga"]["fit_class_top5"] >= metrics["average"]["fit_class_top5"]
    fused = np.load(out / "val.npy")
    assert fused.shape == (len(v), C) and fused.dtype == np.float16
    assert (pl.read_parquet(out / "val_keys.parquet")["key"] == v["key"]).all()
    rep = accuracy_report(fused.astype(np.float32)[half == 1], labels[half == 1])
    assert rep["class_top1"] == pytest.approx(metrics["ga"]["heldout_class_top1"], abs=0.02)
    assert not (out / "test.npy").exists() and not (out / "predictions.csv").exists()  # the dataset has no test
    config = json.loads((out / "config.json").read_text())
    assert len(config["ga"]["history"]) == 11 and config["heldout_images"] == (half == 1).sum()
    assert "ga" in stdout and "average" in stdout
