"""Training images/sec per loader backend: the real loop (`trainer.train`), one epoch each.

    python -m benchmarks.train_bench [--scale small|full] [--models test_resnet,resnet18] [--entries 512]

Each row runs `python -m trainer.train` on a view of the streaming benchmark's dataset (web-size
JPEGs built with --resize-short 256) at 224 px, RandAugment(2, 9), and reads the epoch's
images/sec from the run's metrics.jsonl, so the figure is what a user's run reports. The
"synthetic" row times the same model step on random tensors: the ceiling that the loader rows
approach when the model, not the data, is the bottleneck. The GPU rows (resnet50, bf16,
channels_last, batch 256, DALI mixed vs torch) are in benchmarks/gpu_bench.py.

--scale full: test_resnet and resnet18, 512 images an epoch, the 2,000-image dataset; small:
test_resnet, 256 images, the 800-image dataset of stream_bench's small scale.
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

from benchmarks._common import failed, load, parse_scaled, result
from benchmarks.stream_bench import OUT, machine, prepare

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": {"models": "test_resnet", "entries": 256, "images": 800},
         "full": {"models": "test_resnet,resnet18", "entries": 512, "images": 2000}}


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
    p.add_argument("--models", help="comma-separated timm models (full: test_resnet,resnet18)")
    p.add_argument("--entries", type=int, help="samples per benchmark epoch (full: 512)")
    p.add_argument("--images", type=int, help="size of the stream benchmark's dataset to use (full: 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="text copy of the output (default: results/train-cpu.txt at --scale full)")
    args = parse_scaled(p, argv, SIZES)
    ds = prepare(args.images, 250, args.workers)
    keys = wvdata.open_dataset(ds).samples("train")["key"][: args.entries]
    wvdata.views.write_view(ds, f"bench{args.entries}", keys.to_list())
    lines = machine() + [f"{load()}; {len(keys)} images per epoch, batch {args.batch_size}, "
                         f"224 px, RandAugment(2, 9), loader workers {args.workers}"]
    print("\n".join(lines), flush=True)
    header = f"{'model':<12} {'loader':<22} {'images/s':>9} {'vs synthetic':>13}"
    lines += [header]
    print(header, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model in args.models.split(","):
        ceiling = synthetic(model, args.batch_size, 224, 5, device)
        rows = [("synthetic (no loader)", ceiling)]
        for backend in ("torch", "dali"):
            name = f"{backend} ({'PIL' if backend == 'torch' else 'mixed' if device == 'cuda' else 'cpu'})"
            figure = f"trainer images/s, {model}, {name} loader"
            try:
                rate = trainer_run(ds, f"bench{args.entries}", model, backend, args.batch_size, 224, args.workers)
            except RuntimeError as e:  # one loader failing leaves the other rows standing
                failed("train", figure, e)
                rows.append((name, float("nan")))
                continue
            rows.append((name, rate))
            result("train", figure, rate, "img/s", baseline="synthetic data (no loader)", baseline_value=ceiling)
        for name, rate in rows:
            line = f"{model:<12} {name:<22} {rate:>9.1f} {rate / ceiling:>12.2f}x"
            lines.append(line)
            print(line, flush=True)
    lines.append("GPU rows (resnet50 bf16 channels_last batch 256, DALI mixed vs torch): benchmarks/gpu_bench.py")
    lines.append(load())
    out = args.out or (str(OUT.parent / "results" / "train-cpu.txt") if args.scale == "full" else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
