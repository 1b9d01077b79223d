"""The lean trainer: timm models on wvdata views, DDP via torchrun, exact resume, AUM margins.

    python -m trainer.train --data DATASET --model resnet50 --epochs 30 --out runs/r50
    torchrun --nproc_per_node 8 -m trainer.train --data DATASET --per-class 800 ...
    python -m trainer.train --data DATASET --model test_resnet --image-size 32 --epochs 3  # CPU

Everything reusable comes from `wvdata` (views, loader, normalisation); this file is the loop.
It writes the run directory of DESIGN.md: config.json, metrics.jsonl, checkpoint.pt,
scores/{split}.npy + {split}_keys.parquet, margins/epoch-NNN.parquet (+ threshold.parquet).

Multi-scale training (`--train-sizes 160,192,224`) changes the size per epoch, cycling
through the list; evaluation averages softmax over `--eval-sizes` x `--eval-crops`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

import wvdata
from wvdata.stream import loader, normalize
from wvdata.views import balance_per_class, load_view, memory_view, select

from .aum import MarginAccumulator, threshold_samples
from .metrics import accuracy_report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory built by `wvdata build`")
    p.add_argument("--view", default=None, help="train on this view (default: the whole train split)")
    p.add_argument("--out", default="runs/run", help="run directory")
    p.add_argument("--model", default="resnet50", help="timm model name (test_resnet for CPU tests)")
    p.add_argument("--pretrained-file", default=None, help="local weights to start from (nothing is downloaded)")
    p.add_argument("--epochs", type=int, default=10, help="ignored when --stages is given")
    p.add_argument("--stages", default=None, help='curriculum, e.g. "1:10,1+2:10,1+2+3:20" (subsets:epochs)')
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.1, help="for a global batch of 256; scaled linearly")
    p.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="not applied to norms and biases")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--clip-grad", type=float, default=5.0, help="max grad norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights (0: off), e.g. 0.9998")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-sizes", default=None, help="multi-scale: sizes cycled per epoch, e.g. 160,192,224")
    p.add_argument("--eval-sizes", default=None, help="multi-scale testing sizes (default: --image-size)")
    p.add_argument("--eval-crops", type=int, default=1, choices=[1, 5, 10])
    p.add_argument("--randaug", default="2,9", help="RandAugment n,m (0,0: off)")
    p.add_argument("--crop-scale", default="0.08,1", help="RandomResizedCrop area range")
    p.add_argument("--per-class", type=int, default=None, help="class balance: N entries per class per epoch")
    p.add_argument("--loader", default="torch", choices=["torch", "dali"])
    p.add_argument("--workers", type=int, default=4, help="loader workers (DALI threads) per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aum", action="store_true", help="record per-sample margins every epoch")
    p.add_argument("--aum-threshold-samples", action="store_true",
                   help="relabel a seeded 1/(C+1) of the samples to an extra fake class")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this many steps in total (as on SIGTERM)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------- set-up


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


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


def build_model(args, num_outputs: int, device: torch.device) -> torch.nn.Module:
    import timm

    model = timm.create_model(args.model, pretrained=False, num_classes=num_outputs)
    if args.pretrained_file:
        state = torch.load(args.pretrained_file, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        own = model.state_dict()
        keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(keep, strict=False)
        print(f"loaded {len(keep)}/{len(own)} tensors from {args.pretrained_file} "
              f"(skipped {len(state) - len(keep)} missing or differently shaped, e.g. the classifier)")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (every 1-d parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR as a function of fractional epoch: linear warmup, then cosine to zero."""

    def __init__(self, optimizer, base_lr: float, warmup: float, total: float):
        self.optimizer, self.base_lr, self.warmup, self.total = optimizer, base_lr, warmup, total
        self.t = 0.0

    def lr_at(self, t: float) -> float:
        if t < self.warmup:
            return self.base_lr * (t + 1e-3) / self.warmup
        progress = (t - self.warmup) / max(1e-9, self.total - self.warmup)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def step(self, t: float) -> float:
        self.t = t
        lr = self.lr_at(t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"t": self.t, "base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, s: dict) -> None:
        self.t, self.base_lr, self.warmup, self.total = s["t"], s["base_lr"], s["warmup"], s["total"]


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def run_config(args, world: int, device: torch.device) -> dict:
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
    return {"args": vars(args), "git_commit": commit, "versions": versions,
            "hardware": {"world_size": world, "device": str(device), "gpus": gpus,
                         "cpus": os.cpu_count(), "platform": platform.platform()}}


# ---------------------------------------------------------------- data


def epoch_view(ds, args, subsets, epoch: int, base_keys):
    """This epoch's entries: the view (or split), curriculum subsets, per-class balance."""
    if subsets is None and not args.per_class:
        return load_view(ds, args.view, "train")
    df = select(ds, "train", keys=base_keys, subsets=subsets)
    if args.per_class:
        df = balance_per_class(df, args.per_class, seed=args.seed * 100003 + epoch)
    return memory_view(ds, df, "train")


@torch.no_grad()
def predict(model, ds, split: str, args, device, world: int, num_classes: int):
    """Softmax over the real classes, averaged over eval sizes and crops; rows by sample id."""
    model.eval()
    sizes = [int(s) for s in args.eval_sizes.split(",")] if args.eval_sizes else [args.image_size]
    n = ds.samples(split).height
    total = torch.zeros(n, num_classes, dtype=torch.float32)
    for size in sizes:
        ld = loader(ds, split, batch_size=args.batch_size, backend=args.loader, train=False, image_size=size,
                    eval_crops=args.eval_crops, num_workers=args.workers, with_index=True)
        ids_all, probs_all = [], []
        for images, _, _, ids in ld:
            x = normalize(images, device=device, channels_last=device.type == "cuda")
            crops = x.shape[1] if x.dim() == 5 else 1
            x = x.flatten(0, 1) if x.dim() == 5 else x
            with autocast(device):
                logits = model(x).float()[:, :num_classes]
            probs = logits.softmax(1).view(-1, crops, num_classes).mean(1)
            ids_all.append(ids)
            probs_all.append(probs.cpu())
        ids = torch.cat(ids_all) if ids_all else torch.zeros(0, dtype=torch.int64)
        probs = torch.cat(probs_all) if probs_all else torch.zeros(0, num_classes)
        for rank_ids, rank_probs in gather((ids, probs), world):
            total[rank_ids] = rank_probs  # padding repeats write the same row twice
    model.train()
    return (total / len(sizes)).numpy()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    ds = wvdata.open_dataset(args.data)
    num_classes = ds.num_classes
    samples = ds.samples("train")
    num_outputs = num_classes + 1 if args.aum_threshold_samples else num_classes
    train_labels = torch.as_tensor(samples["label"].to_numpy().copy(), dtype=torch.int64)
    fake = threshold_samples(samples.height, num_classes, args.seed) if args.aum_threshold_samples else None
    if fake is not None:
        train_labels[fake] = num_classes
    train_labels = train_labels.to(device)
    stages = parse_stages(args.stages, args.epochs)
    total_epochs = sum(n for _, n in stages)
    epoch_stage = [subsets for subsets, n in stages for _ in range(n)]
    base_keys = load_view(ds, args.view, "train").entries["key"] if args.view else None
    if any(s is not None for s in epoch_stage):
        select(ds, "train", subsets=[1])  # fail now, naming `wvdata curriculum`, if it was not run
    train_sizes = [int(s) for s in args.train_sizes.split(",")] if args.train_sizes else [args.image_size]
    randaug = tuple(int(v) for v in args.randaug.split(","))
    crop_scale = tuple(float(v) for v in args.crop_scale.split(","))

    model = build_model(args, num_outputs, device)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    global_batch = args.batch_size * world
    base_lr = args.lr * global_batch / 256
    groups = param_groups(model, args.weight_decay)
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=base_lr)
    schedule = WarmupCosine(optimizer, base_lr, args.warmup_epochs, total_epochs)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if world > 1 else model
    step_model = torch.compile(ddp) if args.compile else ddp
    aum = MarginAccumulator(samples.height, device) if args.aum or args.aum_threshold_samples else None

    start_epoch, loader_state, steps = 0, None, 0
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        start_epoch, steps = ckpt["epoch"], ckpt["steps"]
        loader_state = ckpt["loader"][rank] if ckpt["loader"] is not None else None
        set_rng_state(ckpt["rng"][rank])
        if aum is not None and ckpt.get("aum") is not None:
            aum.sum.copy_(ckpt["aum"][0])
            aum.count.copy_(ckpt["aum"][1])
        if rank == 0:
            print(f"resumed from {ckpt_path}: epoch {start_epoch}, "
                  f"{loader_state['batch'] if loader_state else 0} batches into it")
    elif args.resume and rank == 0:
        print(f"--resume: no {ckpt_path} yet, starting fresh")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run_config(args, world, device), indent=2, default=str))
        if fake is not None:
            pl.DataFrame({"key": samples["key"].gather(fake), "label": samples["label"].gather(fake),
                          "fake_label": np.full(len(fake), num_classes)}).write_parquet(out / "margins_threshold.tmp")
            (out / "margins").mkdir(exist_ok=True)
            os.replace(out / "margins_threshold.tmp", out / "margins" / "threshold.parquet")

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    def save(epoch: int, ld_state) -> None:
        states = gather(ld_state, world)
        rngs = gather(rng_state(), world)
        if rank == 0:
            ckpt = {"model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                    "epoch": epoch, "steps": steps, "loader": states, "rng": rngs,
                    "aum": (aum.sum.cpu(), aum.count.cpu()) if aum is not None else None, "args": vars(args)}
            torch.save(ckpt, out / "checkpoint.pt.tmp")
            os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")
        if world > 1:
            dist.barrier()

    def should_stop() -> bool:
        if args.stop_after_steps is not None and steps >= args.stop_after_steps:
            return True  # the same step on every rank
        if world == 1:
            return stop["flag"]
        if steps % 10:  # agreeing costs a host sync: ranks compare SIGTERM flags every 10 steps
            return False
        t = torch.tensor([int(stop["flag"])], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return bool(t.item())

    for epoch in range(start_epoch, total_epochs):
        size = train_sizes[epoch % len(train_sizes)]
        v = epoch_view(ds, args, epoch_stage[epoch], epoch, base_keys)
        ld = loader(ds, view=v, batch_size=args.batch_size, backend=args.loader, train=True, image_size=size,
                    seed=args.seed, num_workers=args.workers, randaug=randaug, scale=crop_scale,
                    with_index=True)
        ld.set_epoch(epoch)
        if loader_state is not None:
            ld.load_state_dict(loader_state)
            loader_state = None
        elif aum is not None:
            aum.reset()
        done0 = ld.state_dict()["batch"]
        if rank == 0:
            print(f"epoch {epoch}: {len(v)} entries, {len(ld)} batches of {args.batch_size} per rank, "
                  f"size {size}" + (f", resuming at batch {done0}" if done0 else ""), flush=True)
        bar = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ld), initial=done0, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True)
        t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
        lr = schedule.lr_at(epoch + done0 / len(ld))
        model.train()
        for i, (images, _, _, ids) in enumerate(ld, start=done0):
            lr = schedule.step(epoch + i / len(ld))
            ids = ids.to(device, non_blocking=True)
            labels = train_labels[ids]
            x = normalize(images, device=device, channels_last=device.type == "cuda")
            with autocast(device):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            if aum is not None:
                aum.add(logits, labels, ids)
            loss_sum += loss.detach() * len(ids)
            seen += len(ids)
            steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(img_s=f"{seen * world / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3g}")
            if should_stop():
                save(epoch, ld.state_dict())
                if rank == 0:
                    print(f"stopped at epoch {epoch}, step {steps}: {ckpt_path} saved; rerun with --resume")
                if world > 1:
                    dist.destroy_process_group()
                return 0
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        if aum is not None:
            aum.reduce()
            if rank == 0:
                write_margins(out, epoch, samples, train_labels.cpu(), aum)
        if world > 1:
            dist.all_reduce(loss_sum)
        eval_model = ema.module if ema is not None else model
        probs = predict(eval_model, ds, "val", args, device, world, num_classes) if "val" in ds.splits else None
        if rank == 0:
            record = {"epoch": epoch, "train_loss": loss_sum.item() / max(1, seen * world), "lr": lr,
                      "images_per_sec": seen * world / seconds, "image_size": size, "seconds": seconds}
            if probs is not None:
                acc = accuracy_report(probs, ds.samples("val")["label"].to_numpy())
                record.update({f"val_{k}": v for k, v in acc.items()})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        save(epoch + 1, None)

    eval_model = ema.module if ema is not None else model
    for split in ("val", "test"):
        if split in ds.splits:
            probs = predict(eval_model, ds, split, args, device, world, num_classes)
            if rank == 0:
                write_scores(out, split, ds.samples(split)["key"], probs)
    if world > 1:
        dist.destroy_process_group()
    return 0


def write_margins(out: Path, epoch: int, samples: pl.DataFrame, labels: torch.Tensor, aum) -> None:
    ids, mean, count = aum.result()
    (out / "margins").mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"key": samples["key"].gather(ids), "label": labels.numpy()[ids],
                  "margin": mean, "count": count}).write_parquet(out / "margins" / f"epoch-{epoch:03d}.parquet")


def write_scores(out: Path, split: str, keys: pl.Series, probs: np.ndarray) -> None:
    (out / "scores").mkdir(parents=True, exist_ok=True)
    np.save(out / "scores" / f"{split}.npy", probs.astype(np.float16))
    pl.DataFrame({"key": keys}).write_parquet(out / "scores" / f"{split}_keys.parquet")


if __name__ == "__main__":
    sys.exit(main())
