"""The pixel teacher: the targets are the student's own patch pixels, as in MAE.

The input is the student view at the student's size, [0, 1] pixels, and the targets are the raw
pixels of each patch, [B, L, 3 * p * p] with p the student's patch size. Within a patch the
values are ordered row, column, channel. Nothing is normalized here: the target normalizer
normalizes each patch later, as it does for every teacher.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from pipeline.errors import UsageError
from pipeline.teachers.registry import Teacher, TeacherSpec, teacher_input_size
from pipeline.teachers.weights import NO_WEIGHTS, WeightsInfo


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut [B, C, H, W] images into patches [B, L, p * p * C], row-major over the patch grid.

    H and W must be multiples of p. Each patch is flattened in (row, column, channel) order.
    """
    batch, channels, height, width = images.shape
    if height % patch_size != 0 or width % patch_size != 0:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size

    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # [B, rows, cols, p, p, C]
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> Tensor:
    """Reassemble patches [B, L, p * p * C] from `patchify` into images [B, C, H, W]."""
    batch = patches.shape[0]
    rows, cols = grid_size

    images = patches.reshape(batch, rows, cols, patch_size, patch_size, channels)
    images = images.permute(0, 5, 1, 3, 2, 4)  # [B, C, rows, p, cols, p]
    return images.reshape(batch, channels, rows * patch_size, cols * patch_size)


class PixelTeacher(Teacher):
    """Teacher whose targets are the raw [0, 1] pixels of the student's patches."""

    def __init__(self, spec: TeacherSpec, input_size: int) -> None:
        super().__init__(
            spec,
            input_size,
            WeightsInfo(NO_WEIGHTS, None),
            target_layer="raw patch pixels in [0, 1], (row, column, channel) order within a patch",
            activation=None,
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Return the patch pixels [B, L, 3 * p * p] float32 of [B, 3, S, S] views in [0, 1]."""
        self.check_images(images)
        return patchify(images, self.spec.patch_size).float()


def build_pixel_teacher(
    spec: TeacherSpec,
    weights: str | None,
    *,
    student_img_size: int,
    student_patch_size: int,
    device: str | torch.device,
    overrides: dict | None,
) -> PixelTeacher:
    """Build the pixel teacher for a student with the given image and patch size."""
    if weights not in (None, NO_WEIGHTS):
        raise UsageError(
            f"the pixel teacher has no weights, but weights {weights!r} were given; drop --teacher-weights"
        )
    if overrides:
        raise UsageError(f"the pixel teacher takes no overrides, got {sorted(overrides)}")

    spec = replace(spec, patch_size=student_patch_size, width=3 * student_patch_size * student_patch_size)
    input_size = teacher_input_size(spec, student_img_size, student_patch_size)
    return PixelTeacher(spec, input_size).to(device).freeze()
