"""Evaluation at WebVision 2.0 scale (294k images x 5,000 classes) without an N x C matrix in memory.

Each rank scores its share of the split batch by batch: the softmax (averaged over eval sizes and
crops) is written as float16 rows to the rank's own part file as it goes, and only one int64 per
row travels between ranks: the sample id with whether the label is in the top 1 / top 5 (computed
on the device in float32). Rank 0 then drops the loader's padding (an id's first appearance, rank by
rank, is the one kept), computes the metrics from the hits, and assembles `scores/{split}.npy`
(N x C float16, rows by sample id, as `scores/{split}_keys.parquet` lists them) chunk by chunk from
the part files by memory map. With several eval sizes, the running float32 sums of the earlier
sizes live in a per-rank scratch file, read back batch by batch. The part files sit in the run
directory (`.eval/`, removed afterwards), so every rank of a run must see it: one node, or a
shared file system.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from .metrics import report_from_hits

if TYPE_CHECKING:
    from wvdata import Dataset

# one pass over the split at one eval size: (softmax averaged over crops, float32 B x C on the device; sample ids)
Pass = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
ASSEMBLE_ROWS = 2048  # rows of the score file assembled at a time (x 5,000 classes x float16: 20 MB)


def evaluate(model: torch.nn.Module, ds: Dataset, split: str, *, rank: int, world: int, device: torch.device,
             sizes: Sequence[int], crops: int, batch_size: int, backend: str, workers: int | None, work: Path,
             dest: Path | None = None) -> dict[str, float] | None:
    """Score `split` with `model` on every rank; with `dest`, rank 0 writes `dest` (`scores/{split}.npy`) and
    `{split}_keys.parquet` beside it. Returns the metrics on rank 0 ({} for a split without labels), None elsewhere."""
    from wvdata.stream import loader, normalize

    num_classes = ds.num_classes
    samples = ds.samples(split, ["key", "label"])

    def one_size(size: int) -> Pass:
        def run() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            ld = loader(ds, split, batch_size=batch_size, backend=backend, train=False, image_size=size,
                        eval_crops=crops, num_workers=workers, with_index=True)
            for images, _, _, ids in ld:
                x = normalize(images, device=device, channels_last=device.type == "cuda")
                n_crops = x.shape[1] if x.dim() == 5 else 1
                x = x.flatten(0, 1) if x.dim() == 5 else x
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x).float()[:, :num_classes]  # the real classes (not AUM's fake one)
                yield logits.softmax(1).view(-1, n_crops, num_classes).mean(1), ids
        return run

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            report = score_passes([one_size(s) for s in sizes], samples["label"].to_numpy(), num_classes,
                                  rank=rank, world=world, device=device, work=work, dest=dest, name=split)
    finally:
        model.train(was_training)
    if rank == 0 and dest is not None:
        pl.DataFrame({"key": samples["key"]}).write_parquet(dest.with_name(f"{split}_keys.parquet"))
    return report


def score_passes(passes: Sequence[Pass], labels: np.ndarray, num_classes: int, *, rank: int, world: int,
                 device: torch.device, work: Path, dest: Path | None = None,
                 name: str = "scores") -> dict[str, float] | None:
    """Average the passes' softmax rows, keep per-row top-1/top-5 hits, write float16 rows (with `dest`);
    gather ids and hits; rank 0 computes the metrics and assembles `dest`. Collective: every rank calls it.
    `name` names this rank's files under `work`."""
    if not passes:
        raise ValueError("no eval sizes")
    labels = np.asarray(labels, dtype=np.int64)
    on_device = torch.as_tensor(labels, device=device)
    part = work / f"{name}-rank{rank}.f16" if dest is not None else None
    sums = work / f"{name}-rank{rank}.sums" if len(passes) > 1 else None
    if part is not None or sums is not None:
        work.mkdir(parents=True, exist_ok=True)
    # Per-row results go to a few growing arrays and each batch through buffers reused batch after batch: one
    # small allocation kept per batch between large short-lived ones fragments the heap (+7 KB a row measured).
    packed = _Growing()  # per row of the first pass: sample id << 2 | top-1 hit | top-5 hit << 1
    io_buf = np.empty(0, np.float32)  # a batch of float16 rows out, or of float32 sums in
    with ExitStack() as files:
        rows_out = files.enter_context(open(part, "wb")) if part is not None else None
        sums_io = files.enter_context(open(sums, "w+b")) if sums is not None else None
        for p, make in enumerate(passes):
            first, last, row = p == 0, p == len(passes) - 1, 0
            for probs, ids in make():
                ids_np = ids.numpy() if ids.device.type == "cpu" else ids.cpu().numpy()
                n = len(ids_np)
                if first:
                    packed.extend(ids_np.astype(np.int64) << 2)
                elif not np.array_equal(ids_np, packed.view()[row:row + n] >> 2):
                    raise RuntimeError(f"eval pass {p} yielded other samples than the first at row {row}")
                if io_buf.size < n * num_classes:
                    io_buf = np.empty(n * num_classes, np.float32)
                probs = probs.float()
                if not first:  # add the earlier sizes' sums
                    got = os.preadv(sums_io.fileno(), [io_buf[:n * num_classes]], row * num_classes * 4)
                    assert got == n * num_classes * 4, "short read of the eval sums"
                    probs = probs.add_(torch.from_numpy(io_buf[:n * num_classes]).view(n, num_classes).to(device))
                if last:
                    if len(passes) > 1:
                        probs = probs.div_(len(passes))
                    top = probs.topk(min(5, num_classes), dim=1).indices
                    hit = top == on_device[ids.to(device)][:, None]
                    packed.view()[row:row + n] |= (hit[:, 0].long() | (hit.any(1).long() << 1)).cpu().numpy()
                    if rows_out is not None:
                        half = io_buf.view(np.float16)[:n * num_classes]
                        torch.from_numpy(half).view(n, num_classes).copy_(probs)
                        rows_out.write(memoryview(half).cast("B"))
                else:
                    block = probs.contiguous().cpu().numpy()
                    os.pwrite(sums_io.fileno(), memoryview(block).cast("B"), row * num_classes * 4)
                row += n
            if row != len(packed):
                raise RuntimeError(f"eval pass {p} yielded {row} rows, the first {len(packed)}")
    if sums is not None:
        sums.unlink()
    packed = torch.from_numpy(packed.view())
    every = gather_rows(packed, world, device)  # a few bytes per row, never the scores
    report = None
    if rank == 0:
        packed = np.concatenate(every)
        src, bits_np = first_appearance(packed >> 2, len(labels)), packed & 3
        hits = {k: np.zeros(len(labels), bool) for k in (1, 5)}
        seen = src >= 0  # rows no rank yielded (unreadable images) count as misses
        hits[1][seen], hits[5][seen] = (bits_np[src[seen]] & 1) > 0, (bits_np[src[seen]] & 2) > 0
        report = report_from_hits(hits, labels) if (labels >= 0).any() else {}
        if dest is not None:
            parts = [work / f"{name}-rank{r}.f16" for r in range(world)]
            assemble_scores(parts, [len(e) for e in every], src, num_classes, dest)
            for q in parts:
                q.unlink()
    if world > 1:
        dist.barrier()  # the part files are gone before any rank scores again
    return report


