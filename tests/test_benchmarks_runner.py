"""`python -m benchmarks` on a tiny package of benchmark modules made here (one that passes, one that
fails after a result, one that hangs, one missing): results.json, results.md, ratios.png and the
per-module outputs are written, failures and timeouts are reported and the run goes on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

OK = """
import argparse
from benchmarks._common import failed, parse_scaled, result

def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int)
    a = parse_scaled(p, argv, {"small": {"n": 10}, "full": {"n": 1000}})
    print(f"ok bench at n={a.n}")
    result("ok", "rate", 300.0 * a.n, "img/s", baseline="peer", baseline_value=100.0 * a.n, target=2.0)
    result("ok", "time", 2.0, "s", baseline="slow peer", baseline_value=5.0, higher_is_better=False, target=3.0)
    result("ok", "share", 0.95, "", target=0.9)
    failed("ok", "other loader", RuntimeError("trainer failed\\nValueError: no such loader"))

if __name__ == "__main__":
    main()
"""
BAD = """
from benchmarks._common import result
result("bad", "half done", 1.0, "s", baseline="peer", baseline_value=4.0, higher_is_better=False)
raise SystemExit("boom: the disk is full")
"""
HANG = """
import time
print("hang bench starting", flush=True)
time.sleep(60)
"""


def test_runner_reports_results_failures_and_missing_modules(tmp_path):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, code in (("ok_bench", OK), ("bad_bench", BAD), ("hang_bench", HANG)):
        (pkg / f"{name}.py").write_text(textwrap.dedent(code))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--package", "fakebench", "--only",
                           "ok,bad,missing,hang", "--scale", "small", "--timeout", "8", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a failed module fails the run, after all of them ran
    doc = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in doc["modules"]] == ["ok_bench", "bad_bench", "missing_bench", "hang_bench"]
    assert [m["status"] for m in doc["modules"]] == ["ok", "failed", "missing", "failed"]
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]
    assert doc["machine"]["stack"]["numpy"] and "litdata" in doc["machine"]["peers"]
    rows = {(r["bench"], r["figure"]): r for r in doc["rows"]}
    rate = rows[("ok", "rate")]
    assert rate["value"] == 3000.0 and rate["ratio"] == 3.0 and rate["met"] is True  # --scale small reached it
    time_row = rows[("ok", "time")]
    assert time_row["ratio"] == 2.5 and time_row["met"] is False  # lower is better: 5 s / 2 s, below 3x
    assert rows[("ok", "share")]["met"] is True and "ratio" not in rows[("ok", "share")]
    assert rows[("ok", "other loader")]["status"] == "failed"  # one figure failing, the module going on
    assert rows[("ok", "other loader")]["error"] == "ValueError: no such loader"
    assert rows[("bad", "half done")]["ratio"] == 4.0  # rows printed before a failure are kept
    assert "boom: the disk is full" in rows[("bad_bench", "(failed)")]["error"]
    assert "timed out" in rows[("hang_bench", "(failed)")]["error"]
    assert rows[("missing_bench", "(not present)")]["status"] == "missing"
    md = (out / "results.md").read_text()
    assert "| benchmark | figure | wvdata | baseline | ratio | target | met |" in md
    assert "| ok | rate | 3,000 img/s | peer: 1,000 img/s | 3.00x | >= 2x | yes |" in md
    assert "| ok | time | 2 s | slow peer: 5 s | 2.50x | >= 3x | **no** |" in md
    assert "FAILED" in md and "boom" in md and "MISSING" in md
    assert "| ok | other loader: ValueError: no such loader | - | - | - | - | FAILED |" in md
    assert "ok bench at n=10" in (out / "ok_bench.txt").read_text()
    assert "hang bench starting" in (out / "hang_bench.txt").read_text()
    with Image.open(out / "ratios.png") as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 100
        # three ratios drawn: bars in green (met or >= 1x without a target) and red (missed)
        colours = {c for _, c in im.getcolors(1 << 16)}
        assert (60, 160, 80) in colours and (200, 70, 60) in colours
