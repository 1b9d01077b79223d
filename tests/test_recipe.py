"""`python -m trainer.recipe`: the whole recipe as one resumable command, run as a user runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _train import ROOT

from trainer.recipe import load_config, main, plan

# a tiny crawl and a 32 px model: every stage in seconds on 2 cores
TINY = """
crawl = "{out}/crawl"
out = "{out}"
workers = 1
progress = false
{skip}
[generate]
per_class = [6, 9]
val_per_class = 3
test = 6
label_noise = 0.2
duplicates = 0.1
sizes = [[120, 90], [90, 120]]

[build]
resize_short = 48
shard_samples = 32

[clean]
drop_duplicates = true
drop_leaks = true

[train]
model = "test_resnet"
image_size = 32
batch_size = 16
lr = 0.5
randaug = [0, 0]
warmup_epochs = 0.3
epochs = {epochs}
workers = 1

[embed]
batch_size = 32

{models}
"""
QUICK = dict(skip='skip = ["aum", "embed", "curriculum", "filtered"]', models="", epochs=3)
FULL = dict(skip="", epochs=2, models="""
[aum]
drop_fraction = 0.2

[[models]]
name = "round2"
per_class = 8

[[models]]
name = "cur"
stages = "1:1,1+2+3:1"

[ensemble]
generations = 3
population = 8
""")


def _config(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(TINY.format(out=tmp_path / "out", **kw))
    return path


def _recipe(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.recipe", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def check_report(out: Path) -> list[str]:
    """Every src/href of report.html is a relative path to a file that exists; returns them."""
    parser = _Links()
    parser.feed((out / "report.html").read_text())
    assert parser.links
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link
        assert (out / link).is_file(), link
    return parser.links


def _state(out: Path) -> dict:
    return json.loads((out / "recipe-state.json").read_text())["stages"]


def test_killed_recipe_resumes_then_skips_everything(tmp_path):
    """Build, dedup, the clean view, one small training run and the report; SIGKILL of the whole recipe
    (process group, trainer included) during the training stage; the rerun resumes the trainer from its
    checkpoint and finishes; a third run skips every stage."""
    cfg = _config(tmp_path, **QUICK)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.recipe", str(cfg)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, checkpoint = out / "runs" / "round1" / "metrics.jsonl", out / "runs" / "round1" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None:  # epoch 0 done (written whole, then renamed)
        assert time.time() < deadline, "round1 never finished an epoch"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = _state(out)
    assert state["round1"]["status"] == "started" and state["build"]["status"] == "done"
    assert "report" not in state

    second = _recipe(str(cfg)).stdout
    for name in ("crawl", "build", "dedup", "clean"):
        assert f"] {name}: up to date" in second, second
    assert "round1 (resuming)" in second and "resumed from" in second
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert epochs[-1] == 2 and set(epochs) == {0, 1, 2}
    state = _state(out)
    assert all(rec["status"] == "done" for rec in state.values()) and list(state) == [
        "crawl", "build", "dedup", "clean", "round1", "report"]
    assert state["round1"]["stats"]["resumed"] is True
    for p in ("dataset/dataset.json", "dataset/annotations/dedup.parquet", "dataset/views/clean/entries.parquet",
              "runs/round1/checkpoint.pt", "runs/round1/scores/val.npy", "figures/dedup.png", "report.html"):
        assert (out / p).is_file(), p
    links = check_report(out)
    assert "figures/dedup.png" in links and "figures/curves.png" in links

    third = _recipe(str(cfg)).stdout
    assert third.count("up to date") == 6, third
    assert _state(out) == state  # nothing ran, nothing was rewritten
    assert "report: " + str(out / "report.html") in third.splitlines()[-1]


@pytest.mark.slow
def test_the_whole_recipe_end_to_end(tmp_path):
    """Every stage on a tiny crawl; a second run skips all of them; --from reruns the tail only."""
    cfg = _config(tmp_path, **FULL)
    out = tmp_path / "out"
    first = _recipe(str(cfg)).stdout
    names = [s.name for s in plan(load_config(str(cfg)))]
    assert names == ["crawl", "build", "dedup", "clean", "round1", "aum", "embed", "curriculum", "filtered",
                     "round2", "cur", "ensemble", "report"]
    state = _state(out)
    assert list(state) == names and all(r["status"] == "done" for r in state.values())
    for p in ("dataset/annotations/aum.parquet", "dataset/annotations/curriculum.parquet",
              "dataset/features/round1/features.npy", "dataset/views/filtered/entries.parquet",
              "runs/round2/scores/val.npy", "runs/cur/scores/val.npy", "ensemble/metrics.json",
              "figures/aum.png", "figures/curriculum.png", "figures/curves.png"):
        assert (out / p).is_file(), p
    links = check_report(out)
    assert {"figures/aum.png", "figures/curriculum.png", "figures/dedup.png"} <= set(links)
    html = (out / "report.html").read_text()
    assert "AUM-flagged" in html and "rejected: " in html and "ensemble: ga" in html and "class balance" in html
    assert "report: " in first.splitlines()[-1] and "AUM-filtered round2" in first

    second = _recipe(str(cfg)).stdout
    assert second.count("up to date") == len(names)
    third = _recipe(str(cfg), "--from", "cur").stdout
    assert third.count("up to date") == names.index("cur")
    after = _state(out)
    for n in names:
        changed = after[n]["started"] != state[n]["started"]
        assert changed == (names.index(n) >= names.index("cur")), n


def test_config_errors_are_one_line(tmp_path, capsys):
    cfg = _config(tmp_path, **QUICK)
    text = cfg.read_text()
    cases = [
        (text.replace("workers = 1\nprogress", "wrkers = 1\nprogress"), "unknown key(s) ['wrkers']"),
        (text.replace("lr = 0.5", "lr = \"fast\""), "round1: argument --lr: invalid float value: 'fast'"),
        (text.replace("resize_short = 48", "resize_shortest = 48"), "[build] unknown build option(s)"),
        (text.replace('skip = ["aum", "embed", "curriculum", "filtered"]', 'skip = ["round1"]'),
         "needs ['round1']: skip"),
        (text + "\n[[models]]\nname = \"build\"\n", "`name` must be a new stage name"),
    ]
    for body, message in cases:
        cfg.write_text(body)
        assert main_exit([str(cfg)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    cfg.write_text(text)
    assert main_exit([str(cfg), "--from", "nope"]) == 2
    err = capsys.readouterr().err
    assert "not a stage of this recipe; stages: crawl, build, dedup, clean, round1, report" in err


def main_exit(argv: list[str]) -> int:
    from trainer._cli import run_main

    return run_main(main, argv, prog="trainer.recipe")


def test_demo_config_is_shipped_and_lists_its_stages(capsys, tmp_path):
    assert main_exit(["demo", "--out", str(tmp_path / "d"), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines] == ["crawl", "build", "dedup", "clean", "round1", "aum", "embed",
                                             "curriculum", "filtered", "round2", "clean-first", "ensemble", "report"]
    assert all(" to run " in x for x in lines)
    assert any("python -m trainer.train" in x and "--view filtered --stages" in x for x in lines)
