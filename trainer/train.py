"""The lean trainer: timm models on wvdata views, DDP via torchrun, exact resume, AUM margins.

    python -m trainer.train --data DATASET --model resnet50 --epochs 30 --out runs/r50
    torchrun --nproc_per_node 8 -m trainer.train --data DATASET --per-class 800 ...
    python -m trainer.train --data DATASET --model test_resnet --image-size 32 --epochs 3  # CPU

Everything reusable comes from `wvdata` (views, loader, normalisation); this file is the loop.
It writes the run directory: config.json, metrics.jsonl, checkpoint.pt, scores/{split}.npy
+ {split}_keys.parquet, margins/epoch-NNN.parquet (+ threshold.parquet).

Multi-scale training (`--train-sizes 160,192,224`) changes the size per epoch, cycling
through the list; evaluation averages softmax over `--eval-sizes` x `--eval-crops`. Evaluation
never holds an N x C matrix: each rank writes float16 rows to OUT/.eval/ and rank 0 assembles
the score file from them (trainer/evaluate.py), so all ranks must see OUT (one node, or shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

import wvdata
from wvdata.cli import HelpFormatter
from wvdata.stream import loader, normalize
from wvdata.views import ENTRY_COLUMNS, balance_per_class, load_view, memory_view, select

from ._cli import run_main
from .aum import MarginAccumulator, threshold_samples, write_margins
from .evaluate import evaluate
from .optim import EMA, WarmupCosine, param_groups

if TYPE_CHECKING:
    from wvdata import Dataset
    from wvdata.stream import LoaderBase
    from wvdata.views import View


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory built by `wvdata build`")
    p.add_argument("--view", default=None, help="train on this view (default: the whole train split)")
    p.add_argument("--out", default="runs/run", help="run directory")
    p.add_argument("--model", default="resnet50", help="timm model name (test_resnet for CPU tests)")
    p.add_argument("--pretrained-file", default=None, help="local weights to start from (nothing is downloaded)")
    p.add_argument("--epochs", type=int, default=10, help="ignored when --stages is given")
    p.add_argument("--stages", default=None, help='curriculum, e.g. "1:10,1+2:10,1+2+3:20" (subsets:epochs)')
    p.add_argument("--batch-quota", default=None, help="curriculum batches: global per-subset counts, e.g. 128,64,64")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.1, help="for a global batch of 256; scaled linearly")
    p.add_argument("--opt", default="sgd", choices=["sgd", "adamw"], help="optimiser (SGD with Nesterov, or AdamW)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="not applied to norms and biases")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup, in (fractional) epochs")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--clip-grad", type=float, default=5.0, help="max grad norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights (0: off), e.g. 0.9998")
    p.add_argument("--image-size", type=int, default=224, help="training crop size (see --train-sizes)")
    p.add_argument("--train-sizes", default=None, help="multi-scale: sizes cycled per epoch, e.g. 160,192,224")
    p.add_argument("--eval-sizes", default=None, help="multi-scale testing sizes (default: --image-size)")
    p.add_argument("--eval-crops", type=int, default=1, choices=[1, 5, 10], help="crops averaged per eval image")
    p.add_argument("--randaug", default="2,9", help="RandAugment n,m (0,0: off)")
    p.add_argument("--crop-scale", default="0.08,1", help="RandomResizedCrop area range")
    p.add_argument("--per-class", type=int, default=None, help="class balance: N entries per class per epoch")
    p.add_argument("--loader", default="torch", choices=["torch", "dali"], help="wvdata.loader backend")
    p.add_argument("--workers", type=int, default=None, help="loader workers per rank (default: cores, up to 8)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and augmentation")
    p.add_argument("--aum", action="store_true", help="record per-sample margins every epoch")
    p.add_argument("--aum-threshold-samples", action="store_true", help="relabel a seeded 1/(C+1) to a fake class")
    p.add_argument("--aum-threshold-part", type=int, choices=[0, 1], help="threshold samples from id half 0 or 1")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this many steps in total (as on SIGTERM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- set-up


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device


def setup_process(seed: int) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPUs, gloo on CPUs. Then seed every RNG (the same on
    every rank) and, on CPU, ask for deterministic kernels."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def parse_stages(text: str | None, epochs: int) -> list[tuple[list[int] | None, int]]:
    """'1:10,1+2:5' -> [([1], 10), ([1, 2], 5)]; no stages -> all data for `epochs`."""
    if not text:
        return [(None, epochs)]
    stages = []
    for part in text.split(","):
        subsets, _, n = part.partition(":")
        if not n:
            raise ValueError(f"bad stage {part!r}: expected SUBSETS:EPOCHS like 1+2:10")
        stages.append(([int(s) for s in subsets.split("+")], int(n)))
    return stages


@dataclass
class Data:
    """The train split as the loop sees it, and how loaders over it (and over the eval splits) are made."""

    ds: Dataset
    samples: pl.DataFrame  # the train split's samples; row i is sample id i
    labels: torch.Tensor  # the label each sample is trained on, on the device
    fake: np.ndarray | None  # sample ids relabelled to the extra class C (--aum-threshold-samples)
    epochs: int  # in all, over the curriculum stages
    epoch_subsets: list[list[int] | None]  # each epoch's curriculum subsets (None: all)
    view: str | None  # train on this view (None: the whole train split)
    view_keys: pl.Series | None  # its keys, for curriculum stages and class balance to select from
    per_class: int | None
    seed: int
    batch_size: int  # per rank
    backend: str
    workers: int | None
    train_sizes: list[int]  # cycled per epoch
    randaug: tuple[int, ...]
    crop_scale: tuple[float, ...]
    image_size: int
    eval_sizes: str | None
    eval_crops: int
    batch_quota: str | None = None  # curriculum quota batches (per subset, global); a stage's absent subsets share

    def train_loader(self, epoch: int) -> tuple[LoaderBase, View, int]:
        """This epoch's train loader (set to the epoch), entries and image size. The entries: the view (or split),
        curriculum subsets, per-class balance; the size cycles through the train sizes."""
        size = self.train_sizes[epoch % len(self.train_sizes)]
        subsets = self.epoch_subsets[epoch]
        if subsets is None and not self.per_class:
            v = load_view(self.ds, self.view, "train")
        else:
            df = select(self.ds, "train", keys=self.view_keys, subsets=subsets, columns=ENTRY_COLUMNS)
            if self.per_class:
                df = balance_per_class(df, self.per_class, seed=self.seed * 100003 + epoch)
            v = memory_view(self.ds, df, "train")
        ld = loader(self.ds, view=v, batch_size=self.batch_size, backend=self.backend, train=True, image_size=size,
                    seed=self.seed, num_workers=self.workers, randaug=self.randaug, scale=self.crop_scale,
                    with_index=True, quota=self.batch_quota)
        ld.set_epoch(epoch)
        return ld, v, size


def setup_data(args: argparse.Namespace, device: torch.device) -> Data:
    """Open the dataset, relabel the AUM threshold samples, plan the curriculum; fail early on a bad plan."""
    ds = wvdata.open_dataset(args.data)
    samples = ds.samples("train", ["key", "label"])  # not the wide text columns (GBs at 16M)
    labels = torch.as_tensor(samples["label"].to_numpy().copy(), dtype=torch.int64)
    fake = (threshold_samples(samples.height, ds.num_classes, args.seed, args.aum_threshold_part)
            if args.aum_threshold_samples else None)
    if fake is not None:
        labels[fake] = ds.num_classes
    labels = labels.to(device)
    stages = parse_stages(args.stages, args.epochs)
    epoch_subsets = [subsets for subsets, n in stages for _ in range(n)]
    view_keys = load_view(ds, args.view, "train").entries["key"] if args.view else None
    if any(s is not None for s in epoch_subsets):
        select(ds, "train", subsets=[1])  # fail now, naming `wvdata curriculum`, if it was not run
    return Data(
        ds, samples, labels, fake, sum(n for _, n in stages), epoch_subsets, args.view, view_keys, args.per_class,
        args.seed, args.batch_size, args.loader, args.workers,
        train_sizes=[int(s) for s in args.train_sizes.split(",")] if args.train_sizes else [args.image_size],
        randaug=tuple(int(v) for v in args.randaug.split(",")),
        crop_scale=tuple(float(v) for v in args.crop_scale.split(",")), batch_quota=args.batch_quota,
        image_size=args.image_size, eval_sizes=args.eval_sizes, eval_crops=args.eval_crops)


def build_model(name: str, num_outputs: int, device: torch.device,
                pretrained_file: str | None = None) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_outputs)
    if pretrained_file:
        state = torch.load(pretrained_file, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        own = model.state_dict()
        keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(keep, strict=False)
        print(f"loaded {len(keep)}/{len(own)} tensors from {pretrained_file} "
              f"(skipped {len(state) - len(keep)} missing or differently shaped, e.g. the classifier)")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class State:
    """What training changes, and what a checkpoint keeps."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # what the steps call: the model, DDP-wrapped and/or compiled
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    aum: MarginAccumulator | None
    epoch: int = 0  # the epoch to start (or continue) at
    steps: int = 0  # optimiser steps in all
    loader_state: dict | None = None  # this rank's position inside `epoch`, when resuming mid-epoch

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def setup_training(args: argparse.Namespace, data: Data, env: Dist) -> State:
    """Model, EMA, optimiser (LR scaled by global batch / 256), schedule, DDP/compile wrapper, AUM sums."""
    num_outputs = data.ds.num_classes + 1 if args.aum_threshold_samples else data.ds.num_classes
    model = build_model(args.model, num_outputs, env.device, args.pretrained_file)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    base_lr = args.lr * (args.batch_size * env.world) / 256  # --lr is for a global batch of 256
    groups = param_groups(model, args.weight_decay)
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=base_lr)
    schedule = WarmupCosine(optimizer, base_lr, args.warmup_epochs, data.epochs)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                                    else None) if env.world > 1 else model
    step_model = torch.compile(ddp) if args.compile else ddp
    aum = MarginAccumulator(data.samples.height, env.device) if args.aum or args.aum_threshold_samples else None
    return State(model, step_model, ema, optimizer, schedule, aum)


