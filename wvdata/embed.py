"""`wvdata embed`: global-pooled image features of a split (or a view) from a trained model.

The model is a timm model: the trainer's `RUN/checkpoint.pt` (model name and image size read
from the `config.json` beside it; the EMA weights when the run kept them, else the weights) or
any timm model name with a local weights file (nothing is downloaded). Features are timm's
`forward_features` + `forward_head(pre_logits=True)`, computed in batches on the GPU (bf16)
when there is one, else on the CPU, over the loader's eval transform (resize + centre crop).

Output `DATASET/features/NAME/`: `features.npy` (N x D float16, one row per unique sample of
the split or view, in read order) + `keys.parquet` (column `key`, the rows' keys) + `meta.json`.
A sample that cannot be decoded gets no row: it is listed in `errors.parquet` (key, reason)
and counted in the summary.

Scale-out: the entries are cut into chunks of `chunk` samples; a chunk is one task of the task
runner (`engine="local"`: in this process, the loader's workers decoding; `engine="ray"`: Ray
tasks) or, under torchrun, of rank `chunk % WORLD_SIZE`. Each finished chunk is written as a
part file under `features/NAME/.parts/`; a rerun with the same arguments skips the finished
chunks (a rerun with other arguments starts over), and the parts are assembled at the end.
A dataset at a URL (s3://...) gets its parts and features in the bucket (`wvdata._store`).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from ._store import Store
from .dataset import Dataset, check_name, open_dataset
from .engine import ENGINES, run_tasks, tick
from .lock import dataset_lock
from .views import View, load_view

CHUNK = 8192  # samples per task and part file


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to embed with: a timm model name, a weights file and the key inside it."""

    name: str
    weights: str  # absolute path of checkpoint.pt or a weights file
    key: str | None  # "ema" / "model" inside a trainer checkpoint, None for a plain state dict
    image_size: int


def model_spec(checkpoint: str | os.PathLike | None = None, model: str | None = None,
               weights: str | os.PathLike | None = None, image_size: int | None = None) -> ModelSpec:
    """Resolve `checkpoint` (a trainer run's, with config.json beside it) or `model` + `weights`."""
    if (checkpoint is None) == (weights is None):
        raise ValueError("give either --checkpoint RUN/checkpoint.pt or --model NAME --weights FILE")
    if checkpoint is not None:
        path = os.path.abspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} not found")
        config = os.path.join(os.path.dirname(path), "config.json")
        args: dict[str, Any] = {}
        if os.path.isfile(config):
            with open(config) as f:
                args = json.load(f).get("args", {})
        elif model is None or image_size is None:
            raise FileNotFoundError(f"{config} not found: pass --model NAME and --image-size N for {path}")
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ValueError(f"{path} is not a trainer checkpoint (no 'model' state dict); use --weights")
        key = "ema" if ckpt.get("ema") is not None else "model"
        return ModelSpec(model or args["model"], path, key, int(image_size or args["image_size"]))
    if model is None:
        raise ValueError("--weights needs --model NAME (a timm model name)")
    path = os.path.abspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    return ModelSpec(model, path, None, int(image_size or _default_size(model)))


def _default_size(name: str) -> int:
    import timm

    return int(timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg["input_size"][-1])


