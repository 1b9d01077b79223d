"""AUM bookkeeping on the device: per-sample margins summed by sample id, no host sync.

The margin of a sample is the logit of the label it is trained on minus the largest other
logit (Pleiss et al., "Identifying Mislabeled Data using the Area Under the Margin Ranking").
At an epoch's end the sums are reduced onto rank 0 (two tensor collectives, whatever the number
of samples) and written as one parquet file from flat arrays: keys stay an Arrow column, gathered
by sample id only when some samples were not seen, never a Python object per sample.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logit[label] - max over other classes, per row."""
    logits = logits.float()
    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return assigned - others


class MarginAccumulator:
    """Sum and count of margins per sample id for one epoch, kept on the device."""

    def __init__(self, num_samples: int, device: torch.device):
        self.sum = torch.zeros(num_samples, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_samples, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        m = margins(logits.detach(), labels)
        self.sum.index_add_(0, ids, m.to(torch.float64))
        self.count.index_add_(0, ids, torch.ones_like(ids))

    def reduce(self) -> None:
        """Sum over ranks onto rank 0 (once per epoch, and before a mid-epoch checkpoint); the other ranks'
        sums are left unspecified: reset them (or restart from zeros) before adding again."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.reduce(self.sum, dst=0)
            torch.distributed.reduce(self.count, dst=0)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids seen, mean margin, visits) on the host."""
        count = self.count.cpu().numpy().copy()
        if count.all():  # every sample seen: whole arrays, no gathering
            return np.arange(len(count)), (self.sum.cpu().numpy() / count).astype(np.float32), count
        seen = np.flatnonzero(count)
        mean = (self.sum.cpu().numpy()[seen] / count[seen]).astype(np.float32)
        return seen, mean, count[seen]

    def reset(self) -> None:
        self.sum.zero_()
        self.count.zero_()


def margins_frame(aum: MarginAccumulator, keys: pl.Series, labels: np.ndarray) -> pl.DataFrame:
    """The epoch's margins table: key, label (trained on), margin (float32 mean), count, for the samples seen,
    in sample id order. `keys` and `labels` are by sample id; when every sample was seen they are used whole."""
    ids, mean, count = aum.result()
    if len(ids) == len(keys):  # every sample seen (the usual epoch over a whole split): nothing to gather
        return pl.DataFrame({"key": keys, "label": labels, "margin": mean, "count": count})
    return pl.DataFrame({"key": keys.gather(ids), "label": labels[ids], "margin": mean, "count": count})


def write_margins(aum: MarginAccumulator, path: Path, keys: pl.Series, labels: np.ndarray, rank: int) -> None:
    """Reduce the epoch's sums onto rank 0 (collective), which writes `path` (atomically). Synchronous on
    purpose: a writer thread alive while a loader forks its workers can deadlock a worker."""
    aum.reduce()
    if rank == 0:
        _write_parquet(margins_frame(aum, keys, labels), path)


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def threshold_samples(num_samples: int, num_classes: int, seed: int, part: int | None = None) -> np.ndarray:
    """Seeded 1/(C+1) of the sample ids (N // (C+1) of them), to be relabelled to the extra fake class C.

    With `part` 0 or 1 (`--aum-threshold-part`) they are drawn from one half of the ids only: the
    halves are a permutation of the ids that depends on N alone, not on `seed`, split in two. Two
    runs with parts 0 and 1 thus always have disjoint threshold sets, whatever their seeds, and
    `wvdata aum` judges each sample by the run(s) in which it kept its own label. Each part
    relabels the same N // (C+1) ids as a run without a part (all of its half if that is smaller).
    """
    n = num_samples // (num_classes + 1)
    if part is None:
        rng = np.random.default_rng([seed, 0xA0B])
        return np.sort(rng.choice(num_samples, n, replace=False))
    if part not in (0, 1):
        raise ValueError(f"threshold part must be 0 or 1, got {part}")
    halves = np.array_split(np.random.default_rng([0xA0B, 2, num_samples]).permutation(num_samples), 2)
    pool = halves[part]
    rng = np.random.default_rng([seed, 0xA0B, 3, part])
    return np.sort(rng.choice(pool, min(n, len(pool)), replace=False))