# ---------------------------------------------------------------- checkpoints and the run directory


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: Path, state: State, epoch: int, loader_state: dict | None, env: Dist, config: dict) -> None:
    """Rank 0 writes the weights with every rank's loader position and RNG state (atomically); all ranks wait.
    Mid-epoch, the AUM sums so far are reduced onto rank 0 first, and only rank 0 restores them."""
    if loader_state is not None and state.aum is not None:
        state.aum.reduce()
    states = gather(loader_state, env.world)
    rngs = gather(rng_state(), env.world)
    if env.rank == 0:
        ckpt = {"model": state.model.state_dict(), "ema": state.ema.module.state_dict() if state.ema else None,
                "optimizer": state.optimizer.state_dict(), "scheduler": state.schedule.state_dict(),
                "epoch": epoch, "steps": state.steps, "loader": states, "rng": rngs,
                "aum": (state.aum.sum.cpu(), state.aum.count.cpu()) if state.aum is not None else None,
                "args": config}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    if env.world > 1:
        dist.barrier()


def resume(path: Path, state: State, rank: int) -> None:
    """Continue where the checkpoint at `path` left off (mid-epoch exactly); start fresh if there is none."""
    if not path.exists():
        if rank == 0:
            print(f"--resume: no {path} yet, starting fresh")
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state.model.load_state_dict(ckpt["model"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.module.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.schedule.load_state_dict(ckpt["scheduler"])
    state.epoch, state.steps = ckpt["epoch"], ckpt["steps"]
    state.loader_state = ckpt["loader"][rank]
    set_rng_state(ckpt["rng"][rank])
    if state.aum is not None and ckpt.get("aum") is not None and rank == 0:  # the sums of every rank
        state.aum.sum.copy_(ckpt["aum"][0])
        state.aum.count.copy_(ckpt["aum"][1])
    if rank == 0:
        print(f"resumed from {path}: epoch {state.epoch}, "
              f"{state.loader_state['batch'] if state.loader_state else 0} batches into it")


def run_config(config: dict, env: Dist) -> dict:
    """The arguments with the code, library versions and hardware they ran on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "wvdata": wvdata.__version__}
    for mod in ("torchvision", "timm", "nvidia.dali"):
        try:
            versions[mod] = __import__(mod, fromlist=["_"]).__version__
        except ImportError:
            versions[mod] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"args": config, "git_commit": commit, "versions": versions,
            "hardware": {"world_size": env.world, "device": str(env.device), "gpus": gpus,
                         "cpus": os.cpu_count(), "platform": platform.platform()}}


def start_run_directory(out: Path, run: dict, data: Data) -> None:
    """config.json, and margins/threshold.parquet: the samples relabelled to the fake class, if any."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(run, indent=2, default=str))
    fake, samples, num_classes = data.fake, data.samples, data.ds.num_classes
    if fake is not None:
        pl.DataFrame({"key": samples["key"].gather(fake), "label": samples["label"].gather(fake),
                      "fake_label": np.full(len(fake), num_classes)}).write_parquet(out / "margins_threshold.tmp")
        (out / "margins").mkdir(exist_ok=True)
        os.replace(out / "margins_threshold.tmp", out / "margins" / "threshold.parquet")


# ---------------------------------------------------------------- the loop


def autocast(device: torch.device) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class StopFlag:
    """When to checkpoint mid-epoch and exit: after --stop-after-steps steps, or on SIGTERM."""

    def __init__(self, after_steps: int | None, env: Dist) -> None:
        self.after_steps, self.env, self.signalled = after_steps, env, False
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))

    def __call__(self, steps: int) -> bool:
        if self.after_steps is not None and steps >= self.after_steps:
            return True  # the same step on every rank
        if self.env.world == 1:
            return self.signalled
        if steps % 10:  # agreeing costs a host sync: ranks compare SIGTERM flags every 10 steps
            return False
        t = torch.tensor([int(self.signalled)], device=self.env.device if self.env.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return bool(t.item())


@dataclass
class EpochStats:
    image_size: int
    loss_sum: torch.Tensor  # of per-sample losses on this rank, on the device
    seen: int  # samples this rank trained on
    lr: float  # the last one set
    seconds: float
    stopped_at: dict | None  # this rank's loader state, when the epoch stopped early


def train_epoch(state: State, data: Data, epoch: int, env: Dist, stop: StopFlag, *, smoothing: float,
                clip_grad: float, progress: bool) -> EpochStats:
    """Steps through the epoch (the rest of it when resumed mid-epoch) until it ends or `stop` says so.
    AUM sums restart each epoch, except a resumed one, which continues from the checkpointed sums."""
    ld, v, size = data.train_loader(epoch)
    if state.loader_state is not None:
        ld.load_state_dict(state.loader_state)
        state.loader_state = None
    elif state.aum is not None:
        state.aum.reset()
    done = ld.state_dict()["batch"]
    if env.rank == 0:
        print(f"epoch {epoch}: {len(v)} entries, {len(ld)} batches of {data.batch_size} per rank, "
              f"size {size}" + (f", resuming at batch {done}" if done else ""), flush=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ld), initial=done, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True)
    t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=env.device)
    lr = state.schedule.lr_at(epoch + done / len(ld))
    stopped_at = None
    state.model.train()
    for i, (images, _, _, ids) in enumerate(ld, start=done):
        lr = state.schedule.step(epoch + i / len(ld))
        ids = ids.to(env.device, non_blocking=True)
        y = data.labels[ids]
        x = normalize(images, device=env.device, channels_last=env.device.type == "cuda")
        with autocast(env.device):
            logits = state.step_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
        state.optimizer.step()
        if state.ema is not None:
            state.ema.update(state.model)
        if state.aum is not None:
            state.aum.add(logits, y, ids)
        loss_sum += loss.detach() * len(ids)
        seen += len(ids)
        state.steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(img_s=f"{seen * env.world / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3g}")
        if stop(state.steps):
            stopped_at = ld.state_dict()
            break
    if bar is not None:
        bar.close()
    return EpochStats(size, loss_sum, seen, lr, time.perf_counter() - t0, stopped_at)


