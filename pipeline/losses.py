"""Distillation loss on the masked patches only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import UsageError

LOSSES = ("smooth_l1", "l1", "l2")


def masked_distill_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 1.0,
) -> torch.Tensor:
    """Mean loss over the masked patches of a batch.

    Args:
        prediction: [B, L, D] student head output.
        target: [B, L, D] normalized teacher targets.
        mask: [B, L] bool, True = masked; only these patches count.
        kind: "smooth_l1" (with `beta`), "l1" or "l2".
    Returns:
        scalar: the per-element loss averaged over D and over all masked patches of the batch.
    """
    prediction = prediction.float()
    target = target.float()
    if kind == "smooth_l1":
        per_element = F.smooth_l1_loss(prediction, target, beta=beta, reduction="none")
    elif kind == "l1":
        per_element = (prediction - target).abs()
    elif kind == "l2":
        per_element = (prediction - target).pow(2)
    else:
        raise UsageError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSSES)}")

    per_patch = per_element.mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