def load_model(spec: ModelSpec, device: Any = "cpu"):
    """The timm model of `spec` without its classifier, weights loaded, in eval mode on `device`.

    Every backbone tensor must be in the weights; the only tensors left over may be the
    classifier's (the head is dropped: features are pre-logits)."""
    import timm
    import torch

    model = timm.create_model(spec.name, pretrained=False, num_classes=0)
    if spec.weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(spec.weights)
    else:
        state = torch.load(spec.weights, map_location="cpu", weights_only=spec.key is None)
    if spec.key is not None:
        state = state[spec.key]
    elif isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{spec.weights} does not fit timm model {spec.name!r}: {len(wrong)} tensors of another "
                         f"shape, e.g. {wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    extra = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    if missing or extra:
        raise ValueError(f"{spec.weights} does not fit timm model {spec.name!r}: {len(missing)} tensors missing "
                         f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    model = model.eval().to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------- chunks (one task each)


@dataclass
class _Chunk:
    root: str
    split: str
    index: int
    entries: pl.DataFrame  # view entry rows (ENTRY_COLUMNS + shard_id) of this chunk
    part: str  # the part file to write, relative to the dataset
    spec: ModelSpec
    batch_size: int
    workers: int
    device: str | None  # None: cuda:LOCAL_RANK when CUDA is present, else cpu


_MODEL: dict[tuple, Any] = {}  # (spec, device) -> model, loaded once per process


def _device(device: str | None) -> str:
    import torch

    if device:
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _embed_chunk(task: _Chunk) -> tuple[int, int]:
    """Embed one chunk and write its part file: features of the readable rows + a mask of them."""
    import torch

    from .stream import loader, normalize

    device = _device(task.device)
    if (task.spec, device) not in _MODEL:
        _MODEL.clear()
        _MODEL[(task.spec, device)] = load_model(task.spec, device)
    model = _MODEL[(task.spec, device)]
    ds = Dataset(task.root)
    ld = loader(ds, view=View(ds, task.split, None, task.entries), batch_size=task.batch_size, train=False,
                shuffle=False, image_size=task.spec.image_size, num_workers=task.workers, rank=0, world_size=1,
                pin_memory=device.startswith("cuda"))
    cuda = device.startswith("cuda")
    feats, keys = [], []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for images, _, batch_keys in ld:
            x = normalize(images, device=device, channels_last=cuda)
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.float().flatten(1).cpu().numpy().astype(np.float16))
            keys += batch_keys
            tick(len(batch_keys))
    order = {k: i for i, k in enumerate(task.entries["key"].to_list())}
    ok = np.zeros(task.entries.height, bool)
    ok[[order[k] for k in keys]] = True
    rows = np.argsort([order[k] for k in keys], kind="stable")  # keys come back in entry order already
    out = np.concatenate(feats)[rows] if feats else np.zeros((0, 0), np.float16)
    buf = io.BytesIO()
    np.savez(buf, features=out, ok=ok)
    Store(task.root).write_atomic(task.part, buf.getvalue())
    return task.index, int(ok.sum())


# ---------------------------------------------------------------- embed


def _plan_entries(v: View) -> pl.DataFrame:
    """The unique samples of a view (first occurrence), in read order (shard, offset)."""
    return v.entries.unique("key", keep="first", maintain_order=True).sort(["shard_id", "data_offset"])


def _plan_record(spec: ModelSpec, split: str, view: str | None, keys: pl.Series, chunk: int) -> dict[str, Any]:
    st = os.stat(spec.weights)
    digest = hashlib.sha1("\n".join(keys.to_list()).encode()).hexdigest()
    return {"spec": asdict(spec), "weights_mtime": st.st_mtime, "weights_bytes": st.st_size, "split": split,
            "view": view, "chunk": chunk, "samples": keys.len(), "keys_sha1": digest}


