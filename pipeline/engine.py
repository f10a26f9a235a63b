"""The MaskDistill model (student plus head) and one optimization step.

The cached and the online trainer share this code: they differ only in where the targets of a
batch come from, the cache or a forward pass of the frozen teacher.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from pipeline.errors import UsageError
from pipeline.losses import masked_distill_loss
from pipeline.targets import normalize_targets


class TrainingDivergedError(RuntimeError):
    """Training produced NaN or infinite values; the run stops and keeps its last good checkpoint."""


class NonFiniteLossError(TrainingDivergedError):
    """The loss or gradient norm of a step became NaN or infinite; the step was not applied.

    `step` is the 1-based number of the failed step, as the training log counts steps.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class MaskDistillModel(nn.Module):
    """Student backbone followed by the prediction head."""

    def __init__(self, student: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.head = head

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predict targets.

        Args:
            images: [B, 3, H, W] student views, normalized.
            mask: [B, Gh, Gw] bool, True = masked.
        Returns:
            [B, Gh * Gw, D] predictions for every patch (the loss keeps the masked ones).
        """
        return self.head(self.student(images, mask))


@dataclass(frozen=True)
class StepSettings:
    loss: str
    smooth_l1_beta: float
    target_norm: str
    clip_grad: float | None
    autocast_dtype: torch.dtype | None


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] student views to float, normalized with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def prepare_targets(targets: torch.Tensor, target_norm: str) -> torch.Tensor:
    """[B, L, D] raw teacher targets to the values the student regresses."""
    if target_norm == "layernorm":
        return normalize_targets(targets.float())
    return targets.float()


PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype of `--precision` on `device`, None for float32.

    "auto" is bf16 on CUDA and float32 elsewhere, because bf16 ran slower than float32 on the
    CPUs we measured (without AMX). Weights, optimizer state and the loss stay float32 in every case.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"invalid --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    settings: StepSettings,
) -> torch.Tensor:
    """Loss of one batch; `targets` are already prepared, [B, L, D]."""
    with autocast_context(images.device, settings.autocast_dtype):
        prediction = model(images, mask)
    return masked_distill_loss(
        prediction, targets, mask.flatten(1), kind=settings.loss, beta=settings.smooth_l1_beta
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    settings: StepSettings,
    step: int,
) -> tuple[float, float]:
    """Run forward, backward and the optimizer update; return (loss, gradient norm).

    `step` is the number of steps already taken. Under DDP the finiteness of the local loss is
    all-reduced with the gradient norm, so every rank raises at the same step instead of leaving
    the others waiting in a collective. Raises NonFiniteLossError before the optimizer update.
    """
    loss = compute_loss(model, images, targets, mask, settings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()

    parameters = [p for p in model.parameters() if p.grad is not None]
    if settings.clip_grad is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.clip_grad).item()
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in parameters])).item()
    loss_value = loss.item()
    finite = _all_ranks_finite(math.isfinite(grad_norm) and math.isfinite(loss_value), loss.device)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1} (loss {loss_value}, gradient norm {grad_norm}); "
            "the weights were not updated",
            step + 1,
        )

    optimizer.step()
    return loss_value, grad_norm


def _all_ranks_finite(local: bool, device: torch.device) -> bool:
    """True when `local` is True on every rank (a plain bool outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0
