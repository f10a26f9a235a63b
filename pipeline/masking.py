"""Block-wise masking in the style of BEiT.

Masks live on the target grid, shape [Gh, Gw] (or [B, Gh, Gw]), with True = masked: the patch
is replaced by the student's mask token and its target is predicted. Each mask has its own
random generator, seeded by (seed, epoch, image index). So the cached and the online trainer,
any process count and a resumed run draw the same mask for the same sample, and each epoch
draws a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UsageError

MASK_STREAM = 0x4D41534B  # separates mask seeds from view-parameter seeds
MAX_TRIES = 10


@dataclass(frozen=True)
class MaskConfig:
    """Block-wise masking settings on a [grid_h, grid_w] target grid."""

    grid_h: int
    grid_w: int
    ratio: float = 0.4
    min_block: int = 16
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--mask-ratio must lie strictly between 0 and 1, got {self.ratio}")
        if self.min_block < 1:
            raise UsageError(f"the minimum mask block must be at least 1 patch, got {self.min_block}")

    @property
    def num_masked(self) -> int:
        """Number of masked patches per image: round(ratio x patches), at least 1."""
        return max(1, int(round(self.ratio * self.grid_h * self.grid_w)))


def mask_rng(seed: int, epoch: int, image_index: int) -> np.random.Generator:
    """Return the generator that draws the mask of one sample in one epoch."""
    sequence = np.random.SeedSequence([seed, MASK_STREAM, epoch + 1, image_index])
    return np.random.default_rng(sequence)


def block_mask(config: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw one block-wise mask with exactly `config.num_masked` masked patches.

    Rectangular blocks of at least `min_block` patches (aspect ratio between min_aspect and
    1/min_aspect) are placed until the count is reached. When the patches still missing are
    fewer than `min_block`, smaller blocks fill the rest, so the ratio is exact.

    Returns:
        bool array [grid_h, grid_w], True = masked.
    """
    mask = np.zeros((config.grid_h, config.grid_w), dtype=bool)
    target = config.num_masked
    log_aspect = (math.log(config.min_aspect), math.log(1.0 / config.min_aspect))

    count = 0
    while count < target:
        remaining = target - count
        min_area = min(config.min_block, remaining)
        added = _place_block(mask, rng, min_area, remaining, log_aspect)
        if added == 0:
            added = _mask_random_patches(mask, rng, min(min_area, remaining))
        count += added
    return mask


def _place_block(mask, rng, min_area, max_area, log_aspect) -> int:
    """Try to mask one rectangle; return how many new patches it masked (0 if no try fit)."""
    grid_h, grid_w = mask.shape
    for _ in range(MAX_TRIES):
        area = rng.uniform(min_area, max_area)
        aspect = math.exp(rng.uniform(*log_aspect))
        height = int(round(math.sqrt(area * aspect)))
        width = int(round(math.sqrt(area / aspect)))
        if not (1 <= height <= grid_h and 1 <= width <= grid_w):
            continue

        top = int(rng.integers(0, grid_h - height + 1))
        left = int(rng.integers(0, grid_w - width + 1))
        window = mask[top : top + height, left : left + width]
        new = int(window.size - window.sum())
        if 0 < new <= max_area:
            window[...] = True
            return new
    return 0


def _mask_random_patches(mask: np.ndarray, rng: np.random.Generator, count: int) -> int:
    free = np.flatnonzero(~mask.reshape(-1))
    chosen = rng.choice(free, size=min(count, free.size), replace=False)
    mask.reshape(-1)[chosen] = True
    return int(chosen.size)


def sample_masks(config: MaskConfig, seed: int, epoch: int, image_indices) -> np.ndarray:
    """Draw the masks of a batch of samples.

    Returns:
        bool array [B, grid_h, grid_w], True = masked.
    """
    masks = [block_mask(config, mask_rng(seed, epoch, int(index))) for index in image_indices]
    return np.stack(masks)
