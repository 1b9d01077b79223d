"""`wvdata build --resume`: a build killed with SIGKILL at any point, then resumed, gives output
byte-identical to an uninterrupted build; mismatched or careless reuse of an output dir is refused."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _crawls import assert_same_tree, crop, encode, manifest, quiet_build, tree, write
from wvdata import build
from wvdata.cli import main
from wvdata.lock import LOCK_NAME
from wvdata.synth import make_webvision_crawl

OPTS = ["--workers", "1", "--shard-samples", "4", "--resize-short", "64", "-q"]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return make_webvision_crawl(tmp_path_factory.mktemp("resume") / "crawl", classes=4,
                                train_per_class=12, val_per_class=8, test=8,
                                sizes=((400, 300), (300, 400)), seed=5)


@pytest.fixture(scope="module")
def reference(crawl, tmp_path_factory):
    """The uninterrupted build (in this process, through the Python API)."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    quiet_build(crawl.root, out, shard_samples=4, resize_short=64)
    assert len(manifest(out)["splits"]["train"]["shards"]) == 12
    return out


def _killed_build(src: Path, out: Path, ready, attempts: int = 5, opts: list[str] = OPTS) -> None:
    """Run `wvdata build` in a subprocess and SIGKILL it as soon as `ready()` holds.

    When the build ends before `ready()` is seen (a busy machine can stall this poll), the
    output is removed and the build started again, so a kill really happens mid-way.
    """
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "-m", "wvdata.cli", "build", str(src), "-o", str(out)]
                                + opts, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        try:
            while not ready() and proc.poll() is None:
                assert time.monotonic() < deadline, "timed out waiting for the build"
                time.sleep(0.0005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        finished = (out / "dataset.json").exists() and not [
            p for p in (out / ".build").rglob("*") if p.is_file()]
        if proc.returncode == -signal.SIGKILL and not finished:
            return
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
        shutil.rmtree(out)
    pytest.fail(f"the build always ended before it could be killed ({attempts} tries)")


def _files(out: Path, pattern: str) -> int:
    return len(list(out.glob(pattern))) if out.exists() else 0


KILL_POINTS = {
    # while the interpreter is still starting: nothing written yet
    "at-start": lambda out: True,
    # as soon as the output dir appears: the build is setting up its work area
    "out-created": lambda out: out.exists(),
    # a few train shards are complete (or being renamed into place)
    "first-shards": lambda out: _files(out, "train/*.tar") >= 2,
    "half-way": lambda out: _files(out, "train/*.tar") >= 6,
    # train is done, val in progress
    "in-val": lambda out: _files(out, "val/*"),
    # every shard is done: writing samples.parquet, errors.parquet, dataset.json, cleaning up
    "finalizing": lambda out: (out / "train" / "samples.parquet").exists(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_then_resume_is_byte_identical(crawl, reference, tmp_path, point, capsys):
    out = tmp_path / "ds"
    _killed_build(crawl.root, out, lambda: KILL_POINTS[point](out))
    if point in ("first-shards", "half-way", "in-val"):
        assert not (out / "dataset.json").exists()  # it really was cut short
    opts = OPTS + (["--workers", "2"] if point == "half-way" else [])  # not an option of the output
    assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + opts) == 0
    printed = capsys.readouterr().out
    assert_same_tree(reference, out)
    done = int(printed.split(" already complete")[0].rsplit("(", 1)[1])
    least = {"half-way": 5, "in-val": 12}.get(point, 0)
    assert least <= done <= 22  # complete shards were not redone


ONE_SHARD = ["--resize-short", "64", "-q"]  # default shard size: one shard per split


def test_kill_mid_chunk_of_a_one_shard_build_then_resume(crawl, tmp_path):
    """The local pool joins a shard from chunks of images as they come back: killed while the
    shard's tar is half appended (some chunks in, others in flight), the resumed build, on
    another number of workers, is byte-identical to an uninterrupted 1-worker build."""
    reference = tmp_path / "ref"
    quiet_build(crawl.root, reference, resize_short=64)
    assert [len(s["shards"]) for s in manifest(reference)["splits"].values()] == [1, 1, 1]
    out = tmp_path / "ds"
    for _ in range(5):  # a busy machine can stall the poll past the shard's end: then again
        _killed_build(crawl.root, out, lambda: _files(out, "train/shard-000000.tar.tmp-*") > 0,
                      opts=ONE_SHARD + ["--workers", "2"])
        if not (out / "train" / "shard-000000.tar").exists():
            break  # cut short inside the shard
        shutil.rmtree(out)
    else:
        pytest.fail("the shard was always complete before the kill")
    assert main(["build", str(crawl.root), "-o", str(out), "--resume", "--workers", "3"] + ONE_SHARD) == 0
    assert_same_tree(reference, out)


def test_leftovers_of_a_kill_inside_a_write_are_not_kept(crawl, reference, tmp_path):
    """A kill inside a write leaves NAME.tmp-PID; one right at the start an unstamped .build."""
    out = tmp_path / "ds"
    _killed_build(crawl.root, out, lambda: _files(out, "train/*.tar") >= 3)
    for stray in ("train/shard-000007.tar.tmp-4242", "train/shard-000007.idx.tmp-4242",
                  "train/samples.parquet.tmp-4242", "dataset.json.tmp-4242"):
        write(out / stray, b"half written")
    assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + OPTS) == 0
    assert_same_tree(reference, out)

    fresh = tmp_path / "fresh"  # killed before the build wrote anything but its work dir
    write(fresh / ".build" / "fingerprint.tmp-4242", b"")
    assert main(["build", str(crawl.root), "-o", str(fresh), "--resume"] + OPTS) == 0
    assert_same_tree(reference, fresh)

    bare = tmp_path / "bare"  # killed between creating .build and starting its fingerprint
    (bare / ".build").mkdir(parents=True)
    assert main(["build", str(crawl.root), "-o", str(bare), "--resume"] + OPTS) == 0
    assert_same_tree(reference, bare)


def test_an_error_while_writing_a_shard_leaves_no_partial_tar(crawl, reference, tmp_path, monkeypatch):
    """A write that fails part-way through a shard (a full disk, a store error) removes that shard's
    temporary tar even while the failed writer is still referenced (here by the traceback), and
    `--resume` then completes the dataset byte for byte."""
    from _faults import failing_append

    from wvdata.build import shards

    plan = tmp_path / "fail-once"
    plan.mkdir()
    (plan / "train-shard-000003").touch()
    monkeypatch.setattr(shards.ShardSink, "_append", failing_append(str(plan)))
    out = tmp_path / "ds"
    with pytest.raises(OSError, match="No space left") as failed:
        quiet_build(crawl.root, out, shard_samples=4, resize_short=64)
    assert failed.traceback  # the failed writer is still referenced: only the build's clean-up can act
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert (out / "train" / "shard-000002.tar").exists() and not (out / "train" / "shard-000003.tar").exists()
    monkeypatch.undo()
    assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + OPTS) == 0
    assert_same_tree(reference, out)


