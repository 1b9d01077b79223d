"""What `python -m benchmarks` writes: the RESULT rows it collected, the machine they came from, as
results.json, a Markdown table (results.md) and a bar chart of the ratios (ratios.png, Pillow only).

Kept free of wvdata imports, like _common: the runner process stays light while its benchmarks run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

from benchmarks._common import cpu_model, versions

# wvdata's stack, then the peers the benchmarks compare against (distribution names)
STACK = ("numpy", "polars", "pyarrow", "pillow", "numba", "faiss-cpu", "faiss-gpu-cu12", "torch", "torchvision",
         "timm", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "webdataset", "ray", "scikit-image", "scikit-learn")
PEERS = ("img2dataset", "imagededup", "imagehash", "litdata", "mosaicml-streaming", "webdataset")
PREFIX = "RESULT "


def parse_results(text: str, bench: str) -> list[dict]:
    """The rows of every `RESULT {json}` line in a benchmark's output (a malformed one becomes a
    failed row, so that it shows instead of vanishing)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        try:
            row = json.loads(line[len(PREFIX):])
            if not isinstance(row, dict) or "figure" not in row or "value" not in row:
                raise ValueError("not a result row")
        except ValueError as e:
            row = {"bench": bench, "figure": "(unreadable RESULT line)", "status": "failed", "error": str(e)}
        row.setdefault("bench", bench)
        row.setdefault("status", "ok")
        rows.append(row)
    return rows


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists ([] without one), without importing torch."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def machine_info() -> dict:
    """CPU model, cores, memory, GPUs and the library versions of wvdata's stack and of the peers."""
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        mem_gib = None
    installed = lambda names: {k: v for k, v in versions(names).items() if v != "not installed"}  # noqa: E731
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "memory_gib": mem_gib,
            "gpus": gpu_names(), "python": platform.python_version(), "platform": platform.platform(),
            "stack": installed(STACK), "peers": versions(PEERS)}


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    a = abs(x)
    s = f"{x:.3g}" if a < 10 else f"{x:,.1f}" if a < 1000 else f"{x:,.0f}"
    return f"{s} {unit}".strip()


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"


def _target(r: dict) -> str:
    if r.get("target") is None:
        return "-"
    if "ratio" in r:
        return f">= {r['target']:.3g}x"
    return f"{'>=' if r.get('higher_is_better', True) else '<='} {_num(r['target'], r.get('unit', ''))}"


def _met(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "failed").upper()
    return "-" if "met" not in r else "yes" if r["met"] else "**no**"


def markdown(rows: list[dict], info: dict, meta: dict) -> str:
    """The table (benchmark, figure, wvdata, baseline, ratio, target, met), the machine above it."""
    gpu = ", ".join(info["gpus"]) or "none"
    stack = ", ".join(f"{k} {v}" for k, v in info["stack"].items())
    peers = ", ".join(f"{k} {v}" for k, v in info["peers"].items())
    lines = [f"# wvdata benchmarks (`--scale {meta['scale']}`)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, GPU: {gpu}; "
             f"Python {info['python']}.  ",
             f"Stack: {stack}.  ", f"Peers: {peers}.  ",
             f"Run: {meta['started']} to {meta['finished']} UTC; load average {meta['load_before']} before, "
             f"{meta['load_after']} after. Ratio: how many times better wvdata is than the baseline measured in "
             "the same run (> 1: better; times and rates alike).", "",
             "| benchmark | figure | wvdata | baseline | ratio | target | met |",
             "| --- | --- | ---: | --- | ---: | ---: | :---: |"]
    for r in rows:
        if r.get("status") != "ok":
            why = r.get("error", "").replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['bench']} | {r.get('figure', '')}{': ' + why if why else ''} | - | - | - | - | "
                         f"{_met(r)} |")
            continue
        unit = r.get("unit", "")
        base = f"{r['baseline']}: {_num(r.get('baseline_value'), unit)}" if r.get("baseline") else "-"
        lines.append(f"| {r['bench']} | {r['figure']} | {_num(r['value'], unit)} | {base} | {_ratio(r)} | "
                     f"{_target(r)} | {_met(r)} |")
    lines += ["", "Each benchmark's full output is in NAME.txt beside this file; results.json holds every row "
              "and the machine."]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of every ratio on a log scale, a line at 1x (Pillow: no plotting library needed).
    Green: at or above its target (or 1x without one); red: below."""
    from PIL import Image, ImageDraw, ImageFont

    data = [(f"{r['bench']}: {r['figure']} (vs {r['baseline']})", r["ratio"], r.get("target")) for r in rows
            if r.get("status") == "ok" and r.get("ratio") and r["ratio"] > 0]
    try:
        font = ImageFont.load_default(size=13)  # scalable (Pillow >= 10.1)
    except TypeError:
        font = ImageFont.load_default()
    label_w = max([font.getlength(lab[:100]) for lab, _, _ in data] + [200]) + 20
    plot_w, bar_h, top = 560, 20, 50
    width, height = int(label_w + plot_w + 80), top + max(len(data), 1) * bar_h + 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black", font=font)
    if not data:
        d.text((10, top), "no ratios to show", fill="black", font=font)
        img.save(path)
        return
    vals = [v for _, v, _ in data]
    lo = 10 ** math.floor(math.log10(min(min(vals), 1.0) * 0.9))
    hi = 10 ** math.ceil(math.log10(max(max(vals), 1.0) * 1.1))
    x0 = label_w

    def x_of(v: float) -> float:
        return x0 + (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_w

    bottom = top + len(data) * bar_h
    decade = lo
    while decade <= hi * 1.0001:  # grid and labels at each power of ten
        x = x_of(decade)
        d.line([(x, top - 4), (x, bottom)], fill=(220, 220, 220))
        d.text((x - 10, bottom + 6), f"{decade:g}x", fill="black", font=font)
        decade *= 10
    for i, (label, v, target) in enumerate(data):
        y = top + i * bar_h
        good = v >= (target if target is not None else 1.0)
        d.text((10, y + 3), label[:100], fill="black", font=font)
        d.rectangle([(x_of(min(v, 1.0)), y + 2), (x_of(max(v, 1.0)), y + bar_h - 3)],
                    fill=(60, 160, 80) if good else (200, 70, 60))
        d.text((x_of(max(v, 1.0)) + 4, y + 3), f"{v:.2f}x", fill="black", font=font)
        if target is not None and lo < target < hi:
            d.line([(x_of(target), y), (x_of(target), y + bar_h - 1)], fill=(0, 0, 200), width=2)
    d.line([(x_of(1.0), top - 8), (x_of(1.0), bottom)], fill="black", width=2)
    d.text((x0, height - 18), "ratio vs the baseline of the same run, log scale; black line: 1x; blue tick: "
           "target", fill="black", font=font)
    img.save(path)


def write(out: Path, rows: list[dict], modules: list[dict], meta: dict) -> dict:
    """results.json, results.md and ratios.png under `out`; returns the JSON document."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    doc = {"machine": info, **meta, "modules": modules, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, info, meta))
    bar_chart(rows, out / "ratios.png",
              f"wvdata vs baselines, --scale {meta['scale']}: {info['cpu']}, {info['cores']} cores, "
              f"GPU: {', '.join(info['gpus']) or 'none'}")
    return doc
