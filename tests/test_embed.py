"""`wvdata embed`: features of a trained run's model, written resumably by chunks."""
import json
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from _train import ROOT, run_trainer

import wvdata.embed as embed_mod
from wvdata.embed import embed, load_features, load_model, model_spec
from wvdata.views import view


@pytest.fixture(scope="module")
def embedded(noisy_digits, noisy_digits_run, tmp_path_factory):
    """A private copy of the noisy digits (features get written into it), embedded with the run."""
    ds = tmp_path_factory.mktemp("embed") / "ds"
    shutil.copytree(noisy_digits[0], ds)
    summary = embed(ds, checkpoint=noisy_digits_run / "checkpoint.pt", workers=1, chunk=512, progress=False)
    return ds, noisy_digits_run, summary


def test_features_cover_every_train_sample_once_as_float16(embedded):
    ds, run, summary = embedded
    feats, keys = load_features(ds, "run")
    train = pl.read_parquet(ds / "train" / "samples.parquet")
    assert feats.dtype == np.float16 and feats.shape == (train.height, 96)  # test_resnet's pooled width
    assert sorted(keys.to_list()) == sorted(train["key"].to_list())
    assert summary["rows"] == train.height and summary["unreadable"] == 0 and summary["chunks"] == 3
    meta = json.loads((ds / "features" / "run" / "meta.json").read_text())
    assert meta["spec"]["name"] == "test_resnet" and meta["spec"]["image_size"] == 32
    assert not (ds / "features" / "run" / ".parts").exists()
    # the features carry the classes: nearest class centre (of the noisy labels) recovers most labels
    labels = dict(train.select("key", "label").iter_rows())
    y = np.array([labels[k] for k in keys])
    x = feats.astype(np.float32)
    centres = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y).mean() > 0.6


def test_features_are_the_classifier_input_of_the_trained_model(embedded):
    ds, run, _ = embedded
    feats, keys = load_features(ds, "run")
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    fc_w, fc_b = ckpt["model"]["fc.weight"], ckpt["model"]["fc.bias"]
    import timm

    full = timm.create_model("test_resnet", num_classes=10)
    full.load_state_dict(ckpt["model"])
    full.eval()
    from wvdata.stream import loader, normalize

    images, _, batch_keys = next(iter(loader(ds, batch_size=16, train=False, shuffle=False, image_size=32,
                                             num_workers=0, rank=0, world_size=1)))
    with torch.no_grad():
        logits = full(normalize(images, channels_last=False))
    row = {k: i for i, k in enumerate(keys.to_list())}
    f = torch.as_tensor(feats[[row[k] for k in batch_keys]].astype(np.float32))
    assert torch.allclose(f @ fc_w.T + fc_b, logits, atol=0.05, rtol=0.01)  # float16 storage


def test_an_interrupted_embed_resumes_from_its_finished_chunks(embedded, monkeypatch):
    ds, run, _ = embedded
    real = embed_mod._embed_chunk

    def crash_on_second(task):
        if task.index == 1:
            raise RuntimeError("killed")
        return real(task)

    monkeypatch.setattr(embed_mod, "_embed_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        embed(ds, checkpoint=run / "checkpoint.pt", name="again", workers=1, chunk=512, progress=False)
    parts = ds / "features" / "again" / ".parts"
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.npz"]
    monkeypatch.setattr(embed_mod, "_embed_chunk", real)
    summary = embed(ds, checkpoint=run / "checkpoint.pt", name="again", workers=1, chunk=512, progress=False)
    assert summary["chunks_resumed"] == 1
    a, ka = load_features(ds, "again")
    b, kb = load_features(ds, "run")
    assert ka.to_list() == kb.to_list() and np.array_equal(a, b)
    # other arguments (a different size): the old parts are not reused
    (parts / "plan.json").parent.mkdir(parents=True)
    (parts / "plan.json").write_text("{}")
    (parts / "part-000000.npz").write_bytes(b"stale")
    embed(ds, checkpoint=run / "checkpoint.pt", name="again", image_size=48, workers=1, chunk=512, progress=False)
    assert json.loads((ds / "features" / "again" / "meta.json").read_text())["spec"]["image_size"] == 48


def test_a_timm_model_with_a_local_weights_file_gives_the_same_features(embedded, tmp_path):
    ds, run, _ = embedded
    weights = tmp_path / "test_resnet.pth"
    torch.save(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"], weights)
    embed(ds, model="test_resnet", weights=weights, image_size=32, name="w", workers=1, progress=False)
    a, ka = load_features(ds, "w")
    b, kb = load_features(ds, "run")
    assert ka.to_list() == kb.to_list() and np.allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(model_spec(model="resnet18", weights=weights, image_size=64))


def test_a_view_embeds_each_of_its_samples_once(embedded):
    ds, run, _ = embedded
    keys = pl.read_parquet(ds / "train" / "samples.parquet")["key"].to_list()[:20]
    dup = view(ds, "dup", keys=keys * 3)  # 60 entries, each sample 3 times
    summary = embed(ds, checkpoint=run / "checkpoint.pt", view="dup", name="dup", workers=0, progress=False)
    feats, keys = load_features(ds, "dup")
    assert summary["rows"] == len(feats) == 20 and sorted(keys.to_list()) == sorted(set(dup.entries["key"]))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wvdata.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_embeds_and_reports_errors_in_one_line(embedded, tmp_path):
    ds, run, _ = embedded
    proc = _cli("embed", ds, "--checkpoint", run / "checkpoint.pt", "--name", "cli", "--workers", "0",
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "1438 samples x 96 features" in proc.stdout
    for args in (["--checkpoint", tmp_path / "missing.pt"],
                 ["--checkpoint", run / "checkpoint.pt", "--weights", run / "checkpoint.pt"],
                 ["--model", "test_resnet"],
                 ["--checkpoint", run / "checkpoint.pt", "--name", "../escape"]):
        proc = _cli("embed", ds, *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert proc.stderr.startswith("wvdata embed: error:")


def test_torchrun_ranks_split_the_chunks_and_rank_0_assembles(embedded):
    ds, run, _ = embedded
    run_trainer(["embed", str(ds), "--checkpoint", str(run / "checkpoint.pt"), "--name", "ddp", "--chunk", "256",
                 "--workers", "0", "--no-progress"], nproc=2, module="wvdata.cli")
    a, ka = load_features(ds, "ddp")
    b, kb = load_features(ds, "run")
    assert ka.to_list() == kb.to_list() and np.allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2)
