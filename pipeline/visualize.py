"""Pictures of cached samples: targets as PCA colors, masks drawn over views, a grid of both.

Teacher features are shown the usual way: the first three principal components of the patch
features, fitted jointly over all the views shown, each scaled to [0, 1] and used as R, G and B.
Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline.errors import UsageError
from pipeline.targets import normalize_targets

PCA_COMPONENTS = 3
# Percentiles that map to 0 and 1 per component, so that a few extreme patches do not wash out
# the colors of the rest.
COLOR_PERCENTILES = (1.0, 99.0)
MASK_GRAY = 128
MASK_KEEP = 0.25  # share of the original pixel kept in a masked patch
PANEL_INCHES = 1.8


@dataclass
class ViewPanel:
    """One sample to draw: its view, its targets as colors and its mask.

    `view` is uint8 [H, W, 3], `targets_rgb` float [Gh, Gw, 3] in [0, 1] and `mask` bool
    [Gh, Gw] with True = masked. `title` names the sample.
    """

    view: np.ndarray
    targets_rgb: np.ndarray
    mask: np.ndarray
    title: str


def pca_colors(targets: np.ndarray, grid: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """Map patch features to RGB through their first three principal components.

    Args:
        targets: float [N, L, D] with L = grid[0] * grid[1] patches, row-major.
        grid: (Gh, Gw) patch grid.
        normalize: apply the trainer's per-patch LayerNorm first, so the colors show what the
            student regresses.

    Returns:
        float32 [N, Gh, Gw, 3] in [0, 1]. The components are fitted jointly over all N views,
        so equal colors mean similar features across views.
    """
    num_views, num_patches, dim = targets.shape
    if num_patches != grid[0] * grid[1]:
        raise ValueError(f"targets have {num_patches} patches, but grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]}")

    features = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    if normalize:
        features = normalize_targets(features)
    patches = features.reshape(-1, dim).double().numpy()

    projected = _principal_projection(patches, PCA_COMPONENTS)
    colors = np.stack([_to_unit_range(projected[:, i]) for i in range(PCA_COMPONENTS)], axis=-1)
    return colors.reshape(num_views, grid[0], grid[1], PCA_COMPONENTS).astype(np.float32)


def _principal_projection(patches: np.ndarray, count: int) -> np.ndarray:
    """Return the projection [M, count] of patches [M, D] on their first `count` principal components.

    Components beyond the rank of the data are zero columns.
    """
    centered = patches - patches.mean(axis=0)
    _, _, right_vectors = np.linalg.svd(centered, full_matrices=False)
    components = right_vectors[:count]

    # SVD signs are arbitrary. Fixing them gives the same features the same colors on every call.
    largest = np.argmax(np.abs(components), axis=1)
    components = components * np.sign(components[np.arange(len(components)), largest])[:, None]

    projected = centered @ components.T
    if projected.shape[1] < count:
        projected = np.pad(projected, ((0, 0), (0, count - projected.shape[1])))
    return projected


def _to_unit_range(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, COLOR_PERCENTILES)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return np.full_like(values, 0.5)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def upsample_grid(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample a per-patch map [Gh, Gw, ...] to pixels [H, W, ...] by nearest neighbor."""
    grid_h, grid_w = values.shape[:2]
    height, width = size
    rows = np.arange(height) * grid_h // height
    cols = np.arange(width) * grid_w // width
    return values[rows][:, cols]


def draw_mask(view: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gray out the masked patches of a view: the patches whose targets the student predicts.

    Args:
        view: uint8 [H, W, 3].
        mask: bool [Gh, Gw], True = masked.

    Returns:
        uint8 [H, W, 3]; masked patches keep a faint trace of the image so the content stays
        recognizable.
    """
    pixels = upsample_grid(mask, view.shape[:2])[..., None]
    grayed = MASK_KEEP * view.astype(np.float32) + (1.0 - MASK_KEEP) * MASK_GRAY
    return np.where(pixels, grayed, view).round().astype(np.uint8)


def save_view_grid(panels: list[ViewPanel], output: Path, title: str = "") -> Path:
    """Draw each sample as three panels (view, masked view, targets PCA) and save the figure.

    The samples fill a grid of about twice as many rows as sample columns, so the figure stays
    roughly square. Returns `output`.
    """
    if not panels:
        raise ValueError("save_view_grid needs at least one panel")
    output = Path(output)
    check_figure_suffix(output)

    per_row = max(1, round(math.sqrt(len(panels) / 2)))
    rows = math.ceil(len(panels) / per_row)
    figure = Figure(figsize=(3 * per_row * PANEL_INCHES, rows * (PANEL_INCHES + 0.35) + 0.6))
    axes = figure.subplots(rows, 3 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    for number, panel in enumerate(panels):
        row, first = divmod(number, per_row)
        cell = axes[row, 3 * first : 3 * first + 3]
        size = panel.view.shape[:2]
        cell[0].imshow(panel.view)
        cell[0].set_title(panel.title, fontsize=7, loc="left")
        cell[1].imshow(draw_mask(panel.view, panel.mask))
        cell[1].set_title(f"mask {panel.mask.mean():.0%}", fontsize=7)
        cell[2].imshow(upsample_grid(panel.targets_rgb, size))
        cell[2].set_title("targets, PCA", fontsize=7)

    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def check_figure_suffix(output: Path) -> None:
    """Raise UsageError unless matplotlib can write a file with `output`'s suffix."""
    supported = Figure().canvas.get_supported_filetypes()
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UsageError(
            f"cannot write a figure to {output}: use one of the suffixes {', '.join('.' + s for s in sorted(supported))}"
        )


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a stored student view to uint8 RGB [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
