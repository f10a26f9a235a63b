"""AdamW with weight-decay groups and a cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate: linear warmup from 0, then cosine decay to `min_lr`."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict]:
    """Split trainable parameters into a decayed group and a group without weight decay.

    Norm weights, biases (every parameter with ndim <= 1) and the names in `no_decay_names`
    (tokens, position embeddings, relative position tables) get no weight decay.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name in no_decay_names or name.endswith(".bias"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices where torch's fused AdamW kernel is used. On the 2-core Xeon of docs/benchmarks.md it
# updated 14M parameters about 50 times faster than torch's default per-tensor loop.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    no_decay_names: set[str],
    fused: bool = False,
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, no_decay_names)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def fused_adamw_available(device: torch.device) -> bool:
    """Return whether `build_optimizer(..., fused=True)` runs on `device`."""
    return device.type in FUSED_ADAMW_DEVICES


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
