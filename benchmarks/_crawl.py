"""A generated, cached benchmark crawl (folder layout) of web-size JPEGs, shared by benchmarks.

Images are `wvdata.synth.digit_image` photos at the web sizes of `wvdata.synth.WEB_SIZES`
(500x375 .. 1024x768, landscape and portrait), with camera-like grain of a random strength (the
synthetic photos alone are smoother than real ones: ~0.8 bits/pixel against ~1.5-4 for web
photos, and entropy decoding is a large part of JPEG decode time), JPEG quality 75-95, a share
of them progressive, as a crawler would find them. Image i depends only on (seed, i), so the
crawl is the same whatever the number of processes that made it. It lives under benchmarks/out/
(git-ignored), in a directory named after its parameters, reused once complete. wvdata (and so
polars) is imported only in the generating workers, so a benchmark that forks later is not
forking a process with polars' threads in it.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
GENERATOR_VERSION = 1  # bump when the images change, so old caches are not reused


def _params(images: int, classes: int, progressive: float, grain: float, seed: int) -> dict:
    return {"images": images, "classes": classes, "progressive": progressive, "grain": grain,
            "seed": seed, "version": GENERATOR_VERSION}


def _one(args: tuple[Path, int, int, float, float, int]) -> int:
    from PIL import Image

    from wvdata.synth import DIGIT_NAMES, WEB_SIZES, digit_image

    root, i, classes, progressive, grain, seed = args
    rng = np.random.default_rng([seed, i])
    label = i % classes
    img = digit_image(label % 10, rng, WEB_SIZES[rng.integers(len(WEB_SIZES))])
    sigma = rng.uniform(0, grain)
    if sigma > 0:
        noisy = np.asarray(img, np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
        img = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    path = root / f"{DIGIT_NAMES[label % 10]}{label // 10 or ''}" / f"{i:07d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=int(rng.integers(75, 96)),
             progressive=bool(rng.random() < progressive), optimize=False)
    return path.stat().st_size


def crawl_dir(images: int, classes: int = 10, progressive: float = 0.15, grain: float = 12.0,
              seed: int = 0) -> Path:
    params = _params(images, classes, progressive, grain, seed)
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return OUT / f"crawl-{images}-{tag}"


def make_crawl(images: int = 2000, classes: int = 10, progressive: float = 0.15,
               grain: float = 12.0, seed: int = 0, workers: int | None = None,
               verbose: bool = True) -> Path:
    """Return the folder crawl for these parameters, generating it only when not cached."""
    root = crawl_dir(images, classes, progressive, grain, seed)
    done = root / ".complete.json"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if verbose:
        print(f"generating {images} JPEGs in {root} ...", flush=True)
    jobs = [(root, i, classes, progressive, grain, seed) for i in range(images)]
    with mp.get_context("fork").Pool(workers or os.cpu_count() or 1) as pool:
        sizes = pool.map(_one, jobs, chunksize=16)
    summary = dict(_params(images, classes, progressive, grain, seed), bytes=sum(sizes))
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return root


def image_paths(root: Path) -> list[tuple[str, int]]:
    """(path, label) of every image, labels by sorted class folder name (as wvdata's folder scan)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(f), c) for c, name in enumerate(classes)
            for f in sorted((root / name).iterdir()) if f.suffix == ".jpg"]


def warm_cache(root: Path) -> int:
    """Read every file once so that timed runs read from the page cache; return bytes read."""
    total = 0
    for path, _ in image_paths(root):
        with open(path, "rb") as f:
            total += len(f.read())
    return total
