"""AUM bookkeeping on the device: per-sample margins summed by sample id, no host sync.

The margin of a sample is the logit of the label it is trained on minus the largest other
logit (Pleiss et al., "Identifying Mislabeled Data using the Area Under the Margin Ranking").
"""
from __future__ import annotations

import numpy as np
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
        """Sum over ranks (once per epoch)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sum)
            torch.distributed.all_reduce(self.count)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids seen, mean margin, visits) on the host."""
        count = self.count.cpu().numpy()
        seen = np.flatnonzero(count)
        mean = (self.sum.cpu().numpy()[seen] / count[seen]).astype(np.float32)
        return seen, mean, count[seen]

    def reset(self) -> None:
        self.sum.zero_()
        self.count.zero_()


def threshold_samples(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Seeded 1/(C+1) of the sample ids, to be relabelled to the extra fake class C."""
    rng = np.random.default_rng([seed, 0xA0B])
    return np.sort(rng.choice(num_samples, num_samples // (num_classes + 1), replace=False))
