"""GPU figures, each beside the CPU path a user would otherwise run, same machine, same run. Without
CUDA it prints one line and exits 0 (most machines this project runs on have no GPU).

1. JPEG decode of every image of the stream benchmark's dataset (web-size JPEGs built with
   resize_short=256), batches of 64, decode only: DALI `fn.decoders.image(device="mixed")` fed by
   `fn.external_source`, and nvJPEG through `torchvision.io.decode_jpeg(list, device="cuda")`,
   against PIL decode in W processes on the CPU. (The full loader with mixed decode + augment is
   stream_bench's "dali mixed" row, which it runs whenever CUDA is present.)
2. FAISS on the GPU (faiss-gpu, `pip install wvdata[gpu]`): the curriculum's anchored density
   (`_density.knn_density(search="faiss")`, k-NN over 2,048 anchors on the GPU) against its CPU
   path (float32 BLAS + compiled count) on one clustered class of N x 256, plus a flat L2 10-NN
   search of 10,000 queries on the GPU against the same index on the CPU. Skipped with a note
   when FAISS sees no GPU.
3. resnet50, bf16 autocast, channels_last, batch 256: the model step on synthetic data (the
   ceiling), then the real trainer (`python -m trainer.train`, one epoch over a view) with the
   DALI mixed loader and with the torch (PIL) loader; published anchors: DALI ~2,470 img/s RN50
   AMP on one A100, timm ~1,200 img/s NHWC AMP on an RTX 3090.

    python -m benchmarks.gpu_bench [--scale small|full]

--scale full: 2,000 images, N = 1,000,000, 8,192 training images an epoch; small: 800, 100,000, 2,048.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import _common
from benchmarks._common import load, parse_scaled, result

BATCH = 64
SIZES = {"small": {"images": 800, "faiss_n": 100_000, "train_entries": 2048},
         "full": {"images": 2000, "faiss_n": 1_000_000, "train_entries": 8192}}
RESULTS = Path(__file__).resolve().parent / "results" / "gpu.txt"


def jpeg_batches(ds: Path) -> list[list[bytes]]:
    """Every train JPEG of the dataset as stored, in full batches of BATCH (the tail dropped)."""
    from benchmarks._stream_peers import read_sample, samples

    data = [read_sample(s)["jpg"] for s in samples(ds)]
    return [data[i:i + BATCH] for i in range(0, len(data) - BATCH + 1, BATCH)]


def _pil_decode(batch: list[bytes]) -> int:
    from PIL import Image

    for b in batch:
        with Image.open(io.BytesIO(b)) as im:
            im.convert("RGB").load()
    return len(batch)


def best_rate(fn, images: int, tries: int = 3) -> float:
    """Images/sec of fn() (which processes `images` and synchronises), best of `tries` after a warm-up."""
    fn()
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        best = max(best, images / (time.perf_counter() - t))
    return best


def decode_rows(batches: list[list[bytes]], workers: int) -> list[tuple[str, float]]:
    import torch
    import torchvision
    from torchvision.io import decode_jpeg

    n = sum(len(b) for b in batches)
    pool = mp.get_context("fork").Pool(workers)
    rows = [(f"PIL decode, {workers} CPU processes", best_rate(lambda: sum(pool.map(_pil_decode, batches)), n))]
    pool.close()
    tensors = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch] for batch in batches]

    def nvjpeg() -> None:
        for batch in tensors:
            decode_jpeg(batch, device="cuda")
        torch.cuda.synchronize()
    rows.append((f"nvJPEG, torchvision {torchvision.__version__} decode_jpeg(device='cuda')", best_rate(nvjpeg, n)))
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        print("DALI mixed decode: skipped, nvidia-dali is not installed")
        return rows
    arrays = [[np.frombuffer(b, np.uint8) for b in batch] for batch in batches]

    @pipeline_def(batch_size=BATCH, num_threads=workers, device_id=0)
    def decode_pipe():
        jpegs = fn.external_source(source=arrays, cycle=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)

    pipe = decode_pipe()
    pipe.build()

    def dali() -> None:
        for _ in arrays:  # one pass over the data (the source cycles)
            pipe.run()
        torch.cuda.synchronize()
    rows.append(("DALI fn.decoders.image(device='mixed')", best_rate(dali, n)))
    return rows


def faiss_rows(n: int) -> list[str]:
    """The density on the GPU vs its CPU path, and a flat 10-NN search on the GPU vs the CPU."""
    import faiss

    from benchmarks.curriculum_bench import clustered
    from wvdata import _density

    if _density.faiss_gpus() == 0:
        return ["faiss-gpu: skipped, FAISS sees no GPU (install the gpu extra: pip install 'wvdata[gpu]')"]
    x, _ = clustered(n, 256)
    _density.knn_density(x[:5000], search="faiss")  # warm up: GPU resources, kernels
    _density.knn_density(x[:5000], search="blas")
    times = {}
    for search in ("faiss", "blas"):
        t = time.perf_counter()
        _density.knn_density(x, search=search)
        times[search] = time.perf_counter() - t
    result("gpu", f"curriculum knn density, {n:,} x 256, faiss-gpu", times["faiss"], "s",
           baseline="CPU BLAS path", baseline_value=times["blas"], higher_is_better=False)
    q = x[:10_000]
    cpu_index = faiss.IndexFlatL2(x.shape[1])
    cpu_index.add(x)
    gpu_index = faiss.index_cpu_to_all_gpus(cpu_index)
    gpu_index.search(q[:100], 10)
    flat = {}
    for name, index in (("gpu", gpu_index), ("cpu", cpu_index)):
        t = time.perf_counter()
        index.search(q, 10)
        flat[name] = time.perf_counter() - t
    result("gpu", f"FAISS flat L2 10-NN, 10,000 queries over {n:,}", flat["gpu"], "s", baseline="same index on the CPU",
           baseline_value=flat["cpu"], higher_is_better=False)
    return [f"FAISS ({faiss.__version__}, {_density.faiss_gpus()} GPUs), one class of {n:,} x 256:",
            f"  knn density: GPU {times['faiss']:.2f}s, CPU BLAS {times['blas']:.2f}s "
            f"({times['blas'] / times['faiss']:.1f}x)",
            f"  flat 10-NN of 10,000 queries: GPU {flat['gpu']:.2f}s, CPU {flat['cpu']:.2f}s "
            f"({flat['cpu'] / flat['gpu']:.1f}x)"]


def train_rows(images: int, entries: int, workers: int) -> list[str]:
    """resnet50 bf16 channels_last batch 256: synthetic ceiling, then the trainer per loader."""
    import wvdata
    from benchmarks.stream_bench import prepare
    from benchmarks.train_bench import synthetic, trainer_run

    ds = prepare(images, 250, workers)
    keys = wvdata.open_dataset(ds).samples("train")["key"].to_list()
    view = f"gpubench{entries}"
    wvdata.views.write_view(ds, view, (keys * (entries // len(keys) + 1))[:entries])
    ceiling = synthetic("resnet50", 256, 224, 10, "cuda")
    lines = [f"resnet50 bf16 channels_last batch 256, one epoch of {entries} images, loader workers {workers}:",
             f"  synthetic (no loader)   {ceiling:8.1f} img/s"]
    for backend, label in (("dali", "DALI mixed"), ("torch", "torch (PIL)")):
        rate = trainer_run(ds, view, "resnet50", backend, 256, 224, workers)
        lines.append(f"  trainer, {label:<13} {rate:8.1f} img/s ({rate / ceiling:.2f}x synthetic)")
        result("gpu", f"resnet50 bf16 training, {label} loader", rate, "img/s", baseline="synthetic data (no loader)",
               baseline_value=ceiling)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, help="stream benchmark dataset size (full: 2000)")
    p.add_argument("--faiss-n", type=int, help="class size for the FAISS rows (full: 1000000)")
    p.add_argument("--train-entries", type=int, help="training images an epoch (full: 8192)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--parts", default="decode,faiss,train")
    args = parse_scaled(p, argv, SIZES)
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: skipped, no CUDA device (torch.cuda.is_available() is False)")
        return 0
    from benchmarks.stream_bench import prepare, quiet_dali_deprecations

    quiet_dali_deprecations()
    gpu = torch.cuda.get_device_name()
    lines = [_common.machine(gpu=gpu), "versions: " + ", ".join(f"{k}={v}" for k, v in _common.versions(
        ["torch", "torchvision", "nvidia-dali-cuda130", "faiss-gpu-cu12", "timm"]).items()), load()]
    print("\n".join(lines), flush=True)
    parts = args.parts.split(",")
    if "decode" in parts:
        batches = jpeg_batches(prepare(args.images, 250, args.workers))
        rows = decode_rows(batches, args.workers)
        lines.append(f"JPEG decode only, {sum(len(b) for b in batches)} images, batches of {BATCH}, best of 3:")
        for name, rate in rows:
            lines.append(f"  {name:<60} {rate:9.1f} img/s  {rate / rows[0][1]:6.2f}x")
            if name != rows[0][0]:
                result("gpu", f"JPEG decode, {name.split(',')[0]}", rate, "img/s", baseline=rows[0][0],
                       baseline_value=rows[0][1])
        print("\n".join(lines[-len(rows) - 1:]), flush=True)
    for part, fn in (("faiss", lambda: faiss_rows(args.faiss_n)),
                     ("train", lambda: train_rows(args.images, args.train_entries, args.workers))):
        if part in parts:
            new = fn()
            print("\n".join(new), flush=True)
            lines += new
    lines.append(load())
    if args.scale == "full":
        RESULTS.write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
