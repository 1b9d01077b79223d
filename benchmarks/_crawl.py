"""The benchmarks' crawl, `wvdata.synth.make_grainy_crawl`, cached under benchmarks/out/ (git-ignored).

It lives in a directory named after its parameters, reused once complete. It is generated in a
forked child process, so that the benchmark process itself never imports wvdata (and so
polars): a benchmark that forks later is not forking a process with polars' threads in it.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
from pathlib import Path

from benchmarks._common import read_all

OUT = Path(__file__).resolve().parent / "out"
GENERATOR_VERSION = 1  # bump when the images change, so old caches are not reused


def _params(images: int, classes: int, progressive: float, grain: float, seed: int) -> dict:
    return {"images": images, "classes": classes, "progressive": progressive, "grain": grain,
            "seed": seed, "version": GENERATOR_VERSION}


def crawl_dir(images: int, classes: int = 10, progressive: float = 0.15, grain: float = 12.0,
              seed: int = 0) -> Path:
    params = _params(images, classes, progressive, grain, seed)
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return OUT / f"crawl-{images}-{tag}"


def _generate(root: Path, images: int, classes: int, progressive: float, grain: float, seed: int,
              workers: int | None) -> None:
    """Make the crawl, then mark it complete with its parameters and size (runs in a child)."""
    from wvdata.synth import make_grainy_crawl

    crawl = make_grainy_crawl(root, images, classes=classes, progressive=progressive, grain=grain, seed=seed,
                              workers=workers)
    size = sum((root / rel).stat().st_size for rel, _, _ in crawl.items["train"])
    summary = dict(_params(images, classes, progressive, grain, seed), bytes=size)
    (root / ".complete.json").write_text(json.dumps(summary, indent=2) + "\n")


def make_crawl(images: int = 2000, classes: int = 10, progressive: float = 0.15,
               grain: float = 12.0, seed: int = 0, workers: int | None = None,
               verbose: bool = True) -> Path:
    """Return the folder crawl for these parameters, generating it only when not cached."""
    root = crawl_dir(images, classes, progressive, grain, seed)
    if (root / ".complete.json").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if verbose:
        print(f"generating {images} JPEGs in {root} ...", flush=True)
    child = mp.get_context("fork").Process(target=_generate,
                                           args=(root, images, classes, progressive, grain, seed, workers))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"generating {root} failed (exit status {child.exitcode})")
    return root


def image_paths(root: Path) -> list[tuple[str, int]]:
    """(path, label) of every image, labels by sorted class folder name (as wvdata's folder scan)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(f), c) for c, name in enumerate(classes)
            for f in sorted((root / name).iterdir()) if f.suffix == ".jpg"]


def warm_cache(root: Path) -> int:
    """Read every file once so that timed runs read from the page cache; return bytes read."""
    return read_all(path for path, _ in image_paths(root))
