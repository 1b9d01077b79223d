"""`wvdata build`: raw crawl -> immutable WebDataset shards, DALI indexes and sample tables.

Each shard is one task (local process pool or Ray). A shard's outputs are renamed into place
only when complete, and its part tables last, so `resume=True` after a kill at any point
redoes just the unfinished shards and gives byte-identical output.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import polars as pl

from ._image import DEFAULT_MAX_PIXELS, ImageOptions, ImageRejected, process_image
from ._layouts import SPLITS, InputRow, scan
from ._tar import ShardWriter, format_idx, idx_line, write_atomic
from .dataset import FORMAT_NAME, FORMAT_VERSION

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
_WORK_DIR = ".build"

SAMPLE_SCHEMA = {
    "key": pl.String, "split": pl.String, "shard": pl.String, "label": pl.Int64,
    "class_name": pl.String, "source": pl.String, "query": pl.String, "src_path": pl.String,
    "width": pl.Int32, "height": pl.Int32, "bytes": pl.Int64, "sha1": pl.String,
    "offset": pl.Int64, "data_offset": pl.Int64, "reencoded": pl.Boolean, "meta_error": pl.String,
    "query_text": pl.String, "meta": pl.String,  # meta: the matched meta record as JSON text
}
ERROR_SCHEMA = {"split": pl.String, "src_path": pl.String, "reason": pl.String, "detail": pl.String}


@dataclass
class BuildOptions:
    layout: str = "auto"
    splits: tuple[str, ...] = SPLITS
    resize_short: int | None = None
    max_side: int | None = None
    quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = DEFAULT_SHARD_BYTES
    shard_samples: int | None = None
    seed: int = 0


@dataclass
class ShardTask:
    out: str
    split: str
    name: str
    rows: list[InputRow]
    classes: list[str]
    image: ImageOptions


@dataclass
class BuildSummary:
    out: str
    samples: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def images_per_sec(self) -> float:
        return sum(self.samples.values()) / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- one shard (runs in a worker)


def _sample_json(row: InputRow, task: ShardTask) -> bytes:
    doc = dict(row.extra)  # extra manifest columns never override the fields below
    doc.update({"key": row.key, "src_path": row.src_path, "source": row.source,
                "label": row.label, "class_name": task.classes[row.label] if row.label >= 0 else "",
                "query": row.query, "query_text": row.query_text, "meta": row.meta})
    doc.pop("meta_error", None)
    if row.meta_error:
        doc["meta_error"] = row.meta_error
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()


def _part_paths(out: str, split: str, name: str) -> tuple[str, str]:
    # JSON, not parquet: a worker forked from a process that has run polars hangs on its
    # first polars call (polars' thread pool does not survive fork), so workers never use it.
    work = os.path.join(out, _WORK_DIR, split)
    return os.path.join(work, f"{name}.errors.json"), os.path.join(work, f"{name}.samples.json")


def shard_done(task: ShardTask) -> bool:
    return os.path.exists(_part_paths(task.out, task.split, task.name)[1])


def run_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Process one shard's inputs; write tar, idx and part tables; return (samples, errors)."""
    split_dir = os.path.join(task.out, task.split)
    tar_path = os.path.join(split_dir, f"{task.name}.tar")
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    samples, errors, lines = [], [], []
    for i, row in enumerate(task.rows):
        try:
            try:
                with open(row.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                raise ImageRejected("missing file", row.src_path) from None
            except IsADirectoryError:
                raise ImageRejected("not a file", row.src_path) from None
            except OSError as e:
                raise ImageRejected("unreadable file", f"{type(e).__name__}: {e}") from None
            img = process_image(raw, task.image)
        except ImageRejected as e:
            errors.append({"split": task.split, "src_path": row.src_path, "reason": e.reason,
                           "detail": e.detail})
        else:
            label_text = str(row.label).encode()
            members = writer.write(row.key, [("jpg", img.data), ("cls", label_text),
                                             ("json", _sample_json(row, task))])
            lines.append(idx_line(members))
            jpg = members[0]
            samples.append({
                "key": row.key, "split": task.split, "shard": task.name, "label": row.label,
                "class_name": task.classes[row.label] if row.label >= 0 else "",
                "source": row.source, "query": row.query, "src_path": row.src_path,
                "width": img.width, "height": img.height, "bytes": jpg.size,
                "sha1": hashlib.sha1(img.data).hexdigest(), "offset": jpg.header_offset,
                "data_offset": jpg.offset, "reencoded": img.reencoded,
                "meta_error": row.meta_error or None, "query_text": row.query_text,
                "meta": json.dumps(row.meta, sort_keys=True, ensure_ascii=False, default=str)
                if row.meta else None,
            })
        if progress and (i + 1) % 16 == 0:
            progress(16)
    if progress:
        progress(len(task.rows) % 16)
    writer.close()
    os.makedirs(split_dir, exist_ok=True)
    if samples:  # tar and index first, the part tables (the completion marker) last
        write_atomic(tar_path, buf.getvalue())
        write_atomic(os.path.join(split_dir, f"{task.name}.idx"), format_idx(lines))
    err_path, smp_path = _part_paths(task.out, task.split, task.name)
    os.makedirs(os.path.dirname(err_path), exist_ok=True)
    write_atomic(err_path, json.dumps(errors))
    write_atomic(smp_path, json.dumps(samples))
    return len(samples), len(errors)


def _write_parquet(df: pl.DataFrame, path: str) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf, statistics=False)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- planning