def _dist() -> tuple[int, int, Any, bool]:
    """(rank, world size, torch.distributed or None, whether we started its process group) under
    torchrun (gloo: it only synchronises); (0, 1, None, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1, None, False
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist, started


def embed(dataset: str | os.PathLike | Dataset, *, checkpoint: str | os.PathLike | None = None,
          model: str | None = None, weights: str | os.PathLike | None = None, split: str = "train",
          view: str | None = None, name: str | None = None, image_size: int | None = None,
          batch_size: int = 256, workers: int | None = None, engine: str = "local", device: str | None = None,
          chunk: int = CHUNK, progress: bool = True) -> dict[str, Any]:
    """Embed the unique samples of a split (or view) and write DATASET/features/NAME; return its summary.

    NAME defaults to the run directory's name (or the model name). workers: decoding processes
    per chunk (default: min(8, cores)). Resumable: finished chunks are kept and skipped."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    spec = model_spec(checkpoint, model, weights, image_size)
    name = check_name("view", name or (os.path.basename(os.path.dirname(spec.weights)) if checkpoint else spec.name))
    v = load_view(ds, view, split)
    entries = _plan_entries(v)
    if entries.height == 0:
        raise ValueError(f"{view or split!r} has no samples to embed")
    st = Store(ds.root)
    out = f"features/{name}"
    parts = f"{out}/.parts"
    rank, world, dist, started = _dist()
    record = _plan_record(spec, v.split, view, entries["key"], int(chunk))
    n_chunks = -(-entries.height // chunk)
    if rank == 0:
        _prepare_parts(st, parts, record)
        resumed = len({f"part-{i:06d}.npz" for i in range(n_chunks)} & set(st.listdir(parts)))
    if dist is not None:
        dist.barrier()
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    tasks = [_Chunk(ds.root, v.split, i, entries.slice(i * chunk, chunk), f"{parts}/part-{i:06d}.npz",
                    spec, batch_size, workers, device)
             for i in range(n_chunks) if i % world == rank]
    done = set(st.listdir(parts))
    todo = [t for t in tasks if t.part.rsplit("/", 1)[1] not in done]
    for _ in run_tasks(_embed_chunk, todo, weights=[t.entries.height for t in todo], engine=engine, workers=1,
                       desc=f"embed {name}", progress=progress and rank == 0, ticks=True):
        pass
    if dist is not None:
        dist.barrier()
    summary = {}
    if rank == 0:
        summary = _assemble(ds, st, out, parts, entries, n_chunks, record)
        summary.update(chunks=n_chunks, chunks_resumed=resumed, seconds=time.perf_counter() - t0)
    if dist is not None:
        dist.barrier()  # the others return once the features are in place
        if started:
            dist.destroy_process_group()
    return summary


def _prepare_parts(st: Store, parts: str, record: dict[str, Any]) -> None:
    """Keep the parts of an interrupted run of the same plan; start over for any other plan."""
    plan = f"{parts}/plan.json"
    if st.listdir(parts):
        try:
            same = json.loads(st.read_bytes(plan)) == json.loads(json.dumps(record))
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"embed: {st.path(parts)} holds parts of a different plan; starting over", file=sys.stderr)
            st.rmtree(parts)
    st.makedirs(parts)
    if not st.exists(plan):
        st.write_atomic(plan, json.dumps(record, indent=2))


def _load_part(st: Store, rel: str):
    """A part file, lazily on disk (np.load of an .npz reads members on access)."""
    return np.load(io.BytesIO(st.read_bytes(rel)) if st.url else st.path(rel))


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def _assemble(ds: Dataset, st: Store, out: str, parts: str, entries: pl.DataFrame, n_chunks: int,
              record: dict[str, Any]) -> dict[str, Any]:
    """Stream the part files into features.npy (published last) + keys.parquet (+ errors.parquet,
    meta.json); one part in memory at a time."""
    names = [f"{parts}/part-{i:06d}.npz" for i in range(n_chunks)]
    ok = np.concatenate([_load_part(st, n)["ok"] for n in names])
    with dataset_lock(ds.root, f"wvdata embed {out.rsplit('/', 1)[1]}"):
        keys = entries["key"].filter(pl.Series(ok))
        bad = entries["key"].filter(pl.Series(~ok))
        with st.writer(f"{out}/features.npy") as f:
            dim = None
            for n in names:
                feats = _load_part(st, n)["features"]
                if not len(feats):
                    continue
                if dim is None:
                    dim = feats.shape[1]
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                             "shape": (int(ok.sum()), dim)})
                elif feats.shape[1] != dim:
                    raise ValueError(f"parts under {st.path(parts)} disagree on the feature size "
                                     f"({dim} and {feats.shape[1]}); rerun after deleting it")
                f.write(np.ascontiguousarray(feats, dtype=np.float16).tobytes())
            if dim is None:  # no readable sample at all
                dim = 0
                np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                         "shape": (0, 0)})
            if bad.len():
                st.write_atomic(f"{out}/errors.parquet", _parquet_bytes(
                    pl.DataFrame({"key": bad, "reason": ["unreadable image"] * bad.len()})))
            else:
                st.remove(f"{out}/errors.parquet")
            meta = {**record, "rows": int(ok.sum()), "dim": dim, "unreadable": int(bad.len()), "dtype": "float16"}
            st.write_atomic(f"{out}/meta.json", json.dumps(meta, indent=2))
            st.write_atomic(f"{out}/keys.parquet", _parquet_bytes(pl.DataFrame({"key": keys})))
        st.rmtree(parts)
    return {"path": st.path(out), "rows": int(ok.sum()), "dim": dim, "unreadable": int(bad.len()),
            "model": record["spec"]}


