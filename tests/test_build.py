"""`wvdata build`: layouts, labels and metadata, keys, determinism, engines, `wvdata info`."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from _crawls import (
    assert_same_tree,
    check_dataset,
    crop,
    encode,
    errors,
    key_json,
    manifest,
    quiet_build,
    samples,
    sha1,
    stored_image,
    write,
)
from wvdata import info
from wvdata.build import chunk_size
from wvdata.cli import main
from wvdata.synth import DIGIT_NAMES, make_folder_crawl, make_webvision_crawl

SMALL_SIZES = ((160, 120), (120, 160), (200, 150))


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """A synthetic crawl in the official WebVision layout, sorted by class like the real one."""
    return make_webvision_crawl(tmp_path_factory.mktemp("wv") / "crawl", classes=4,
                                train_per_class=(5, 9), val_per_class=3, test=6,
                                label_noise=0.2, sizes=SMALL_SIZES, seed=7)


@pytest.fixture(scope="module")
def built(crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("wvds") / "ds"
    quiet_build(crawl.root, out, shard_samples=5)
    return out


# ---------------------------------------------------------------- webvision


def test_webvision_counts_labels_and_shards(crawl, built):
    frames = check_dataset(built)
    man = manifest(built)
    assert man["layout"] == "webvision"
    assert man["classes"] == crawl.classes
    assert man["class_descriptions"] == [f"digit {DIGIT_NAMES[c]}" for c in range(4)]
    assert list(man["splits"]) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        df = frames[split]
        assert errors(built, split).height == 0
        assert df.height == crawl.count(split)
        given = {rel: label for rel, _, label in crawl.items[split]}
        assert dict(zip(df["src_path"], df["label"])) == given
        shards = man["splits"][split]["shards"]
        assert len(shards) == math.ceil(df.height / 5)
        assert [s["samples"] for s in shards][:-1] == [5] * (len(shards) - 1)
    assert set(frames["test"]["label"]) == {-1} and set(frames["test"]["class_name"]) == {""}


def test_webvision_query_source_and_meta_record(crawl, built):
    df = samples(built)
    rows = {r["src_path"]: r for r in df.to_dicts()}
    checked = 0
    for rel, true, _ in crawl.items["train"]:
        source, qid, fname = rel.split("/")
        i = int(fname[4:9])  # <s><class:3><index:5>.jpg; record i+1 of <source>/<qid>.json
        record = json.loads((crawl.root / "meta" / source / f"{qid}.json").read_text())[i]
        assert {"title", "description", "tags"} <= set(record)
        row = rows[rel]
        doc = key_json(built, row)
        for got in (row, doc):
            assert got["source"] == source and got["query"] == qid
            assert got["query_text"] == f"handwritten {DIGIT_NAMES[true]}"
        assert doc["meta"] == record
        assert json.loads(row["meta"]) == record
        assert row["meta_error"] is None and "meta_error" not in doc
        checked += 1
    assert checked == crawl.count("train") > 0
    for row in df.filter(pl.col("split") != "train").to_dicts():
        assert row["source"] == "webvision" and row["query"] == "" and row["meta"] is None


def _hand_webvision(root: Path) -> dict:
    """WebVision 1.0 style by hand: *_all lists only, train_images/, val_images/, test_images/."""
    info_dir = root / "info"
    write(info_dir / "synsets.txt", b"n02123045 tabby, tabby cat\nn09999999 astronaut\n"
                                    b"n03063599 coffee mug\n")
    write(info_dir / "queries_google.txt", b"1 tabby cat\n2 astronaut\n3 coffee mug\n")
    write(info_dir / "queries_flickr.txt", b"4 tabby\n5 spaceman\n6 mug\n")
    photos = ("chelsea", "astronaut", "coffee")
    flist, mlist, expect = [], [], {}
    for c, name in enumerate(photos):
        for source, qid in (("google", c + 1), ("flickr", c + 4)):
            records = []
            for i in range(2):
                rel = f"{source}/q{qid:04d}/{name}-{i}.jpg"
                write(root / "train_images" / rel, encode(crop(name, 90, 70, seed=i + 10 * qid)))
                records.append({"id": f"{source}-{qid}-{i}", "title": f"{name} {i}",
                                "description": f"a {name} photo", "tags": [name, source]})
                flist.append(f"{rel} {c}\n")
                mlist.append(f"{source}/q{qid:04d}.json {i + 1}\n")
                expect[rel] = ("train", c, source, f"q{qid:04d}", records[-1])
            write(root / "meta" / source / f"q{qid:04d}.json", json.dumps(records).encode())
    write(info_dir / "train_filelist_all.txt", "".join(flist).encode())
    write(info_dir / "train_meta_list_all.txt", "".join(mlist).encode())
    val = []
    for c, name in enumerate(photos):
        rel = f"val{c:06d}.jpg"
        write(root / "val_images" / rel, encode(crop(name, 64, 80, seed=99)))
        val.append(f"{rel} {c}\n")
        expect[rel] = ("val", c, "webvision", "", None)
    write(info_dir / "val_filelist.txt", "".join(val).encode())
    write(root / "test_images" / "test000001.jpg", encode(crop("rocket", 70, 70)))
    write(info_dir / "test_filelist.txt", b"test000001.jpg\n")
    expect["test000001.jpg"] = ("test", -1, "webvision", "", None)
    return expect


def test_webvision_all_lists_and_plain_image_dirs(tmp_path):
    expect = _hand_webvision(tmp_path / "src")
    quiet_build(tmp_path / "src", tmp_path / "ds", shard_samples=4)
    check_dataset(tmp_path / "ds")
    man = manifest(tmp_path / "ds")
    assert man["classes"] == ["n02123045", "n09999999", "n03063599"]
    assert man["class_descriptions"] == ["tabby, tabby cat", "astronaut", "coffee mug"]
    assert errors(tmp_path / "ds").height == 0
    df = samples(tmp_path / "ds")
    assert sorted(df["src_path"]) == sorted(expect)
    queries = {("google", "q0001"): "tabby cat", ("flickr", "q0005"): "spaceman"}
    for row in df.to_dicts():
        split, label, source, query, record = expect[row["src_path"]]
        assert (row["split"], row["label"], row["source"], row["query"]) == (split, label, source, query)
        doc = key_json(tmp_path / "ds", row)
        assert doc["meta"] == (record or {})
        assert row["meta"] == (json.dumps(record, sort_keys=True) if record else None)
        if (source, query) in queries:
            assert row["query_text"] == doc["query_text"] == queries[source, query]
        # the stored image is the original file, byte for byte (RGB JPEG, no resize asked)
        folder = {"train": "train_images", "val": "val_images", "test": "test_images"}[split]
        original = (tmp_path / "src" / folder / row["src_path"]).read_bytes()
        assert stored_image(tmp_path / "ds", row) == original and not row["reencoded"]


def test_webvision_filelist_paths_with_spaces_and_unicode(tmp_path):
    """WebVision 2.0 lists hold paths with spaces: in train and val the label is the last
    field, the path everything before it; in the (label-free) test list the whole line."""
    root = tmp_path / "src"
    write(root / "info" / "synsets.txt", "".join(f"n{c:08d} class {c}\n" for c in range(20)).encode())
    train = {"flickr/q0019/a.b.c d e.jpg": 18, "flickr/q0018/naïve café ☕.jpg": 17, "google/q0001/plain.jpg": 0}
    for i, rel in enumerate(train):
        write(root / rel, encode(crop("chelsea", 80, 60, seed=i)))
    write(root / "info" / "train_filelist_all.txt", "".join(f"{p} {c}\n" for p, c in train.items()).encode())
    write(root / "val_images" / "val 01 ☕.jpg", encode(crop("coffee", 80, 60)))
    write(root / "info" / "val_filelist.txt", "val 01 ☕.jpg 3\n".encode())
    write(root / "test_images" / "test a b.jpg", encode(crop("rocket", 80, 60)))
    write(root / "info" / "test_filelist.txt", b"test a b.jpg\n")
    quiet_build(root, tmp_path / "ds")
    check_dataset(tmp_path / "ds")
    assert errors(tmp_path / "ds").height == 0
    got = {(r["split"], r["src_path"]): r["label"] for r in samples(tmp_path / "ds").to_dicts()}
    assert got == {**{("train", p): c for p, c in train.items()}, ("val", "val 01 ☕.jpg"): 3,
                   ("test", "test a b.jpg"): -1}


# ---------------------------------------------------------------- folder and manifest


def test_folder_flat(tmp_path):
    crawl = make_folder_crawl(tmp_path / "src", classes=3, train_per_class=4, sizes=SMALL_SIZES)
    write(tmp_path / "src" / "README.txt", b"not in a class folder")
    quiet_build(tmp_path / "src", tmp_path / "ds", shard_samples=5)
    frames = check_dataset(tmp_path / "ds")
    man = manifest(tmp_path / "ds")
    assert man["layout"] == "folder" and man["classes"] == crawl.classes == ["one", "two", "zero"]
    assert list(man["splits"]) == ["train"]
    df = frames["train"]
    assert df.height == 12 and set(df["source"]) == {"folder"}
    for row in df.to_dicts():
        assert row["class_name"] == row["src_path"].split("/")[0]
    err = errors(tmp_path / "ds")
    assert err.select("src_path", "reason").rows() == [("README.txt", "not in a class folder")]


def test_folder_with_split_dirs(tmp_path):
    src = tmp_path / "src"
    layout = {"train": {"cat": 3, "mug": 2}, "validation": {"cat": 1, "mug": 1, "rocket": 1},
              "test": {"cat": 1}}
    for split, classes in layout.items():
        for name, n in classes.items():
            for i in range(n):
                write(src / split / name / f"{i}.jpg", encode(crop("coffee", 60, 50, seed=i)))
    quiet_build(src, tmp_path / "ds", shard_samples=2)
    frames = check_dataset(tmp_path / "ds")
    man = manifest(tmp_path / "ds")
    assert man["classes"] == ["cat", "mug", "rocket"]  # the union, sorted, the same ids everywhere
    assert {s: df.height for s, df in frames.items()} == {"train": 5, "val": 3, "test": 1}
    for df in frames.values():
        for row in df.to_dicts():
            assert row["class_name"] == row["src_path"].split("/")[1]
            assert row["label"] == man["classes"].index(row["class_name"])
    assert set(frames["val"]["src_path"].str.split("/").list.first()) == {"validation"}


def _manifest_rows(root: Path) -> list[dict]:
    rows = []
    for i, (name, label, split) in enumerate([
            ("chelsea", 0, "train"), ("astronaut", 1, "train"), ("coffee", 2, "train"),
            ("chelsea", 0, "train"), ("astronaut", 1, "val"), ("coffee", 2, "validation"),
            ("rocket", None, "test")]):
        write(root / "images" / f"{name}_{i}.jpg", encode(crop(name, 72, 54, seed=i)))
        rows.append({"path": f"images/{name}_{i}.jpg", "label": label, "split": split,
                     "class_name": {0: "cat", 1: "astronaut", 2: "mug"}.get(label),
                     "caption": f"photo {i}, \"{name}\" — ü", "score": i / 4,
                     "key": f"user-id-{i}", "source": "flickr" if i % 2 else "google"})
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_with_extra_columns(tmp_path, fmt):
    rows = _manifest_rows(tmp_path / "src")
    path = tmp_path / "src" / f"crawl.{fmt}"
    df = pl.DataFrame(rows)
    {"csv": df.write_csv, "jsonl": df.write_ndjson, "parquet": df.write_parquet}[fmt](path)
    quiet_build(path, tmp_path / "ds", shard_samples=3)
    frames = check_dataset(tmp_path / "ds")
    man = manifest(tmp_path / "ds")
    assert man["layout"] == "manifest" and man["classes"] == ["cat", "astronaut", "mug"]
    assert {s: d.height for s, d in frames.items()} == {"train": 4, "val": 2, "test": 1}
    assert errors(tmp_path / "ds").height == 0
    by_path = {r["path"]: r for r in rows}
    for row in samples(tmp_path / "ds").to_dicts():
        want = by_path[row["src_path"]]
        assert row["label"] == (-1 if want["label"] is None else want["label"])
        assert row["source"] == want["source"]
        doc = key_json(tmp_path / "ds", row)
        assert doc["key"] == row["key"] != want["key"]  # a `key` column never replaces the key
        assert doc["caption"] == want["caption"]
        assert doc["score"] == (str(want["score"]) if fmt == "csv" else want["score"])
        original = (tmp_path / "src" / want["path"]).read_bytes()
        assert sha1(stored_image(tmp_path / "ds", row)) == sha1(original)


def test_manifest_float_labels_as_pandas_writes_them(tmp_path):
    # pandas stores an integer column with a missing value as float64: 0.0, 1.0, NaN
    for i in range(4):
        write(tmp_path / "src" / f"{i}.jpg", encode(crop("rocket", 40, 60, seed=i)))
    pl.DataFrame({"path": [f"{i}.jpg" for i in range(4)], "label": [0.0, 1.0, 1.5, float("nan")],
                  "split": ["train", "val", "train", "test"]}).write_parquet(tmp_path / "src" / "m.parquet")
    quiet_build(tmp_path / "src" / "m.parquet", tmp_path / "ds")
    check_dataset(tmp_path / "ds")
    assert dict(samples(tmp_path / "ds").select("src_path", "label").iter_rows()) == {
        "0.jpg": 0, "1.jpg": 1, "3.jpg": -1}
    assert errors(tmp_path / "ds").select("src_path", "reason").rows() == [("2.jpg", "bad label")]


def test_shard_size_in_bytes(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(24):
        write(src / f"c{i % 3}" / f"{i}.jpg", encode(crop(("chelsea", "coffee")[i % 2], 120, 90, seed=i)))
    limit = 40 * 1024
    assert main(["build", str(src), "-o", str(tmp_path / "ds"), "--shard-size", "40KB",
                 "--workers", "2", "-q"]) == 0
    check_dataset(tmp_path / "ds")
    df = samples(tmp_path / "ds")
    assert not df["reencoded"].any()  # so `bytes` is the input file size the plan works from
    shards = [df.filter(pl.col("shard") == s["name"]).sort("data_offset")
              for s in manifest(tmp_path / "ds")["splits"]["train"]["shards"]]
    assert len(shards) >= 3
    from wvdata.build import SAMPLE_OVERHEAD  # the planner's estimate of tar headers + .cls + .json

    planned = [int(s["bytes"].sum()) + SAMPLE_OVERHEAD * s.height for s in shards]
    assert max(planned) <= limit
    for shard, nxt in zip(shards, shards[1:]):  # a shard is cut only when the next input won't fit
        assert int(shard["bytes"].sum()) + SAMPLE_OVERHEAD * shard.height + nxt["bytes"][0] > limit
    # an input larger than the limit still gets a shard of its own, and no shard is empty
    quiet_build(src, tmp_path / "one", shard_size=1)
    assert [s["samples"] for s in manifest(tmp_path / "one")["splits"]["train"]["shards"]] == [1] * 24


def test_splits_option(crawl, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["build", str(crawl.root), "-o", str(out), "--splits", "train,test", "-q",
                 "--workers", "1"]) == 0
    check_dataset(out)
    assert list(manifest(out)["splits"]) == ["train", "test"]
    assert main(["build", str(crawl.root), "-o", str(tmp_path / "typo"), "--splits", "train,tset"]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- keys and determinism


def test_keys_are_stable_across_rebuilds_and_new_inputs(tmp_path):
    src = tmp_path / "src"
    names = ["a b.jpg", "x.y.z.jpg", "ünï cödé.jpg", "plain.jpg", "UPPER.JPG", "-dash-.jpg"]
    for i, n in enumerate(names):
        write(src / "cat.s" / n, encode(crop("chelsea", 50, 40, seed=i)))
    quiet_build(src, tmp_path / "a", shard_samples=2)
    quiet_build(src, tmp_path / "b", shard_samples=4, seed=3, resize_short=30)
    write(src / "cat.s" / "new.jpg", encode(crop("chelsea", 50, 40, seed=99)))
    quiet_build(src, tmp_path / "c", shard_samples=2)
    keys = {}
    for name in "abc":
        check_dataset(tmp_path / name)
        keys[name] = dict(samples(tmp_path / name).select("src_path", "key").iter_rows())
    assert keys["a"] == keys["b"]
    assert len(keys["c"]) == len(names) + 1
    assert {p: keys["c"][p] for p in keys["a"]} == keys["a"]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys["c"].values())


def test_same_input_and_options_give_identical_bytes(crawl, built, tmp_path):
    quiet_build(crawl.root, tmp_path / "again", shard_samples=5, workers=2)
    assert_same_tree(built, tmp_path / "again")
    # the same crawl moved elsewhere is the same input
    shutil.copytree(crawl.root, tmp_path / "moved")
    quiet_build(tmp_path / "moved", tmp_path / "from-moved", shard_samples=5)
    assert_same_tree(built, tmp_path / "from-moved")


def test_one_shard_on_four_workers_equals_one_worker(tmp_path):
    """The local pool splits a shard into chunks of images: a one-shard build (default shard
    size) on 4 workers is the 1-worker build byte for byte, and every input is accounted for."""
    src = tmp_path / "src"
    make_folder_crawl(src, classes=3, train_per_class=15, sizes=SMALL_SIZES + ((400, 300),))
    write(src / "zero" / "empty.jpg", b"")
    write(src / "one" / "text.jpg", b"<html>404</html>\n")
    write(src / "two" / "cut.jpg", encode(crop("coffee", 200, 150))[:900])
    assert chunk_size(48, 4) < 48 // 4  # several chunks per worker, so chunks really are joined
    one = quiet_build(src, tmp_path / "w1", resize_short=64, workers=1)
    four = quiet_build(src, tmp_path / "w4", resize_short=64, workers=4)
    assert one.shards == four.shards == 1
    assert_same_tree(tmp_path / "w1", tmp_path / "w4")  # tar, idx, samples/errors.parquet, dataset.json
    frames = check_dataset(tmp_path / "w4")
    listed = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    built = frames["train"]["src_path"].to_list() + errors(tmp_path / "w4")["src_path"].to_list()
    assert sorted(built) == listed and len(built) == 48
    assert set(errors(tmp_path / "w4")["reason"]) == {"empty file", "not an image", "truncated image"}


def test_seed_changes_the_shard_assignment_only(crawl, built, tmp_path):
    quiet_build(crawl.root, tmp_path / "s1", shard_samples=5, seed=1)
    a, b = samples(built), samples(tmp_path / "s1")
    assert a.select("key", "shard").rows() != b.select("key", "shard").rows()
    cols = ["key", "label", "sha1", "src_path", "width", "height"]
    assert a.select(cols).sort("key").equals(b.select(cols).sort("key"))


def test_class_sorted_filelists_give_mixed_shards(crawl, built):
    # info/train_filelist_*.txt list the classes (query folders) one after the other
    for src in ("google", "flickr"):
        queries = [line.split("/")[1] for line in
                   (crawl.root / "info" / f"train_filelist_{src}.txt").read_text().splitlines()]
        assert queries == sorted(queries) and len(set(queries)) == 4
    per_shard = samples(built, "train").group_by("shard").agg(pl.col("label").n_unique())
    assert per_shard.height >= 5
    assert per_shard["label"].min() >= 2, per_shard  # 5 samples of 4 classes: never one class


# ---------------------------------------------------------------- engines, CLI, info


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_engine_gives_the_same_dataset(crawl, built, tmp_path, ray_cluster):
    quiet_build(crawl.root, tmp_path / "ray", shard_samples=5, engine="ray")
    assert_same_tree(built, tmp_path / "ray")


@pytest.mark.ray
@pytest.mark.slow  # starts its own Ray cluster in a subprocess: about a minute on 2 cores
def test_a_ray_task_that_fails_mid_shard_is_retried_and_leaves_nothing_behind(crawl, built, tmp_path):
    """The first attempt at three shards dies after writing part of its tar (a Ray worker setup
    hook, tests/_faults.py); Ray runs them again and the dataset is the pool's, byte for byte,
    with no temporary file left over."""
    pytest.importorskip("ray")
    plan = tmp_path / "fail-once"
    plan.mkdir()
    shards = [f"train-{s['name']}" for s in manifest(built)["splits"]["train"]["shards"][:2]]
    shards.append(f"val-{manifest(built)['splits']['val']['shards'][0]['name']}")
    for name in shards:
        (plan / name).touch()
    tests = Path(__file__).resolve().parent
    runtime_env = {"worker_process_setup_hook": "_faults.install",
                   "env_vars": {"PYTHONPATH": f"{tests}{os.pathsep}{tests.parent}",
                                "WVDATA_TEST_FAIL_ONCE": str(plan)}}
    env = {**os.environ, "WVDATA_RAY_RUNTIME_ENV": json.dumps(runtime_env)}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "ray"
    res = subprocess.run([sys.executable, "-m", "wvdata.cli", "build", str(crawl.root), "-o", str(out),
                          "--shard-samples", "5", "--engine", "ray", "-q"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(plan.iterdir())  # every planned failure happened (and was retried)
    assert_same_tree(built, out)  # also: no NAME.tmp-PID of a failed attempt


def test_cli_build_equals_api_build_and_prints_a_summary(crawl, built, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", str(crawl.root), "-o", str(out), "--shard-samples", "5",
                 "--workers", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    n = sum(crawl.count(s) for s in ("train", "val", "test"))
    assert f"{n} samples in " in printed and "0 rejected" in printed
    assert f"train: {crawl.count('train')} samples, 0 rejected" in printed
    assert_same_tree(built, out)


def test_info_reports_classes_splits_shards_errors_and_per_class(crawl, tmp_path, capsys):
    src = tmp_path / "src"
    make_folder_crawl(src, classes=3, train_per_class=3, sizes=SMALL_SIZES)
    for i in range(2):  # make the classes unequal: zero 5, one 3, two 2
        write(src / "zero" / f"extra{i}.jpg", encode(crop("rocket", 64, 48, seed=i)))
    (src / "two" / "00000.jpg").write_bytes(b"")
    write(src / "one" / "notes.jpg", b"just some text, not a picture\n")
    write(src / "one" / "noise.jpg", bytes(range(256)) * 4)
    quiet_build(src, tmp_path / "ds", shard_samples=3)
    data = info(tmp_path / "ds")
    assert data["classes"] == 3 and data["layout"] == "folder"
    tr = data["splits"]["train"]
    assert tr["samples"] == 10 and tr["shards"] == 4 and tr["errors"] == 3
    assert tr["bytes"] == sum(p.stat().st_size for p in (tmp_path / "ds" / "train").glob("*.tar"))
    assert tr["errors_by_reason"] == {"not an image": 2, "empty file": 1}
    assert tr["per_class"] == {"min": 2, "median": 3.0, "max": 5}
    assert main(["info", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "(folder, 3 classes)" in " ".join(text.split())  # the title may wrap
    assert re.search(r"train\s*│\s*10\s*│\s*4\s*│\s*[\d.]+ KB\s*│\s*3\s*│\s*2 / 3 / 5", text), text
    assert re.search(r"train\s*│\s*not an image\s*│\s*2", text), text
    assert re.search(r"train\s*│\s*empty file\s*│\s*1", text), text
