"""Every benchmark in one run, on the same cores: `python -m benchmarks [--only NAME[,NAME]]
[--scale small|full] [--out DIR]`.

Each module runs as `python -m benchmarks.NAME --scale S` in its own process, one after the other;
its output goes to the terminal and to DIR/NAME.txt, and its `RESULT {json}` lines (printed by
`benchmarks._common.result`) are collected into DIR/results.json (with the machine), DIR/results.md
(one table: benchmark, figure, wvdata, baseline, ratio, target, met) and DIR/ratios.png. A module
that fails is reported as failed and the run goes on; one that does not exist (yet) is skipped
with a note. `--scale small` aims at about 10 minutes on 2 idle cores (26 minutes measured with
other jobs at load 9-15, benchmarks/results/small); full takes hours (sizes in each module's
docstring). gpu_bench skips itself in one line without CUDA.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import _report
from benchmarks._common import SCALES, load

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("build_bench", "stream_bench", "dedup_bench", "curriculum_bench", "aum_bench", "ensemble_bench",
           "train_bench", "verify_bench", "scale_bench", "eval_bench", "gpu_bench")


def _name(n: str) -> str:
    n = n.strip()
    return n if n.endswith("_bench") or "." in n else f"{n}_bench"


def run_module(package: str, name: str, scale: str, out: Path, timeout: float | None) -> tuple[dict, list[dict]]:
    """Run one module, teeing its output to out/NAME.txt; (its summary, its rows)."""
    mod = f"{package}.{name}"
    if importlib.util.find_spec(mod) is None:
        print(f"== {name}: skipped, no module {mod} (yet)", flush=True)
        return {"name": name, "status": "missing"}, [
            {"bench": name, "figure": "(not present)", "status": "missing", "error": f"no module {mod}"}]
    print(f"== {name} (--scale {scale}) [{load()}]", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    text: list[str] = []
    with open(out / f"{name}.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", mod, "--scale", scale], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, start_new_session=True)

        def tee() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                text.append(line)
        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the module and the workers it started
            rc = proc.wait()
        reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    rows = _report.parse_results("".join(text), name)
    summary = {"name": name, "status": "ok" if rc == 0 and not timed_out else "failed", "exit_code": rc,
               "seconds": round(seconds, 1), "rows": len(rows)}
    if summary["status"] == "failed":
        last = next((s.strip() for s in reversed(text) if s.strip() and not s.startswith(_report.PREFIX)), "")
        why = f"timed out after {timeout:.0f}s" if timed_out else f"exit status {rc}"
        summary["error"] = f"{why}: {last}"[:500]
        rows.append({"bench": name, "figure": "(failed)", "status": "failed", "error": summary["error"]})
    elif not rows:  # e.g. gpu_bench without CUDA: its last line says why
        last = next((s.strip() for s in reversed(text) if s.strip()), "")[:200]
        rows.append({"bench": name, "figure": "(no figures)", "status": "skipped", "error": last})
    print(f"== {name}: {summary['status']} in {seconds:.0f}s, {len(rows)} rows [{load()}]", flush=True)
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated modules (default: all of {', '.join(MODULES)})")
    p.add_argument("--scale", choices=SCALES, default="full")
    p.add_argument("--out", default=None, help="folder for the results (default benchmarks/results/SCALE)")
    p.add_argument("--timeout", type=float, default=0, help="seconds per module before it is killed (0: none)")
    p.add_argument("--package", default="benchmarks", help=argparse.SUPPRESS)  # the runner's own test
    args = p.parse_args(argv)
    names = [_name(n) for n in args.only.split(",") if n.strip()] if args.only else list(MODULES)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / args.scale
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = datetime.now(timezone.utc), load()
    modules, rows = [], []
    for name in names:
        summary, got = run_module(args.package, name, args.scale, out, args.timeout or None)
        modules.append(summary)
        rows += got
    meta = {"scale": args.scale, "started": started.strftime("%Y-%m-%d %H:%M"),
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_before": load_before.removeprefix("load average "),
            "load_after": load().removeprefix("load average ")}
    _report.write(out, rows, modules, meta)
    failed = [m["name"] for m in modules if m["status"] == "failed"]
    failed += sorted({r["bench"] for r in rows if r.get("status") == "failed"} - set(failed))
    print(f"\n{out / 'results.md'}:\n" + (out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, ratios.png and one NAME.txt per module"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