def score(model: torch.nn.Module, data: Data, split: str, out: Path, env: Dist, write: bool) -> dict | None:
    """Score `split` on every rank (see trainer.evaluate); with `write`, rank 0 writes scores/{split}.npy (float16
    softmax, rows by sample id) and {split}_keys.parquet. The metrics on rank 0, None elsewhere."""
    sizes = [int(s) for s in data.eval_sizes.split(",")] if data.eval_sizes else [data.image_size]
    if env.world > 1:  # rank 0's buffers (BatchNorm statistics drift per rank): all score the checkpointed model
        for b in model.buffers():
            dist.broadcast(b, 0)
    return evaluate(model, data.ds, split, rank=env.rank, world=env.world, device=env.device, sizes=sizes,
                    crops=data.eval_crops, batch_size=data.batch_size, backend=data.backend, workers=data.workers,
                    work=out / ".eval", dest=out / "scores" / f"{split}.npy" if write else None)


def evaluate_and_log(model: torch.nn.Module, data: Data, stats: EpochStats, epoch: int, out: Path, env: Dist,
                     write: bool = False) -> None:
    """Sum the train loss over ranks, score val (and write its score file, with `write`); rank 0 appends the
    epoch's record to metrics.jsonl."""
    if env.world > 1:
        dist.all_reduce(stats.loss_sum)
    acc = score(model, data, "val", out, env, write) if "val" in data.ds.splits else None
    if env.rank != 0:
        return
    seen, seconds = stats.seen, stats.seconds
    record = {"epoch": epoch, "train_loss": stats.loss_sum.item() / max(1, seen * env.world), "lr": stats.lr,
              "images_per_sec": seen * env.world / seconds, "image_size": stats.image_size, "seconds": seconds}
    record.update({f"val_{k}": v for k, v in (acc or {}).items()})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def write_scores(model: torch.nn.Module, data: Data, out: Path, env: Dist, done: tuple[str, ...] = ()) -> None:
    """scores/{split}.npy and {split}_keys.parquet for val and test (those not in `done` already)."""
    for split in ("val", "test"):
        if split in data.ds.splits and split not in done:
            score(model, data, split, out, env, write=True)
    if env.rank == 0:
        shutil.rmtree(out / ".eval", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = setup_process(args.seed)
    out, config = Path(args.out), vars(args)
    data = setup_data(args, env.device)
    state = setup_training(args, data, env)
    ckpt_path = out / "checkpoint.pt"
    if args.resume:
        resume(ckpt_path, state, env.rank)
    if env.rank == 0:
        start_run_directory(out, run_config(config, env), data)
    stop = StopFlag(args.stop_after_steps, env)

    for epoch in range(state.epoch, data.epochs):
        stats = train_epoch(state, data, epoch, env, stop, smoothing=args.smoothing, clip_grad=args.clip_grad,
                            progress=env.rank == 0 and not args.no_progress)
        if stats.stopped_at is not None:  # SIGTERM or --stop-after-steps: checkpoint mid-epoch and exit
            save_checkpoint(ckpt_path, state, epoch, stats.stopped_at, env, config)
            if env.rank == 0:
                print(f"stopped at epoch {epoch}, step {state.steps}: {ckpt_path} saved; rerun with --resume")
            if env.world > 1:
                dist.destroy_process_group()
            return 0
        if state.aum is not None:  # before val is scored: a writer thread (polars) alive while the val
            # loader forks its workers can deadlock a worker (seen on 2 ranks), so the write is synchronous
            write_margins(state.aum, out / "margins" / f"epoch-{epoch:03d}.parquet", data.samples["key"],
                          data.labels.cpu().numpy(), env.rank)
        last = epoch == data.epochs - 1  # its val scores are the final ones: write them now, not score twice
        evaluate_and_log(state.eval_model, data, stats, epoch, out, env, write=last)
        save_checkpoint(ckpt_path, state, epoch + 1, None, env, config)

    write_scores(state.eval_model, data, out, env, done=("val",) if state.epoch < data.epochs else ())
    if env.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="trainer.train"))
