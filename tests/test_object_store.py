"""Build across machines through object storage: a crawl in a bucket -> a dataset in a bucket,
against a real local S3 endpoint (moto's standalone server), with the local pool and with Ray."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _crawls import quiet_build, tree
from wvdata import open_dataset
from wvdata.build import build
from wvdata.synth import make_webvision_crawl
from wvdata.synth.s3 import free_port, restore_env, s3_env, set_env, start_s3_server

OPTS = {"shard_samples": 4, "resize_short": 64}
CLI_OPTS = ["--shard-samples", "4", "--resize-short", "64", "-q"]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for this module; credentials and endpoint only in the environment."""
    proc, url = start_s3_server()
    saved = set_env(s3_env(url))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients: none may keep another endpoint
    yield s3fs.S3FileSystem(use_listings_cache=False)
    s3fs.S3FileSystem.clear_instance_cache()
    restore_env(saved)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return make_webvision_crawl(tmp_path_factory.mktemp("objcrawl") / "crawl", classes=4, train_per_class=6,
                                val_per_class=3, test=4, sizes=((400, 300), (300, 400)), seed=3)


@pytest.fixture(scope="module")
def reference(crawl, tmp_path_factory):
    """The same crawl built from and to the local disk."""
    out = tmp_path_factory.mktemp("objref") / "ds"
    quiet_build(crawl.root, out, **OPTS)
    return out


@pytest.fixture(scope="module")
def bucket(s3, crawl):
    s3.mkdir("crawls")
    s3.put(str(crawl.root), "crawls/wv", recursive=True)
    return "crawls"


def bucket_tree(fs, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: fs.cat_file(k) for k in fs.find(prefix)}


def _subprocess_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def test_bucket_to_bucket_equals_the_local_build(s3, bucket, reference):
    summary = build("s3://crawls/wv", "s3://crawls/ds-pool", workers=2, progress=False, **OPTS)
    assert summary.total_errors == 0
    got = bucket_tree(s3, "crawls/ds-pool")
    assert ".wvdata.lock" not in got and not any(k.startswith(".build") for k in got)
    assert got == tree(reference)  # tars, indexes, tables and manifest, byte for byte
    ds = open_dataset("s3://crawls/ds-pool")
    assert ds.samples("train").height == open_dataset(reference).samples("train").height


def test_folder_crawl_in_a_bucket_equals_the_local_build(s3, bucket, tmp_path):
    """The folder layout from one listing of the prefix: splits, classes, a loose file as an
    error row, the same dataset bytes as the same folder built from disk."""
    from wvdata.synth import make_folder_crawl

    crawl = make_folder_crawl(tmp_path / "folder", classes=3, train_per_class=3, val_per_class=2,
                              sizes=((400, 300), (300, 400)), seed=2)  # train/<class>/..., val/<class>/...
    (crawl.root / "notes.txt").write_text("not an image")  # a loose file next to the split folders
    s3.put(str(crawl.root), "crawls/folder", recursive=True)
    local = tmp_path / "ds"
    quiet_build(crawl.root, local, **OPTS)
    build("s3://crawls/folder", "s3://crawls/ds-folder", workers=2, progress=False, **OPTS)
    assert bucket_tree(s3, "crawls/ds-folder") == tree(local)
    errors = open_dataset(local).errors("train")
    assert errors["reason"].to_list() == ["not in a class folder"]
    assert open_dataset(local).num_classes == 3 and open_dataset(local).samples("val").height == 6


