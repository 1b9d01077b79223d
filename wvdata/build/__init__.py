"""`wvdata build`: raw crawl -> immutable WebDataset shards, DALI indexes and sample tables.

The local process pool works on chunks of images (a one-shard build uses every worker; one
writer here joins each shard's chunks in order); a Ray task is one whole shard. Either way the
output bytes depend only on the input and the options. A shard's outputs are renamed into
place only when complete, and its part tables last, so `resume=True` after a kill at any point
redoes just the unfinished shards and gives byte-identical output. Source and output may be
fsspec URLs (`s3://bucket/crawl -o s3://bucket/ds`): everything is then read and written
through the store (see `wvdata._store`), with the same guarantees; the lease is an object in
the bucket. Modules: `layouts` (reading a crawl), `image` (normalising one image), `tar` (tar
and `.idx` writing), `options` (the options, declared once), `shards` (planning, chunks, the
writer of a shard), `_url` (crawls in object storage).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from .._args import add_options, options_from, positive_int
from .._store import Store, normalize_url
from ..dataset import FORMAT_NAME, FORMAT_VERSION, is_url
from ..engine import ENGINES, check_engine, default_workers, run_tasks
from ..lock import LOCK_NAME, dataset_lock
from .image import load_torch
from .layouts import SPLITS, scan
from .options import DEFAULT_SHARD_BYTES, SAMPLE_OVERHEAD, BuildOptions
from .shards import (
    WORK_DIR,
    ShardSink,
    ShardTask,
    encode_chunk,
    part_paths,
    plan_shards,
    run_shard,
    split_chunks,
)

__all__ = ["build", "BuildOptions", "BuildSummary", "format_summary", "add_cli", "DEFAULT_SHARD_BYTES",
           "SAMPLE_OVERHEAD"]

CHUNK_MAX = 32  # images per chunk of the local pool, at most
SAMPLE_SCHEMA = {
    "key": pl.String, "split": pl.String, "shard": pl.String, "label": pl.Int64,
    "class_name": pl.String, "source": pl.String, "query": pl.String, "src_path": pl.String,
    "width": pl.Int32, "height": pl.Int32, "bytes": pl.Int64, "sha1": pl.String,
    "offset": pl.Int64, "data_offset": pl.Int64, "reencoded": pl.Boolean, "trailer_bytes": pl.Int64,
    "meta_error": pl.String,
    "query_text": pl.String, "meta": pl.String,  # meta: the matched meta record as JSON text
}
ERROR_SCHEMA = {"split": pl.String, "src_path": pl.String, "reason": pl.String, "detail": pl.String}


@dataclass
class BuildSummary:
    out: str
    samples: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    processed: int = 0  # inputs read in this run (a resume skips the complete shards' ones)
    finished_before: bool = False  # a --resume found the dataset finished with these options

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def images_per_sec(self) -> float:
        """Inputs processed by this run per second of it."""
        return self.processed / self.seconds if self.seconds else 0.0


def _write_parquet(df: pl.DataFrame, st: Store, rel: str) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf, statistics=False)
    st.write_atomic(rel, buf.getvalue())


def _fingerprint(opts: BuildOptions, src: str, inputs) -> str:
    h = hashlib.sha1(json.dumps(asdict(opts), sort_keys=True, default=list).encode())
    h.update((src if is_url(src) else os.path.abspath(src)).encode())
    for r in inputs.rows:
        h.update(f"{r.key}\0{r.path}\0{r.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------- build


def build(src: str | os.PathLike, out: str | os.PathLike, options: BuildOptions | None = None, *,
          workers: int | None = None, engine: str = "local", resume: bool = False,
          overwrite: bool = False, progress: bool = True, **option_values: Any) -> BuildSummary:
    """Build a dataset directory from a raw crawl (webvision, folder or manifest layout).

    Options are a `BuildOptions` and/or its fields as keywords (`resize_short=256`).
    engine: "local" (a pool of `workers` processes, default all cores) or "ray".
    """
    t0 = time.perf_counter()
    src, out = str(src), str(out)
    opts = BuildOptions.of(options, **option_values)
    check_engine(engine)
    inputs = scan(src, opts.layout, opts.splits, opts.root)
    contain = _real(opts.root) if opts.root else None if inputs.layout == "manifest" else _real(src)
    fingerprint = _fingerprint(opts, src, inputs)
    real_src, real_out = _real(src), _real(out)
    sep = "/" if is_url(out) else os.sep
    if overwrite and (real_src == real_out or real_src.startswith(real_out.rstrip(sep) + sep)):
        raise ValueError(f"refusing to --overwrite {out}: the source {src} is inside it")
    with dataset_lock(out, "wvdata build"):
        return _build_locked(src, out, opts, inputs, contain, fingerprint, workers, engine, resume, overwrite,
                             progress, t0)


def _real(path: str) -> str:
    """A local path resolved (links, `..`); a URL normalised (`.`, `..`)."""
    return normalize_url(path) if is_url(path) else os.path.realpath(path)


def _build_locked(src: str, out: str, opts: BuildOptions, inputs, contain: str | None, fingerprint: str,
                  workers: int | None, engine: str, resume: bool, overwrite: bool, progress: bool,
                  t0: float) -> BuildSummary:
    st = Store(out)
    done = _finished(st, opts) if resume else None
    if done is not None:
        done.seconds = time.perf_counter() - t0
        return done
    _prepare_out(st, fingerprint, resume, overwrite)
    out = out if st.url else os.path.abspath(out)
    tasks: list[ShardTask] = []
    splits_present = [s for s in SPLITS if s in opts.splits and (
        any(r.split == s for r in inputs.rows) or any(e.split == s for e in inputs.errors))]
    for split in splits_present:
        rows = [r for r in inputs.rows if r.split == split]
        for i, shard_rows in enumerate(plan_shards(rows, opts)):
            tasks.append(ShardTask(out, split, f"shard-{i:06d}", shard_rows, inputs.classes, opts.image(),
                                   contain))
    complete = {f"{s}/{n}" for s in splits_present for n in st.listdir(f"{WORK_DIR}/{s}")} if resume else set()
    todo = [t for t in tasks if f"{t.split}/{t.name}.samples.json" not in complete]
    summary = BuildSummary(out, shards=len(tasks), shards_skipped=len(tasks) - len(todo),
                           processed=sum(len(t.rows) for t in todo))
    warmup = load_torch if opts.resize_short or opts.max_side else None
    if engine == "ray":  # a Ray task is a whole shard
        for _ in run_tasks(run_shard, todo, weights=[len(t.rows) for t in todo], engine=engine,
                           desc="build", progress=progress, ticks=True, warmup=warmup):
            pass
    else:
        _run_chunks(todo, workers or default_workers(), progress, warmup)
    _finalize(st, opts, inputs, tasks, splits_present, summary)
    _remove_work(st)
    summary.seconds = time.perf_counter() - t0
    return summary


def chunk_size(images: int, workers: int) -> int:
    """Images per chunk: about 8 chunks per worker, so that even a one-shard build keeps every
    worker busy to the end, and at most CHUNK_MAX (a chunk's output travels back in one piece)."""
    return max(1, min(CHUNK_MAX, -(-images // (8 * workers))))


def _run_chunks(todo: list[ShardTask], workers: int, progress: bool, warmup) -> None:
    """The local pool: chunks of images from every shard, in shard order, each shard joined
    by one writer here as its chunks come back (its outputs byte-identical whatever the
    chunking, since tar fragments join exactly)."""
    size = chunk_size(sum(len(t.rows) for t in todo), workers)
    chunks = [c for i, t in enumerate(todo) for c in split_chunks(i, t, size)]
    counts = Counter(c.shard for c in chunks)
    sinks: dict[int, ShardSink] = {}
    try:
        for chunk in run_tasks(encode_chunk, chunks, weights=[len(c.rows) for c in chunks], workers=workers,
                               desc="build", progress=progress, ticks=True, warmup=warmup):
            sink = sinks.get(chunk.shard)
            if sink is None:
                sink = sinks[chunk.shard] = ShardSink(todo[chunk.shard], counts[chunk.shard])
            if sink.add(chunk):
                del sinks[chunk.shard]
    except BaseException:
        for sink in sinks.values():  # shards cut short leave no partial tar (resume redoes them)
            sink.abort()
        raise
    assert not sinks, "a shard was left unfinished"


def _finished(st: Store, opts: BuildOptions) -> BuildSummary | None:
    """--resume on a dataset that finished with these options: nothing to do."""
    if st.listdir(WORK_DIR) or not st.exists("dataset.json"):
        return None
    manifest = json.loads(st.read_bytes("dataset.json"))
    if manifest.get("build") != opts.recorded():
        raise ValueError(f"{st.root} is a finished dataset built with other options; "
                         "use --overwrite to rebuild")
    s = BuildSummary(st.root)
    for split, meta in manifest["splits"].items():
        s.samples[split], s.errors[split] = meta["samples"], meta["errors"]
        s.shards += len(meta["shards"])
    s.shards_skipped, s.finished_before = s.shards, True
    return s


_STAMP = f"{WORK_DIR}/fingerprint"


def _remove_work(st: Store) -> None:
    """Remove the work dir, its fingerprint last: while the fingerprint exists, resume works."""
    for name in st.listdir(WORK_DIR):
        if name != "fingerprint":
            st.rmtree(f"{WORK_DIR}/{name}")
    st.remove(_STAMP)
    st.rmtree(WORK_DIR)


def _remove_temp_files(st: Store) -> None:
    """Temporary files of writes cut short by a kill (see Store.write_atomic); a bucket has none."""
    if st.url:
        return
    for d in ["", *SPLITS]:
        for name in st.listdir(d):
            if ".tmp-" in name and st.isfile(f"{d}/{name}" if d else name):
                st.remove(f"{d}/{name}" if d else name)


def _prepare_out(st: Store, fingerprint: str, resume: bool, overwrite: bool) -> None:
    out = st.root
    if all(n.startswith("fingerprint.tmp-") for n in st.listdir(WORK_DIR)) and st.isdir(WORK_DIR):
        st.rmtree(WORK_DIR)  # killed before its fingerprint was written or after it was removed
    present = set(st.listdir()) - {LOCK_NAME}
    if present:
        if overwrite:
            for name in present:  # the lease we hold stays
                st.rmtree(name)
        elif resume and st.exists(_STAMP):
            if st.read_text(_STAMP) != fingerprint:
                raise ValueError(f"{out} was started with other inputs or options; "
                                 "resume needs the same ones (or use --overwrite)")
            _remove_temp_files(st)
            return
        elif resume and st.exists("dataset.json"):
            raise ValueError(f"{out} is already a finished dataset; use --overwrite to rebuild")
        else:
            raise FileExistsError(f"{out} is not empty; use --resume to continue an interrupted "
                                  "build or --overwrite to replace it")
    st.makedirs(WORK_DIR)
    st.write_atomic(_STAMP, fingerprint)


def _finalize(st: Store, opts: BuildOptions, inputs, tasks: list[ShardTask],
              splits: list[str], summary: BuildSummary) -> None:
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "layout": inputs.layout,
        "classes": inputs.classes, "splits": {},
        "build": opts.recorded(),
    }
    if any(inputs.class_descriptions):
        manifest["class_descriptions"] = inputs.class_descriptions
    for split in splits:
        parts_s, parts_e, shards = [], [], []
        pre = [asdict(e) for e in inputs.errors if e.split == split]
        parts_e.append(pl.DataFrame(pre, schema=ERROR_SCHEMA))
        sizes = st.find(split)  # one listing, not a request per shard
        for t in (t for t in tasks if t.split == split):
            err_path, smp_path = part_paths(split, t.name)
            s = pl.DataFrame(json.loads(st.read_bytes(smp_path)), schema=SAMPLE_SCHEMA)
            e = pl.DataFrame(json.loads(st.read_bytes(err_path)), schema=ERROR_SCHEMA)
            parts_s.append(s)
            parts_e.append(e)
            if s.height:
                nbytes = sizes[f"{t.name}.tar"]
                shards.append({"name": t.name, "samples": s.height, "bytes": nbytes})
        samples = pl.concat(parts_s) if parts_s else pl.DataFrame(schema=SAMPLE_SCHEMA)
        errors = pl.concat(parts_e)
        st.makedirs(split)
        _write_parquet(samples, st, f"{split}/samples.parquet")
        _write_parquet(errors, st, f"{split}/errors.parquet")
        manifest["splits"][split] = {"samples": samples.height, "errors": errors.height,
                                     "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        summary.samples[split] = samples.height
        summary.errors[split] = errors.height
        for reason, n in errors.group_by("reason").len().iter_rows():
            summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + n
    st.write_atomic("dataset.json", json.dumps(manifest, indent=2) + "\n")


def format_summary(s: BuildSummary) -> str:
    if s.finished_before:
        lines = [f"nothing to do: {s.out} is complete ({sum(s.samples.values())} samples in {s.shards} shards, "
                 f"{s.total_errors} rejected)"]
    else:
        lines = [f"built {s.out}: {sum(s.samples.values())} samples in {s.shards} shards "
                 f"({s.shards_skipped} already complete), {s.total_errors} rejected, "
                 f"{s.seconds:.1f}s, {s.images_per_sec():.0f} img/s"]
    for split in s.samples:
        lines.append(f"  {split}: {s.samples[split]} samples, {s.errors[split]} rejected")
    for reason, n in sorted(s.errors_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected, {reason}: {n}")
    return "\n".join(lines)




def add_cli(subparsers: Any) -> None:
    """Register `wvdata build`; its option flags come from BuildOptions."""
    p = subparsers.add_parser("build", help="raw crawl -> WebDataset shards + DALI index + manifest",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="crawl root (webvision or folder layout) or a manifest file")
    p.add_argument("-o", "--out", required=True, help="dataset directory to write")
    add_options(p, BuildOptions)
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--engine", default="local", choices=ENGINES, help="local process pool or Ray tasks")
    p.add_argument("--resume", action="store_true", help="skip shards that are complete")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--strict", action="store_true", help="exit 1 if any input was rejected")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    summary = build(args.src, args.out, options_from(args, BuildOptions), workers=args.workers,
                    engine=args.engine, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.quiet)
    print(format_summary(summary))
    if args.strict and summary.total_errors:
        print(f"--strict: {summary.total_errors} inputs were rejected "
              f"(see {args.out}/<split>/errors.parquet)", file=sys.stderr)
        return 1
    return 0
