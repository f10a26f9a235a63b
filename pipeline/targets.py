"""Target normalization: what the student regresses at masked patches.

MaskDistill regresses teacher features after a LayerNorm without affine parameters, applied per
patch over the feature dimension. The trainer applies it to decoded targets, and the fidelity
report applies it before comparing decoded targets with exact ones.
"""

from enum import Enum

import torch
import torch.nn.functional as F

from pipeline.errors import UsageError

TARGET_NORM_EPS = 1e-6


class TargetNorm(str, Enum):
    """Normalization applied to each target patch before the loss."""

    LAYERNORM = "layernorm"
    NONE = "none"


def parse_target_norm(value: "str | TargetNorm") -> TargetNorm:
    """Convert a config or command-line string to a TargetNorm, raising UsageError if invalid."""
    try:
        return TargetNorm(value)
    except ValueError:
        valid = ", ".join(norm.value for norm in TargetNorm)
        raise UsageError(f"invalid target norm {value!r}: use one of {valid}") from None


def normalize_targets(targets: torch.Tensor) -> torch.Tensor:
    """Apply LayerNorm without affine parameters over the feature dimension.

    Args:
        targets: teacher features [B, L, D] of any float dtype.

    Returns:
        float32 tensor [B, L, D] with zero mean and unit variance over D for each patch.
    """
    targets = targets.float()
    return F.layer_norm(targets, targets.shape[-1:], eps=TARGET_NORM_EPS)


def apply_target_norm(targets: torch.Tensor, norm: "str | TargetNorm") -> torch.Tensor:
    """Apply `norm` to targets [B, L, D] and return float32 [B, L, D]."""
    norm = parse_target_norm(norm)
    if norm is TargetNorm.LAYERNORM:
        return normalize_targets(targets)

    return targets.float()
