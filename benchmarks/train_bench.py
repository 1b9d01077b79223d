"""Training images/sec per loader backend: the real loop (`trainer.train`), one epoch each.

    python -m benchmarks.train_bench [--models test_resnet,resnet18] [--entries 512]

Each row runs `python -m trainer.train` on a view of the streaming benchmark's dataset (2,000
web-size JPEGs built with --resize-short 256) at 224 px, RandAugment(2, 9), and reads the
epoch's images/sec from the run's metrics.jsonl, so the figure is what a user's run reports.
The "synthetic" row times the same model step on random tensors: the ceiling that the loader
rows approach when the model, not the data, is the bottleneck. On a GPU (not lent to every
session) it adds resnet50, bf16, channels_last, batch 256, DALI mixed vs torch, next to the
published anchors (DALI ~2,470 img/s RN50 AMP on one A100; timm ~1,200 img/s NHWC AMP on an
RTX 3090).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import load
from benchmarks.stream_bench import OUT, machine, prepare

ROOT = Path(__file__).resolve().parent.parent


def synthetic(model_name: str, batch: int, size: int, steps: int, device: str) -> float:
    """Model step alone on random data (same optimiser, loss and autocast as the trainer)."""
    import timm
    import torch
    import torch.nn.functional as F

    model = timm.create_model(model_name, num_classes=10).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    best = 0.0
    for i in range(steps + 2):
        t = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # first steps warm up allocators / kernels
            best = max(best, batch / (time.perf_counter() - t))
    return best


def trainer_run(ds: Path, view: str, model: str, loader: str, batch: int, size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "trainer.train", "--data", str(ds), "--view", view, "--out", out,
               "--model", model, "--epochs", "1", "--batch-size", str(batch), "--image-size", str(size),
               "--loader", loader, "--workers", str(workers), "--no-progress", "--warmup-epochs", "0.1"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["images_per_sec"]


def main(argv: list[str] | None = None) -> None:
    import torch

    import wvdata

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="test_resnet,resnet18")
    p.add_argument("--entries", type=int, default=512, help="samples per benchmark epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(OUT.parent / "results" / "train-cpu.txt"))
    args = p.parse_args(argv)
    ds = prepare(2000, 250, args.workers)
    keys = wvdata.open_dataset(ds).samples("train")["key"][: args.entries]
    wvdata.views.write_view(ds, f"bench{args.entries}", keys.to_list())
    gpu = torch.cuda.is_available()
    lines = machine() + [f"{load()}; {args.entries} images per epoch, batch {args.batch_size}, "
                         f"224 px, RandAugment(2, 9), loader workers {args.workers}"]
    print("\n".join(lines), flush=True)
    header = f"{'model':<12} {'loader':<22} {'images/s':>9} {'vs synthetic':>13}"
    lines += [header]
    print(header, flush=True)
    runs = [(m, args.batch_size) for m in args.models.split(",")]
    if gpu:
        runs.append(("resnet50", 256))
    for model, batch in runs:
        ceiling = synthetic(model, batch, 224, 5, "cuda" if gpu else "cpu")
        rows = [("synthetic (no loader)", ceiling)]
        for backend in ("torch", "dali"):
            name = f"{backend} ({'mixed' if backend == 'dali' and gpu else 'cpu' if backend == 'dali' else 'PIL'})"
            rows.append((name, trainer_run(ds, f"bench{args.entries}", model, backend, batch, 224, args.workers)))
        for name, rate in rows:
            line = f"{model:<12} {name:<22} {rate:>9.1f} {rate / ceiling:>12.2f}x"
            lines.append(line)
            print(line, flush=True)
    if not gpu:
        lines.append("GPU rows (resnet50 bf16 channels_last batch 256, DALI mixed vs torch): skipped, no GPU")
    lines.append(load())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