def load_features(dataset: str | os.PathLike | Dataset, name: str) -> tuple[np.ndarray, pl.Series]:
    """(N x D float16 features, their keys) of DATASET/features/NAME, checked to match."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    st = Store(ds.root)
    out = f"features/{check_name('view', name)}"
    try:
        feats = np.load(io.BytesIO(st.read_bytes(f"{out}/features.npy"))) if st.url \
            else np.load(st.path(f"{out}/features.npy"), mmap_mode="r")
        keys = pl.read_parquet(io.BytesIO(st.read_bytes(f"{out}/keys.parquet")))["key"]
    except FileNotFoundError:
        raise FileNotFoundError(f"features {name!r} not found in {ds.root}/features: run `wvdata embed` "
                                "first") from None
    if feats.ndim != 2 or feats.shape[0] != keys.len():
        raise ValueError(f"features {name!r}: features.npy has shape {feats.shape} but keys.parquet "
                         f"{keys.len()} keys; re-run `wvdata embed`")
    return feats, keys


# ---------------------------------------------------------------- CLI


def _cli(args: argparse.Namespace) -> int:
    s = embed(args.dataset, checkpoint=args.checkpoint, model=args.model, weights=args.weights, split=args.split,
              view=args.view, name=args.name, image_size=args.image_size, batch_size=args.batch_size,
              workers=args.workers, engine=args.engine, device=args.device, chunk=args.chunk,
              progress=not args.no_progress)
    if s:
        spec = s["model"]
        print(f"embed: {s['rows']} samples x {s['dim']} features ({spec['name']} at {spec['image_size']} px, "
              f"{spec['key'] or 'weights'} of {spec['weights']}) in {s['seconds']:.1f}s; "
              f"{s['unreadable']} unreadable (errors.parquet); {s['chunks']} chunks, "
              f"{s['chunks_resumed']} from an earlier run")
        print(f"wrote {s['path']}/features.npy and keys.parquet")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `wvdata embed`."""
    p = subparsers.add_parser("embed", help="image features from a trained model (for curriculum)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("--checkpoint", default=None, help="a trainer run's checkpoint.pt (config.json beside it)")
    p.add_argument("--model", default=None, help="timm model name (with --weights; overrides the run's)")
    p.add_argument("--weights", default=None, help="local weights file for --model (nothing is downloaded)")
    p.add_argument("--split", default="train", help="split to embed")
    p.add_argument("--view", default=None, help="embed only this view's samples (each once)")
    p.add_argument("--name", default=None, help="features/NAME (default: the run directory's or model's name)")
    p.add_argument("--image-size", type=int, default=None, help="eval image size (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, cores))")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if present, else cpu)")
    p.add_argument("--chunk", type=int, default=CHUNK, help="samples per task and part file")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: in this process (under torchrun: chunks dealt to the ranks); ray: a Ray task per chunk")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
