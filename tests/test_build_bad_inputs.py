"""`wvdata build` on bad input: every listed input is accounted for, with a readable reason."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from _crawls import check_dataset, crop, encode, errors, key_json, quiet_build, samples, sha1, stored_image, write
from wvdata.cli import main

MAX_PIXELS = 20_000  # every good image below is 120x90 = 10,800 pixels


def _good(seed: int) -> bytes:
    return encode(crop(("chelsea", "astronaut", "coffee", "rocket")[seed % 4], 120, 90, seed=seed))


def _bad_webvision(root: Path) -> tuple[dict, dict]:
    """A WebVision-layout crawl full of problems.

    Returns {split: [(src_path, reason or None)]} for every non-blank filelist line, in order,
    and {src_path: expected meta_error substring or None} for the train images that get built.
    """
    info = root / "info"
    write(info / "synsets.txt", b"n01 cat\nn02 astronaut\nn03 mug\n")
    write(info / "queries_google.txt", b"1 cat\n2 astronaut\n3 mug\n")
    g = root / "google"
    for i in range(8):
        write(g / "q0001" / f"good{i}.jpg", _good(i))
    write(g / "q0001" / "ünïcödé name.jpg", _good(8))  # the label is the last field: spaces are fine
    write(g / "q0001" / "empty.jpg", b"")
    write(g / "q0001" / "trunc.jpg", _good(9)[:2000])
    write(g / "q0001" / "random.jpg", bytes((i * 7919 + 13) % 251 for i in range(4096)))
    write(g / "q0001" / "text.jpg", b"<html><body>404 Not Found</body></html>\n")
    write(g / "q0001" / "image.ppm", encode(crop("coffee", 40, 30), "PPM"))
    write(g / "q0001" / "icon.jpg", encode(crop("coffee", 32, 32), "ICO"))
    write(g / "q0001" / "big.jpg", encode(crop("rocket", 160, 150)))      # 24,000 px: > max
    write(g / "q0001" / "huge.png", encode(crop("rocket", 300, 200), "PNG"))  # > 2x max
    (g / "q0001" / "folder.jpg").mkdir()
    write(root.parent / "outside.jpg", _good(10))  # exists, but outside the crawl
    write(root / "meta" / "google" / "q0001.json",
          json.dumps([{"title": f"t{i}", "description": "d", "tags": ["x"]} for i in range(8)]).encode())
    write(root / "meta" / "google" / "q0003.json", b'[{"title": "cut short"')
    # (path, label field, meta line, reason, meta_error)
    train = [
        ("google/q0001/good0.jpg", "0", "google/q0001.json 1", None, None),
        ("google/q0001/good1.jpg", "0", "google/q0001.json", None, "malformed meta line"),
        ("google/q0001/good2.jpg", "1", "google/q0002.json 1", None, "missing"),
        ("google/q0001/good3.jpg", "2", "google/q0003.json 1", None, "unreadable"),
        ("google/q0001/good4.jpg", "0", "google/q0001.json 99", None, "meta record 99"),
        ("google/q0001/good5.jpg", "0", "google/q0001.json x", None, "malformed meta line"),
        ("google/q0001/empty.jpg", "0", "google/q0001.json 1", "empty file", None),
        ("google/q0001/trunc.jpg", "0", "google/q0001.json 1", "truncated image", None),
        ("google/q0001/random.jpg", "0", "google/q0001.json 1", "not an image", None),
        ("google/q0001/text.jpg", "0", "google/q0001.json 1", "not an image", None),
        ("google/q0001/missing.jpg", "0", "google/q0001.json 1", "missing file", None),
        ("google/q0001/image.ppm", "0", "google/q0001.json 1", "unsupported format", None),
        ("google/q0001/icon.jpg", "0", "google/q0001.json 1", "unsupported format", None),
        ("google/q0001/big.jpg", "0", "google/q0001.json 1", "decompression bomb", None),
        ("google/q0001/huge.png", "0", "google/q0001.json 1", "decompression bomb", None),
        ("google/q0001/folder.jpg", "0", "google/q0001.json 1", "not a file", None),
        ("google/q0001/good0.jpg", "0", "google/q0001.json 1", "duplicate path", None),
        ("google/q0001/./good0.jpg", "0", "google/q0001.json 1", "duplicate path", None),
        ("google/q0001/good6.jpg", "3", "google/q0001.json 1", "label out of range", None),
        ("google/q0001/good6.jpg", "-1", "google/q0001.json 1", "label out of range", None),
        ("google/q0001/good6.jpg", "cat", "google/q0001.json 1", "bad label", None),
        ("google/q0001/good7.jpg", "1.0", "google/q0001.json 1", None, None),  # an integer, as in manifests
        ("../outside.jpg", "0", "google/q0001.json 1", "path escapes source", None),
        ("google/../../outside.jpg", "0", "google/q0001.json 1", "path escapes source", None),
        (str(root.parent / "outside.jpg"), "0", "google/q0001.json 1", "path escapes source", None),
        ("google/q0001/ünïcödé name.jpg", "0", "google/q0001.json 1", None, None),
        ("google/q0001/good7.jpg", "", "google/q0001.json 1", "malformed filelist line", None),
        ("google/q0001/good7.jpg", "0 extra", "google/q0001.json 1", "bad label", None),
    ]
    # the two lists are read line by line in step; blank lines are skipped
    write(info / "train_filelist_google.txt",
          "".join(f"{p} {lab}\n" + ("\n" if i == 3 else "") for i, (p, lab, *_) in enumerate(train)).encode())
    write(info / "train_meta_list_google.txt",
          "".join(f"{t[2]}\n" + ("\n" if i == 3 else "") for i, t in enumerate(train)).encode())
    write(root / "val_images_256" / "val1.jpg", _good(11))
    write(root / "val_images_256" / "val2.jpg", _good(12))
    write(info / "val_filelist.txt", b"val1.jpg 1\nval2.jpg\nval3.jpg 2\n")
    write(root / "test_images_256" / "test1.jpg", _good(13))
    write(info / "test_filelist.txt", b"test1.jpg\ntest2.jpg\n")

    def src_path(p, lab):  # a line without a label is reported whole; else the path is all but the last field
        line = f"{p} {lab}".strip()
        return line if len(line.split()) < 2 else line.rsplit(" ", 1)[0]

    expect = {
        "train": [(src_path(p, lab), reason) for p, lab, _, reason, _ in train],
        "val": [("val1.jpg", None), ("val2.jpg", "malformed filelist line"), ("val3.jpg", "missing file")],
        "test": [("test1.jpg", None), ("test2.jpg", "missing file")],
    }
    metas = {p: err for p, _, _, reason, err in train if reason is None}
    return expect, metas


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    expect, metas = _bad_webvision(root / "src")
    return root, expect, metas


def test_every_listed_input_is_built_or_rejected_with_its_reason(bad, capsys):
    root, expect, metas = bad
    out = root / "ds"
    rc = main(["build", str(root / "src"), "-o", str(out), "--max-pixels", str(MAX_PIXELS),
               "--shard-samples", "2", "--workers", "2", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    frames = check_dataset(out)
    want_reasons = Counter()
    for split, lines in expect.items():
        built = frames[split]
        err = errors(out, split)
        assert built.height + err.height == len(lines)  # every line in exactly one table
        assert sorted(built["src_path"]) == sorted(p for p, r in lines if r is None)
        assert sorted(err.select("src_path", "reason").rows()) == sorted((p, r) for p, r in lines if r)
        assert err["detail"].null_count() == 0
        want_reasons.update(r for _, r in lines if r)
    for reason, n in want_reasons.items():
        assert f"rejected, {reason}: {n}" in printed
    total = sum(want_reasons.values())
    assert f"{total} rejected" in printed


def test_bad_or_missing_metadata_keeps_the_image(bad):
    root, _, metas = bad
    out = root / "ds-meta"
    limit = Image.MAX_IMAGE_PIXELS
    quiet_build(root / "src", out, max_pixels=MAX_PIXELS, splits=("train",))
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global limit is this process's, left as it was
    rows = {r["src_path"]: r for r in samples(out).to_dicts()}
    assert sorted(rows) == sorted(metas)
    for path, want in metas.items():
        row = rows[path]
        doc = key_json(out, row)
        assert stored_image(out, row) == (root / "src" / path).read_bytes()
        if want is None:
            assert row["meta_error"] is None and doc["meta"]["title"] == "t0"
        else:
            assert want in row["meta_error"] and want in doc["meta_error"], (path, row["meta_error"])
            assert doc["meta"] == {} and row["meta"] is None


def test_strict_exits_non_zero_only_when_something_was_rejected(bad, tmp_path, capsys):
    root, _, _ = bad
    args = ["--workers", "1", "-q", "--strict", "--max-pixels", str(MAX_PIXELS)]
    assert main(["build", str(root / "src"), "-o", str(tmp_path / "a")] + args) == 1
    assert "--strict" in capsys.readouterr().err
    assert (tmp_path / "a" / "dataset.json").exists()  # the dataset is still written
    clean = tmp_path / "clean"
    for i in range(3):
        write(clean / "cls" / f"{i}.jpg", _good(i))
    assert main(["build", str(clean), "-o", str(tmp_path / "b")] + args) == 0


def test_awkward_file_names_are_built(tmp_path):
    src = tmp_path / "src"
    names = ["a b c.jpg", "x.y.z.jpg", ".hidden.jpg", "ünïcödé.jpg", "日本語.jpg", "semi;colon#.jpg",
             os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"\xff\xfe.jpg"), "no_extension"]
    classes = ["plain", "with space", "dots.in.name", os.fsdecode(b"cl\xe9s")]
    files = {}
    for c, cls in enumerate(classes):
        for i, name in enumerate(names):
            data = _good(10 * c + i)
            write(src / cls / name, data)
            files[(c, name)] = data
    quiet_build(src, tmp_path / "ds", shard_samples=5, workers=2)
    frames = check_dataset(tmp_path / "ds")
    df = frames["train"]
    assert errors(tmp_path / "ds").height == 0
    assert df.height == len(files) == len(set(df["key"]))
    shown = sorted(os.fsencode(c).decode("utf-8", "backslashreplace") for c in classes)
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["classes"] == shown
    assert "cl\\xe9s/caf\\xe9.jpg" in set(df["src_path"])  # undecodable bytes shown as \xNN
    for row in df.to_dicts():
        cls_name, name = row["src_path"].split("/")
        assert row["class_name"] == cls_name
        c = shown.index(cls_name)
        original = [d for (cc, n), d in files.items()
                    if os.fsencode(classes[cc]).decode("utf-8", "backslashreplace") == cls_name
                    and os.fsencode(n).decode("utf-8", "backslashreplace") == name]
        assert len(original) == 1 and row["label"] == c
        assert row["sha1"] == sha1(original[0])


def test_manifest_bad_rows(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write(src / "images" / f"{i}.jpg", _good(i))
    write(tmp_path / "elsewhere.jpg", _good(7))
    rows = [  # (path, label, split, reason)
        ("images/0.jpg", "0", "train", None),
        ("images/1.jpg", "1", "val", None),
        ("images/2.jpg", "", "test", None),
        (str(tmp_path / "elsewhere.jpg"), "1", "train", None),  # absolute paths are allowed
        ("images/./0.jpg", "0", "train", "duplicate path"),
        ("images/0.jpg", "1", "holdout", "bad split"),
        ("", "0", "train", "malformed manifest row"),
        ("images/1.jpg", "one", "train", "bad label"),
        ("images/1.jpg", "-3", "train", "label out of range"),
        ("../elsewhere.jpg", "0", "train", "path escapes source"),
        ("images/9.jpg", "0", "train", "missing file"),
        ("images/2.jpg", "", "train", "bad label"),
    ]
    pl.DataFrame({"path": [r[0] for r in rows], "label": [r[1] for r in rows],
                  "split": [r[2] for r in rows]}).write_csv(src / "m.csv")
    quiet_build(src / "m.csv", tmp_path / "ds", shard_samples=2)
    check_dataset(tmp_path / "ds")
    built, err = samples(tmp_path / "ds"), errors(tmp_path / "ds")
    assert built.height + err.height == len(rows)
    assert sorted(built["src_path"]) == sorted(r[0] for r in rows if r[3] is None)
    assert sorted(err.select("src_path", "reason").rows()) == sorted((r[0], r[3]) for r in rows if r[3])


def test_loose_files_beside_split_folders_are_reported(tmp_path):
    src = tmp_path / "crawl"
    for split in ("train", "val"):
        write(src / split / "cat" / "0.jpg", encode(crop("chelsea", 80, 60)))
    write(src / "stray.jpg", encode(crop("coffee", 80, 60)))
    quiet_build(src, tmp_path / "ds")
    err = errors(tmp_path / "ds", "train")
    assert err.select("src_path", "reason").rows() == [("stray.jpg", "not in a class folder")]
    assert samples(tmp_path / "ds", "train").height == 1 and samples(tmp_path / "ds", "val").height == 1