class _Growing:
    """An int64 array grown by doubling: a few large allocations instead of one per batch."""

    def __init__(self) -> None:
        self.data, self.n = np.zeros(1 << 16, np.int64), 0

    def __len__(self) -> int:
        return self.n

    def extend(self, x: np.ndarray) -> None:
        if self.n + len(x) > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.n + len(x)), np.int64)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:self.n + len(x)] = x
        self.n += len(x)

    def view(self) -> np.ndarray:
        return self.data[:self.n]


def gather_rows(t: torch.Tensor, world: int, device: torch.device) -> list[np.ndarray]:
    """Every rank's 1-d int64 tensor (lengths may differ: unreadable images are skipped), as numpy, rank by rank."""
    if world == 1:
        return [t.numpy()]
    comm = device if device.type == "cuda" else torch.device("cpu")
    n = torch.tensor([len(t)], device=comm)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lengths, n)
    longest = int(max(x.item() for x in lengths))
    padded = torch.zeros(longest, dtype=torch.int64, device=comm)
    padded[:len(t)] = t.to(comm)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:int(m.item())].cpu().numpy() for o, m in zip(out, lengths)]


def first_appearance(ids: np.ndarray, n: int) -> np.ndarray:
    """For each sample id in [0, n): the position of its first appearance in `ids` (-1: never). The loader pads
    the ranks to equal length by repeating entries; keeping first appearances drops every repeat exactly once."""
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"eval yielded sample ids outside [0, {n})")
    uniq, first = np.unique(ids, return_index=True)
    src = np.full(n, -1, np.int64)
    src[uniq] = first
    return src


def assemble_scores(parts: Sequence[Path], counts: Sequence[int], src: np.ndarray, num_classes: int, dest: Path,
                    chunk_rows: int = ASSEMBLE_ROWS) -> None:
    """Write `dest`, an N x C float16 .npy: row i is row src[i] of the part files taken rank after rank
    (`counts` rows each), zeros where src[i] < 0. The parts are memory-mapped one chunk of rows at a time
    and the output written sequentially, so memory stays at a chunk whatever N is. Atomic (temporary name)."""
    n = len(src)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_bytes = num_classes * 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                "shape": (n, num_classes)})
        for lo in range(0, n, chunk_rows):
            want = src[lo:lo + chunk_rows]
            block = np.zeros((len(want), num_classes), np.float16)
            for r, part in enumerate(parts):
                sel = np.flatnonzero((want >= starts[r]) & (want < starts[r + 1]))
                if not len(sel):
                    continue
                rows = want[sel] - starts[r]
                a, b = int(rows.min()), int(rows.max()) + 1
                mm = np.memmap(part, np.float16, "r", offset=a * row_bytes, shape=(b - a, num_classes))
                block[sel] = mm[rows - a]
                del mm  # unmapped: its pages leave this process's resident set
            f.write(memoryview(block).cast("B"))
    os.replace(tmp, dest)
