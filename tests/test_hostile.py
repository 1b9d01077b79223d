"""A crawl is hostile input: what a stranger's files, names and bytes (or a clumsy user) can do
to a build, a view and the loaders, one test per attack. Every input row stays accounted for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from _crawls import assert_same_tree, check_dataset, crop, encode, errors, quiet_build, samples, stored_image, write
from wvdata import open_dataset
from wvdata.build.shards import max_input_bytes
from wvdata.cli import main
from wvdata.lock import dataset_lock, holder, taken_over
from wvdata.views import load_view, view

ROOT = Path(__file__).parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(PHOTOS[:2]):
        for i in range(per_class):
            write(root / name / f"{i}.jpg", encode(crop(name, 120 + 10 * i, 90, seed=c * 10 + i)))
    return root


def _reasons(out: Path) -> dict[str, str]:
    return dict(errors(out).select("src_path", "reason").iter_rows())


def test_links_fifos_and_devices_never_read_outside_the_source(tmp_path):
    src = _folder(tmp_path / "src")
    outside = tmp_path / "outside"
    write(outside / "secret.jpg", encode(crop("coffee", 100, 80)))
    write(outside / "cls" / "x.jpg", encode(crop("rocket", 100, 80)))
    os.symlink("/etc/passwd", src / "astronaut" / "passwd.jpg")
    os.symlink(outside / "secret.jpg", src / "astronaut" / "secret.jpg")
    os.symlink("/dev/zero", src / "chelsea" / "zero.jpg")
    os.symlink(outside / "cls", src / "evilclass")  # a class directory outside SRC
    os.symlink(outside / "cls", src / "chelsea" / "sub")  # a sub-directory outside SRC
    os.symlink(src / "chelsea" / "0.jpg", src / "astronaut" / "inside-link.jpg")  # fine: stays inside
    os.mkfifo(src / "chelsea" / "pipe.jpg")  # opening it for reading would block forever
    out = tmp_path / "ds"
    assert main(["build", str(src), "-o", str(out), "--workers", "1", "-q"]) == 0
    frames = check_dataset(out)
    reasons = _reasons(out)
    for rel in ("astronaut/passwd.jpg", "astronaut/secret.jpg", "chelsea/zero.jpg", "evilclass", "chelsea/sub"):
        assert reasons[rel] == "path escapes source", rel
    assert reasons["chelsea/pipe.jpg"] == "not a file"
    assert open_dataset(out).classes == ["astronaut", "chelsea"]  # the linked directory is no class
    built = set(frames["train"]["src_path"])
    assert "astronaut/inside-link.jpg" in built and len(built) == 7
    assert len(built) + len(reasons) == 7 + 6  # every input in exactly one table


def test_reads_are_capped_by_max_pixels(tmp_path):
    src = _folder(tmp_path / "src", per_class=1)
    cap = max_input_bytes(1000)
    with open(src / "chelsea" / "huge.jpg", "wb") as f:
        f.write(encode(crop("chelsea", 40, 30)))
        f.truncate(cap + 1)  # a sparse file: a valid JPEG head and more bytes than any image can need
    out = tmp_path / "ds"
    assert main(["build", str(src), "-o", str(out), "--max-pixels", "1000", "--workers", "1", "-q"]) == 0
    assert _reasons(out)["chelsea/huge.jpg"] == "file too large"


def test_manifest_paths_and_root(tmp_path):
    src = _folder(tmp_path / "src")
    elsewhere = write(tmp_path / "elsewhere" / "a.jpg", encode(crop("rocket", 100, 80)))
    lines = ["path,label", "astronaut/0.jpg,0", f"{elsewhere},1", "chelsea/0.jpg,1.0", "../elsewhere/a.jpg,1"]
    (src / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    quiet_build(src / "m.csv", out)  # absolute paths are the user's own business ...
    assert set(samples(out)["src_path"]) == {"astronaut/0.jpg", str(elsewhere), "chelsea/0.jpg"}
    assert samples(out).filter(pl.col("src_path") == "chelsea/0.jpg")["label"].item() == 1  # "1.0" is 1
    assert _reasons(out) == {"../elsewhere/a.jpg": "path escapes source"}  # relative: inside its folder
    quiet_build(src / "m.csv", tmp_path / "rooted", root=str(src))  # ... unless --root says otherwise
    assert _reasons(tmp_path / "rooted") == {str(elsewhere): "path escapes source",
                                             "../elsewhere/a.jpg": "path escapes source"}


def test_bad_manifest_rows_never_stop_the_build(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    rows = [{"path": "astronaut/0.jpg", "label": 0}, {"path": "astro\x00naut/1.jpg", "label": 0},
            {"path": "chelsea/0.jpg", "label": 1.0}]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\nnot json at all\n[1, 2]\n" + json.dumps(rows[2]) + "\n"
    (src / "m.jsonl").write_text(text)
    out = tmp_path / "ds"
    assert main(["build", str(src / "m.jsonl"), "-o", str(out), "--workers", "1", "-q"]) == 0
    frames = check_dataset(out)
    assert frames["train"].height == 2
    assert sorted(errors(out)["reason"]) == ["malformed manifest row"] * 3  # NUL path, bad line, array
    assert not (out / ".build").exists()
    (src / "empty.csv").write_text("")
    capsys.readouterr()
    assert main(["build", str(src / "empty.csv"), "-o", str(tmp_path / "e"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is empty" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_jpeg_trailers_are_dropped_and_recorded(tmp_path):
    src = tmp_path / "src"
    clean = encode(crop("astronaut", 200, 150))
    write(src / "a" / "x.jpg", clean + os.urandom(1 << 20))  # a valid JPEG carrying 1 MB of payload
    write(src / "a" / "y.jpg", clean)
    out = tmp_path / "ds"
    quiet_build(src, out)
    df = samples(out).sort("src_path")
    x, y = df.to_dicts()
    assert stored_image(out, x) == clean and not x["reencoded"] and x["trailer_bytes"] == 1 << 20
    assert x["sha1"] == y["sha1"] and y["trailer_bytes"] == 0  # so exact dedup sees the copy


@pytest.fixture()
def built(tmp_path):
    src = _folder(tmp_path / "src", per_class=6)
    out = tmp_path / "ds"
    quiet_build(src, out, shard_samples=4)
    return out


def _flip(out: Path, key: str) -> None:
    row = samples(out).filter(pl.col("key") == key).to_dicts()[0]
    with open(out / "train" / f"{row['shard']}.tar", "r+b") as f:
        f.seek(row["data_offset"] + row["bytes"] // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_flipped_bytes_never_reach_training_with_verify(built, backend):
    from wvdata.stream import loader

    key = samples(built)["key"][3]
    _flip(built, key)
    kw = dict(batch_size=4, image_size=32, num_workers=0 if backend == "torch" else 1, backend=backend,
              rank=0, world_size=1, train=False, shuffle=False)
    ld = loader(built, verify=True, **kw)
    seen = [k for _, _, keys in ld for k in keys]
    assert key not in seen and ld.stats.skipped == 1 and len(ld) == 3
    if backend == "torch":
        plain = loader(built, **kw)
        assert key in [k for _, _, keys in plain for k in keys]  # without verify: decoded regardless


def test_wvdata_verify_finds_flipped_bytes_and_a_broken_index(built, tmp_path, capsys):
    assert main(["verify", str(built), "-q"]) == 0
    assert "all intact" in capsys.readouterr().out
    key = samples(built)["key"][5]
    _flip(built, key)
    idx = sorted((built / "train").glob("*.idx"))[-1]
    lines = idx.read_text().splitlines()
    fields = lines[1].split(" ")
    fields[1] = str(int(fields[1]) + 512)  # the first sample's .jpg listed one block off
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    report = tmp_path / "problems.csv"
    assert main(["verify", str(built), "-q", "--report", str(report)]) == 1
    problems = pl.read_csv(report)
    assert problems.filter(pl.col("problem").str.contains("sha1"))["key"].to_list() == [key]
    assert problems.filter(pl.col("problem").str.contains(".idx")).height >= 1


def test_dali_skips_a_missing_shard_and_keeps_batch_counts(built):
    from wvdata.stream import loader

    first = open_dataset(built).shards("train")[0]["name"]
    os.remove(built / "train" / f"{first}.tar")
    for p in (built / "train").glob("*.idx"):
        p.unlink()  # the DALI backend needs no shard .idx: it lists entries from the tables
    lost = set(samples(built).filter(pl.col("shard") == first)["key"])
    kw = dict(batch_size=4, image_size=32, num_workers=1, rank=0, world_size=1, train=False, shuffle=False)
    ld = loader(built, backend="dali", **kw)
    batches = [keys for _, _, keys in ld]
    assert len(batches) == len(ld) == 3 and not lost & {k for b in batches for k in b}
    assert ld.stats.skipped == len(lost) and ld.stats.skipped_by_shard == {first: len(lost)}
    torch_ld = loader(built, backend="torch", **kw)
    assert sum(len(k) for _, _, k in torch_ld) == 12 - len(lost) and torch_ld.stats.skipped == len(lost)


def test_names_read_back_from_the_dataset_are_checked(built):
    from wvdata.stream import loader

    man = json.loads((built / "dataset.json").read_text())
    man["splits"]["train"]["shards"][0]["name"] = "../../../outside/shard-000000"
    (built / "dataset.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="invalid shard name"):
        loader(built, batch_size=4, num_workers=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="invalid view name"):
        load_view(built, "../../etc")


def test_view_names_and_temporary_names(built, capsys):
    (built / "views" / "X.tmp").mkdir(parents=True)
    (built / "views" / "X.tmp" / "keep.txt").write_text("mine")
    view(built, "X", per_class=2)
    assert (built / "views" / "X.tmp" / "keep.txt").read_text() == "mine"
    view(built, "X", per_class=3)  # replacing a view leaves nothing else behind
    assert sorted(p.name for p in (built / "views").iterdir()) == ["X", "X.tmp"]
    assert len(load_view(built, "X")) == 6
    capsys.readouterr()
    assert main(["view", str(built), "v" * 300]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid view name" in err


@pytest.mark.parametrize("where,message", [
    ("key IN (SELECT nosuch FROM read_csv('/etc/passwd'))", "SELECT (a subquery or table access) is not allowed"),
    ("read_parquet('/etc/passwd') IS NULL", "function read_parquet() is not allowed"),
    ("widht > 100", "unknown column 'widht' (did you mean 'width'?)"),
    ("width > 'abc'", "cannot compare"),
])
def test_where_reaches_columns_only(built, capsys, where, message):
    capsys.readouterr()
    assert main(["view", str(built), "w", "--where", where]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "root:" not in err


def test_where_filters_by_columns(built):
    v = view(built, "wide", where="width >= 130 AND lower(class_name) LIKE 'ast%'")
    assert len(v) == 5 and set(v.entries["label"]) == {0}  # astronaut crops 130..170 wide


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(built, tmp_path, capsys):
    with dataset_lock(built, "test holder"):
        capsys.readouterr()
        assert main(["view", str(built), "v", "--per-class", "2"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "test holder" in err
        assert main(["build", str(tmp_path / "nosrc"), "-o", str(built), "--resume", "-q"]) == 2
    script = (f"import os; from wvdata.lock import dataset_lock\n"
              f"with dataset_lock({str(built)!r}, 'doomed'):\n    os._exit(9)\n")  # dies holding the lease
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == 9 and holder(built).command == "doomed"
    view(built, "v", per_class=2)  # the dead holder's lease is taken over
    assert taken_over[-1]["command"] == "doomed" and holder(built) is None


def test_a_killed_writers_forked_workers_do_not_keep_its_lease(tmp_path):
    """A writer SIGKILLed while its forked workers live on: the lease is free at once (workers
    close the inherited lock fd at fork; the build's pool workers also die with their parent)."""
    script = ("import os, sys, time; from wvdata.lock import dataset_lock\n"
              f"with dataset_lock({str(tmp_path)!r}, 'parent'):\n"
              "    if os.fork() == 0:\n        time.sleep(60); os._exit(0)\n"
              "    print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait()
        with dataset_lock(tmp_path, "next writer"):  # refused while the orphan held the lock
            assert holder(tmp_path).command == "next writer"
    finally:
        proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", f"dataset_lock({str(tmp_path)!r}"], check=False)

def test_racing_builds_into_one_directory(tmp_path):
    src = _folder(tmp_path / "src", per_class=6)
    out = tmp_path / "ds"
    results = []
    start = threading.Barrier(2)

    def run():
        start.wait()
        cmd = [sys.executable, "-m", "wvdata.cli", "build", str(src), "-o", str(out), "--workers", "1", "-q"]
        results.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True))

    threads = [threading.Thread(target=run) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2] or codes == [0, 0] and "is not empty" in "".join(r.stderr for r in results), results
    loser = [r for r in results if r.returncode]
    assert all(r.stderr.count("\n") == 1 and "Traceback" not in r.stderr for r in loser)
    check_dataset(out)
    assert main(["build", str(src), "-o", str(out), "--resume", "-q"]) == 0  # no stray state blocks it


def test_disk_full_is_one_line_and_resume_is_byte_identical(tmp_path):
    src = _folder(tmp_path / "src", per_class=6)
    quiet_build(src, tmp_path / "clean", shard_samples=3)
    sizes = sorted(p.stat().st_size for p in (tmp_path / "clean" / "train").glob("*.tar"))
    limit = (sizes[0] + sizes[-1]) // 2 if sizes[0] < sizes[-1] else sizes[0] - 1  # some shards fit, some not
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails like a full disk\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              "from wvdata.cli import main\n"
              f"sys.exit(main(['build', {str(src)!r}, '-o', {str(tmp_path / 'ds')!r}, '--shard-samples', '3',"
              " '--workers', '1', '-q']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "File too large" in proc.stderr, proc.stderr
    assert main(["build", str(src), "-o", str(tmp_path / "ds"), "--shard-samples", "3", "--workers", "1",
                 "--resume", "-q"]) == 0
    assert_same_tree(tmp_path / "clean", tmp_path / "ds")


def test_trainer_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "trainer.train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
           "--model", "test_resnet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a finished dataset" in proc.stderr
    assert np.all([s not in proc.stderr for s in ("Traceback", "File \"")])
