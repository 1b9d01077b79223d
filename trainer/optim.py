"""The optimiser's companions: no weight decay on norms and biases, a warmup + cosine schedule
by fractional epoch (so a mid-epoch resume lands on the same learning rate), and an EMA."""
from __future__ import annotations

import copy
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (every 1-d parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR as a function of fractional epoch: linear warmup, then cosine to zero."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: float, total: float) -> None:
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

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