def plan_shards(rows: Sequence[InputRow], opts: BuildOptions) -> list[list[InputRow]]:
    """Seeded shuffle (filelists are sorted by class), then cut by sample count or input bytes."""
    order = sorted(rows, key=lambda r: r.key)
    random.Random(f"{opts.seed}/{order[0].split if order else ''}").shuffle(order)
    shards: list[list[InputRow]] = []
    current: list[InputRow] = []
    size = 0
    for row in order:
        try:
            est = os.stat(row.path).st_size
        except OSError:
            est = 0
        full = (opts.shard_samples and len(current) >= opts.shard_samples) or \
            (not opts.shard_samples and current and size + est > opts.shard_size)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(row)
        size += est + 1536
    if current:
        shards.append(current)
    return shards


def _fingerprint(opts: BuildOptions, src: str, inputs) -> str:
    h = hashlib.sha1(json.dumps(asdict(opts), sort_keys=True, default=list).encode())
    h.update(os.path.abspath(src).encode())
    for r in inputs.rows:
        h.update(f"{r.key}\0{r.path}\0{r.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------- engines


def _run_local(tasks: list[ShardTask], workers: int, bar) -> None:
    if workers <= 1:
        for t in tasks:
            run_shard(t, bar.update)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    if any(t.image.resize_short or t.image.max_side for t in tasks):
        from ._image import _torch

        _torch()  # import the resize kernel once here; forked workers inherit it
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.imap_unordered(_pool_shard, tasks)
        done, seen = 0, 0
        while done < len(tasks):
            try:
                pending.next(timeout=0.2)
                done += 1
            except mp.TimeoutError:
                pass
            now = counter.value
            bar.update(now - seen)
            seen = now
        bar.update(counter.value - seen)


_COUNTER = None


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _bump(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _pool_shard(task: ShardTask) -> tuple[int, int]:
    return run_shard(task, _bump)


def _run_ray(tasks: list[ShardTask], bar) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                 log_to_driver=False)
    remote = ray.remote(run_shard)
    refs = {remote.remote(t): t for t in tasks}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            ray.get(ref)
            bar.update(len(refs.pop(ref).rows))


# ---------------------------------------------------------------- build


def build(src: str | os.PathLike, out: str | os.PathLike, *, layout: str = "auto",
          splits: Sequence[str] = SPLITS, resize_short: int | None = None,
          max_side: int | None = None, quality: int = 90, max_pixels: int = DEFAULT_MAX_PIXELS,
          shard_size: int = DEFAULT_SHARD_BYTES, shard_samples: int | None = None, seed: int = 0,
          workers: int | None = None, engine: str = "local", resume: bool = False,
          overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Build a dataset directory from a raw crawl (webvision, folder or manifest layout)."""
    t0 = time.perf_counter()
    src, out = str(src), str(out)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:  # a typo would otherwise build an empty dataset
        raise ValueError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    opts = BuildOptions(layout, tuple(splits), resize_short, max_side, quality, max_pixels,
                        shard_size, shard_samples, seed)
    inputs = scan(src, layout, tuple(splits))
    work = os.path.join(out, _WORK_DIR)
    fingerprint = _fingerprint(opts, src, inputs)
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if overwrite and (real_src == real_out or real_src.startswith(real_out.rstrip(os.sep) + os.sep)):
        raise ValueError(f"refusing to --overwrite {out}: the source {src} is inside it")
    done = _finished(out, work, opts) if resume else None
    if done is not None:
        done.seconds = time.perf_counter() - t0
        return done
    _prepare_out(out, work, fingerprint, resume, overwrite)
    image_opts = ImageOptions(resize_short, max_side, quality, max_pixels)
    tasks: list[ShardTask] = []
    splits_present = [s for s in SPLITS if s in splits and (
        any(r.split == s for r in inputs.rows) or any(e.split == s for e in inputs.errors))]
    for split in splits_present:
        rows = [r for r in inputs.rows if r.split == split]
        for i, shard_rows in enumerate(plan_shards(rows, opts)):
            tasks.append(ShardTask(os.path.abspath(out), split, f"shard-{i:06d}", shard_rows, inputs.classes, image_opts))
    todo = [t for t in tasks if not (resume and shard_done(t))]
    summary = BuildSummary(out, shards=len(tasks), shards_skipped=len(tasks) - len(todo))
    from tqdm import tqdm

    with tqdm(total=sum(len(t.rows) for t in todo), unit="img", disable=not progress,
              desc="build", smoothing=0.1, dynamic_ncols=True) as bar:
        if engine == "ray":
            _run_ray(todo, bar)
        elif engine == "local":
            _run_local(todo, workers or os.cpu_count() or 1, bar)
        else:
            raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")
    _finalize(out, src, opts, inputs, tasks, splits_present, summary)
    _remove_work(work)
    summary.seconds = time.perf_counter() - t0
    return summary


def _finished(out: str, work: str, opts: BuildOptions) -> BuildSummary | None:
    """--resume on a dataset that finished with these options: nothing to do."""
    path = os.path.join(out, "dataset.json")
    if os.path.isdir(work) or not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("build") != {k: v for k, v in asdict(opts).items() if k != "splits"}:
        raise ValueError(f"{out} is a finished dataset built with other options; "
                         "use --overwrite to rebuild")
    s = BuildSummary(out)
    for split, meta in manifest["splits"].items():
        s.samples[split], s.errors[split] = meta["samples"], meta["errors"]
        s.shards += len(meta["shards"])
    s.shards_skipped = s.shards
    return s


def _remove_work(work: str) -> None:
    """Remove the work dir, its fingerprint last: while the fingerprint exists, resume works."""
    stamp = os.path.join(work, "fingerprint")
    for name in os.listdir(work):
        path = os.path.join(work, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif path != stamp:
            os.remove(path)
    os.remove(stamp)
    os.rmdir(work)


def _remove_temp_files(out: str) -> None:
    """Temporary files of writes cut short by a kill (see write_atomic)."""
    for d in [out] + [os.path.join(out, s) for s in SPLITS]:
        if os.path.isdir(d):
            for name in os.listdir(d):
                if ".tmp-" in name and os.path.isfile(os.path.join(d, name)):
                    os.remove(os.path.join(d, name))


def _prepare_out(out: str, work: str, fingerprint: str, resume: bool, overwrite: bool) -> None:
    stamp = os.path.join(work, "fingerprint")
    if os.path.isdir(work) and all(n.startswith("fingerprint.tmp-") for n in os.listdir(work)):
        for name in os.listdir(work):  # killed before its fingerprint was written or after
            os.remove(os.path.join(work, name))  # it was removed: nothing of a build is in it
        os.rmdir(work)
    if os.path.exists(out) and os.listdir(out):
        if overwrite:
            shutil.rmtree(out)
        elif resume and os.path.exists(stamp):
            with open(stamp) as f:
                if f.read() != fingerprint:
                    raise ValueError(f"{out} was started with other inputs or options; "
                                     "resume needs the same ones (or use --overwrite)")
            _remove_temp_files(out)
            return
        elif resume and os.path.exists(os.path.join(out, "dataset.json")):
            raise ValueError(f"{out} is already a finished dataset; use --overwrite to rebuild")
        else:
            raise FileExistsError(f"{out} is not empty; use --resume to continue an interrupted "
                                  "build or --overwrite to replace it")
    os.makedirs(work, exist_ok=True)
    write_atomic(stamp, fingerprint)


def _finalize(out: str, src: str, opts: BuildOptions, inputs, tasks: list[ShardTask],
              splits: list[str], summary: BuildSummary) -> None:
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "layout": inputs.layout,
        "classes": inputs.classes, "splits": {},
        "build": {k: v for k, v in asdict(opts).items() if k != "splits"},
    }
    if any(inputs.class_descriptions):
        manifest["class_descriptions"] = inputs.class_descriptions
    for split in splits:
        parts_s, parts_e, shards = [], [], []
        pre = [asdict(e) for e in inputs.errors if e.split == split]
        parts_e.append(pl.DataFrame(pre, schema=ERROR_SCHEMA))
        for t in (t for t in tasks if t.split == split):
            err_path, smp_path = _part_paths(out, split, t.name)
            with open(smp_path) as fs, open(err_path) as fe:
                s = pl.DataFrame(json.load(fs), schema=SAMPLE_SCHEMA)
                e = pl.DataFrame(json.load(fe), schema=ERROR_SCHEMA)
            parts_s.append(s)
            parts_e.append(e)
            if s.height:
                nbytes = os.path.getsize(os.path.join(out, split, f"{t.name}.tar"))
                shards.append({"name": t.name, "samples": s.height, "bytes": nbytes})
        samples = pl.concat(parts_s) if parts_s else pl.DataFrame(schema=SAMPLE_SCHEMA)
        errors = pl.concat(parts_e)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        _write_parquet(samples, os.path.join(out, split, "samples.parquet"))
        _write_parquet(errors, os.path.join(out, split, "errors.parquet"))
        manifest["splits"][split] = {"samples": samples.height, "errors": errors.height,
                                     "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        summary.samples[split] = samples.height
        summary.errors[split] = errors.height
        for reason, n in errors.group_by("reason").len().iter_rows():
            summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + n
    write_atomic(os.path.join(out, "dataset.json"), json.dumps(manifest, indent=2) + "\n")


def format_summary(s: BuildSummary) -> str:
    lines = [f"built {s.out}: {sum(s.samples.values())} samples in {s.shards} shards "
             f"({s.shards_skipped} already complete), {s.total_errors} rejected, "
             f"{s.seconds:.1f}s, {s.images_per_sec():.0f} img/s"]
    for split in s.samples:
        lines.append(f"  {split}: {s.samples[split]} samples, {s.errors[split]} rejected")
    for reason, n in sorted(s.errors_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected, {reason}: {n}")
    return "\n".join(lines)