def test_killed_bucket_build_resumes_byte_identical(s3, bucket, reference, tmp_path):
    out = "s3://crawls/ds-killed"
    cmd = [sys.executable, "-m", "wvdata.cli", "build", "s3://crawls/wv", "-o", out, "--workers", "1", *CLI_OPTS]
    for _ in range(5):
        proc = subprocess.Popen(cmd, env=_subprocess_env(), cwd=tmp_path, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = [k for k in s3.find("crawls/ds-killed/.build") if k.endswith(".samples.json")]
            if len(done) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
        s3.rm("crawls/ds-killed", recursive=True)
    else:
        pytest.fail("the build always ended before it could be killed")
    assert s3.exists("crawls/ds-killed/.wvdata.lock")  # the dead holder's lease record
    assert not s3.exists("crawls/ds-killed/dataset.json")
    res = subprocess.run(cmd + ["--resume"], env=_subprocess_env(), cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "already complete" in res.stdout and "(0 already complete)" not in res.stdout
    assert bucket_tree(s3, "crawls/ds-killed") == tree(reference)


@pytest.mark.ray
@pytest.mark.slow  # starts a Ray cluster: about a minute on 2 cores
def test_ray_tasks_carry_no_local_paths_and_need_no_shared_disk(s3, bucket, reference, tmp_path):
    from wvdata.build import layouts

    rows = layouts.scan("s3://crawls/wv").rows
    assert rows and all(r.path.startswith("s3://crawls/wv/") for r in rows)  # what a task carries
    assert b"s3://crawls/wv/" in pickle.dumps(rows)
    driver, workers = tmp_path / "driver", tmp_path / "workers"
    driver.mkdir()
    workers.mkdir()
    env = _subprocess_env(WVDATA_RAY_RUNTIME_ENV=json.dumps({"working_dir": str(workers)}))
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-m", "wvdata.cli", "build", "s3://crawls/wv", "-o", "s3://crawls/ds-ray",
                          "--engine", "ray", *CLI_OPTS], env=env, cwd=driver, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert bucket_tree(s3, "crawls/ds-ray") == tree(reference)
    assert not list(driver.iterdir()) and not list(workers.iterdir())  # nothing landed on a local disk


def _pool_dataset(s3) -> str:
    url = "s3://crawls/ds-pool"
    if not s3.exists("crawls/ds-pool/dataset.json"):
        build("s3://crawls/wv", url, workers=1, progress=False, **OPTS)
    return url


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_streams_the_bucket_dataset(s3, bucket, reference, backend):
    """Both backends read the bucket dataset (DALI through its own S3 client, with its index
    files local): one epoch yields every sample once, the same images as from the local copy."""
    from wvdata.stream import loader

    url = _pool_dataset(s3)
    kw = dict(backend=backend, train=False, shuffle=False, batch_size=4, image_size=32, num_workers=2, rank=0,
              world_size=1)
    pairs = [(k, img) for images, _, batch in loader(url, **kw) for k, img in zip(batch, images)]
    assert Counter(k for k, _ in pairs) == Counter(open_dataset(url).samples("train")["key"].to_list())
    got = dict(pairs)
    local = {k: img for images, _, batch in loader(str(reference), **kw) for k, img in zip(batch, images)}
    assert all((got[k] == local[k]).all() for k in local)


def test_dedup_annotation_written_into_the_bucket(s3, bucket):
    from wvdata.dedup import dedup

    url = _pool_dataset(s3)
    dedup(url, progress=False)
    table = open_dataset(url).annotation_path("dedup")
    import polars as pl

    with s3.open(table.removeprefix("s3://")) as f:
        df = pl.read_parquet(f)
    assert df.height == sum(open_dataset(url).samples(s).height for s in ("train", "val", "test"))
    assert not s3.exists("crawls/ds-pool/.wvdata.lock")
    from wvdata.build.tar import parse_idx
    from wvdata.views import load_view, view

    v = view(url, "kept", drop_duplicates=True, per_class=3)  # a view written into the bucket
    back = load_view(url, "kept")
    assert back.entries["key"].to_list() == v.entries["key"].to_list() and len(back) > 0
    listed = [(k, m[0].offset) for k, p in enumerate(back.index_paths()) for m in parse_idx(s3.cat_file(p).decode())]
    want = list(zip(v.entries["shard_id"].to_list(), v.entries["data_offset"].to_list()))
    assert sorted(listed) == sorted(want)  # each shard's .idx lists exactly the view's entries
    view(url, "kept", per_class=1)  # replaced in place
    assert len(load_view(url, "kept")) == open_dataset(url).num_classes


def test_embed_features_written_into_the_bucket(s3, bucket, tmp_path):
    import timm
    import torch

    from wvdata.embed import embed, load_features

    url = _pool_dataset(s3)
    weights = tmp_path / "weights.pt"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), weights)
    summary = embed(url, model="test_resnet", weights=weights, image_size=32, name="tiny", workers=1, chunk=8,
                    progress=False)
    feats, keys = load_features(url, "tiny")
    train = open_dataset(url).samples("train")["key"]
    assert summary["rows"] == feats.shape[0] == keys.len() == train.len() and feats.shape[1] > 0
    assert sorted(keys.to_list()) == sorted(train.to_list())
    assert not s3.find("crawls/ds-pool/features/tiny/.parts")  # parts removed once assembled
    from wvdata.curriculum import curriculum

    table = curriculum(url, "tiny", progress=False)  # reads those features, writes its annotation
    from wvdata.views import annotation

    assert annotation(open_dataset(url), "curriculum", "train").height == table.height == train.len()


# ---------------------------------------------------------------- bad input


def _cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wvdata.cli", *args], env=_subprocess_env(**env), cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_missing_bucket_and_unreachable_store_are_one_line_errors(s3, bucket, tmp_path):
    res = _cli(["build", "s3://no-such-bucket/crawl", "-o", "s3://crawls/x", "-q"], tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "does not exist" in res.stderr
    res = _cli(["build", "s3://crawls/wv", "-o", "s3://no-such-bucket/ds", "-q"], tmp_path)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no-such-bucket" in res.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    res = _cli(["build", "s3://crawls/wv", "-o", "s3://crawls/y", "-q"], tmp_path, AWS_ENDPOINT_URL=dead,
               AWS_ENDPOINT_URL_S3=dead, AWS_MAX_ATTEMPTS="1")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and "test" not in res.stderr.replace("crawls", "")  # no credentials