def test_resume_with_other_options_is_refused(crawl, tmp_path, capsys):
    out = tmp_path / "ds"
    _killed_build(crawl.root, out, lambda: _files(out, "train/*.tar") >= 2)
    before = _content(out)
    for change in (["--shard-samples", "5"], ["--seed", "1"], ["--resize-short", "96"]):
        opts = OPTS + change
        assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + opts) == 2
        err = capsys.readouterr().err
        assert "started with other inputs or options" in err and "--overwrite" in err
    with pytest.raises(ValueError, match="other inputs or options"):
        build(crawl.root, out, shard_samples=4, resize_short=64, quality=80, resume=True,
              workers=1, progress=False)
    assert _content(out) == before  # nothing was touched (the killed build's stale lease was taken over)


def _content(root) -> dict[str, bytes]:
    """Every file but the writer's lease (wvdata.lock)."""
    return {k: v for k, v in tree(root).items() if k != LOCK_NAME}


def test_a_non_empty_output_dir_needs_resume_or_overwrite(crawl, reference, tmp_path, capsys):
    out = tmp_path / "ds"
    write(out / "precious.txt", b"keep me")
    write(out / ".build" / "cache.bin", b"another tool's")
    mine = tree(out)
    assert main(["build", str(crawl.root), "-o", str(out)] + OPTS) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and "--overwrite" in err
    with pytest.raises(FileExistsError):
        quiet_build(crawl.root, out, shard_samples=4, resize_short=64)
    assert tree(out) == mine
    # --resume does not adopt a directory that no build started
    assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + OPTS) == 2
    assert tree(out) == mine
    assert main(["build", str(crawl.root), "-o", str(out), "--overwrite"] + OPTS) == 0
    assert_same_tree(reference, out)
    # resuming a finished dataset with the same options does nothing; with others it refuses
    capsys.readouterr()
    assert main(["build", str(crawl.root), "-o", str(out), "--resume"] + OPTS) == 0
    assert capsys.readouterr().out.startswith(f"nothing to do: {out} is complete")
    assert_same_tree(reference, out)
    assert main(["build", str(crawl.root), "-o", str(out), "--resume", "--seed", "9"] + OPTS) == 2
    assert "built with other options" in capsys.readouterr().err
    assert_same_tree(reference, out)


def test_overwrite_never_deletes_the_source(tmp_path, capsys):
    src = tmp_path / "photos" / "crawl"
    for i in range(3):
        write(src / "cat" / f"{i}.jpg", encode(crop("chelsea", 60, 40, seed=i)))
    before = tree(tmp_path)
    for out in (src, src.parent, src / "cat" / ".."):
        assert main(["build", str(src), "-o", str(out), "--overwrite", "-q"]) == 2
        assert "refusing to --overwrite" in capsys.readouterr().err
    assert tree(tmp_path) == before
