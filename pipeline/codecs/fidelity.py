"""Fidelity of decoded targets: their agreement with exact targets after target normalization."""

import numpy as np
import torch

from pipeline.targets import TargetNorm, apply_target_norm, parse_target_norm

COSINE_PERCENTILE = 1.0


def fidelity_report(
    exact: np.ndarray,
    decoded: np.ndarray,
    bytes_per_view: float | None = None,
    norm: str | TargetNorm = TargetNorm.LAYERNORM,
) -> dict:
    """Compare decoded targets with exact ones after target normalization.

    Args:
        exact: teacher targets [N, L, D].
        decoded: the same targets after encode and decode [N, L, D].
        bytes_per_view: stored bytes per view, measured by the caller and copied into the report.
        norm: target normalization applied to both before comparing.

    Returns:
        JSON-ready dict with the mean and 1st-percentile per-patch cosine similarity, the
        relative MSE (sum of squared errors / sum of squares of normalized exact targets), the
        number of patches compared, the norm and bytes_per_view.
    """
    if exact.shape != decoded.shape or exact.ndim != 3:
        raise ValueError(
            f"exact and decoded targets must share one shape [N, L, D], got {exact.shape} and "
            f"{decoded.shape}"
        )

    norm = parse_target_norm(norm)
    exact_patches = _normalize(exact, norm)
    decoded_patches = _normalize(decoded, norm)
    cosine = _per_patch_cosine(exact_patches, decoded_patches)

    squared_error = float(np.square(exact_patches - decoded_patches).sum())
    squared_exact = float(np.square(exact_patches).sum())
    if squared_exact > 0:
        relative_mse = squared_error / squared_exact
    else:
        relative_mse = 0.0 if squared_error == 0 else float("inf")

    return {
        "norm": norm.value,
        "num_patches": int(cosine.size),
        "cosine_mean": float(cosine.mean()),
        f"cosine_p{COSINE_PERCENTILE:g}": float(np.percentile(cosine, COSINE_PERCENTILE)),
        "relative_mse": relative_mse,
        "bytes_per_view": bytes_per_view,
    }


def _normalize(targets: np.ndarray, norm: TargetNorm) -> np.ndarray:
    """Normalize targets [N, L, D] and return float64 patches [N * L, D]."""
    tensor = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    normalized = apply_target_norm(tensor, norm).numpy()
    return normalized.reshape(-1, targets.shape[-1]).astype(np.float64)


def _per_patch_cosine(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Compute the cosine similarity of each row pair [P]. Two zero rows give 1, one zero row 0."""
    dot = (exact * decoded).sum(axis=1)
    norms = np.linalg.norm(exact, axis=1) * np.linalg.norm(decoded, axis=1)
    cosine = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)

    both_zero = (np.abs(exact).sum(axis=1) == 0) & (np.abs(decoded).sum(axis=1) == 0)
    cosine[both_zero] = 1.0
    return cosine