def test_a_key_that_vanishes_mid_build_is_an_error_row(s3, bucket, crawl, monkeypatch):
    from wvdata.build import layouts

    s3.copy("crawls/wv", "crawls/wv-vanish", recursive=True)
    real_scan = layouts.scan
    gone = []

    def scan_then_delete(*a, **kw):
        inputs = real_scan(*a, **kw)
        row = next(r for r in inputs.rows if r.split == "train")
        s3.rm_file(row.path.removeprefix("s3://"))
        gone.append(row.src_path)
        return inputs

    monkeypatch.setattr(sys.modules["wvdata.build"], "scan", scan_then_delete)
    s = build("s3://crawls/wv-vanish", "s3://crawls/ds-vanish", workers=1, progress=False, **OPTS)
    ds = open_dataset("s3://crawls/ds-vanish")
    errors = ds.errors("train")
    assert errors.filter(errors["src_path"] == gone[0])["reason"].to_list() == ["missing file"]
    listed = crawl.count("train")
    assert ds.samples("train").height + errors.height == listed  # every input row accounted for
    assert s.errors["train"] == 1


def test_missing_permissions_are_error_rows_or_one_line_errors(s3, bucket, crawl, tmp_path):
    """With moto enforcing IAM: a user who may list the crawl but not read its images gets one
    error row per image (nothing lost); one who may not write the output gets one line."""
    import boto3
    import requests

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    s3.copy("crawls/wv", "crawls/wv-denied", recursive=True)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="builder")
    iam.put_user_policy(UserName="builder", PolicyName="crawl", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::crawls/wv-denied/*.jpg"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::crawls/ds-readonly/*"}]}))
    key = iam.create_access_key(UserName="builder")["AccessKey"]
    creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        res = _cli(["build", "s3://crawls/wv-denied", "-o", "s3://crawls/ds-denied", *CLI_OPTS], tmp_path, **creds)
        assert res.returncode == 0, res.stderr
        res = _cli(["build", "s3://crawls/wv", "-o", "s3://crawls/ds-readonly", *CLI_OPTS], tmp_path, **creds)
        assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "permission denied" in res.stderr and "Traceback" not in res.stderr
        assert key["SecretAccessKey"] not in res.stderr
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf").raise_for_status()
    ds = open_dataset("s3://crawls/ds-denied")
    for split in ("train", "val", "test"):
        errors = ds.errors(split)
        assert ds.samples(split).height == 0 and errors.height == crawl.count(split)
        assert set(errors["reason"]) == {"unreadable file"}
        assert errors["detail"].str.contains("Permission|AccessDenied|Forbidden").all()


def test_manifest_in_a_bucket_keys_stay_under_the_prefix(s3, bucket, crawl):
    """Keys relative to the manifest may not leave its prefix (`..` is normalised first); URLs
    are allowed, unless --root names a prefix they are not under."""
    jpg = next(crawl.root.rglob("*.jpg")).read_bytes()
    s3.pipe_file("crawls/mf/img/a.jpg", jpg)
    s3.pipe_file("crawls/mf/img/b.jpg", jpg)
    s3.pipe_file("crawls/mf/img/c.jpg", jpg)
    s3.pipe_file("crawls/mf/manifest.csv", (
        b"path,label\nimg/a.jpg,0\nimg/../img/b.jpg,1\n../wv/info/synsets.txt,0\n"
        b"img/../../wv/x.jpg,1\ns3://crawls/mf/img/c.jpg,1\n"))
    build("s3://crawls/mf/manifest.csv", "s3://crawls/ds-mf", workers=1, progress=False, **OPTS)
    ds = open_dataset("s3://crawls/ds-mf")
    got, errs = ds.samples("train"), ds.errors("train")
    assert sorted(got["src_path"].to_list()) == ["img/../img/b.jpg", "img/a.jpg", "s3://crawls/mf/img/c.jpg"]
    assert sorted(errs["src_path"].to_list()) == ["../wv/info/synsets.txt", "img/../../wv/x.jpg"]
    assert set(errs["reason"]) == {"path escapes source"}
    build("s3://crawls/mf/manifest.csv", "s3://crawls/ds-mf2", workers=1, progress=False,
          root="s3://crawls/mf/img/", **OPTS)
    errs = open_dataset("s3://crawls/ds-mf2").errors("train")
    assert "s3://crawls/mf/img/c.jpg" not in errs["src_path"].to_list()
    assert sorted(errs["src_path"].to_list()) == ["../wv/info/synsets.txt", "img/../../wv/x.jpg"]


def test_a_second_writer_is_refused_by_the_bucket_lease(s3, bucket):
    from wvdata.lock import DatasetLocked, dataset_lock

    with dataset_lock("s3://crawls/locked", "first"):
        with pytest.raises(DatasetLocked, match="first"):
            with dataset_lock("s3://crawls/locked", "second"):
                pass
    with dataset_lock("s3://crawls/locked", "third"):  # released: free again
        pass
