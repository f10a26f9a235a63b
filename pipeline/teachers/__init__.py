"""Frozen teachers that produce the per-patch targets of masked distillation.

`build_teacher` is the entry point: the CLIP teachers come from open_clip (see
`pipeline.teachers.clip` for the target definition) and `pixel` returns the student's own
patch pixels (see `pipeline.teachers.pixel`).
"""

from __future__ import annotations

import logging

import torch

from pipeline.teachers.clip import OVERRIDE_KEYS, ClipTeacher, build_clip_teacher
from pipeline.teachers.pixel import PixelTeacher, build_pixel_teacher, patchify, unpatchify
from pipeline.teachers.registry import (
    PIXEL_TEACHER,
    TEACHERS,
    Teacher,
    TeacherSpec,
    get_teacher_spec,
    teacher_input_size,
)
from pipeline.teachers.weights import RANDOM_WEIGHTS, WeightsInfo

logger = logging.getLogger(__name__)

__all__ = [
    "OVERRIDE_KEYS",
    "PIXEL_TEACHER",
    "RANDOM_WEIGHTS",
    "TEACHERS",
    "ClipTeacher",
    "PixelTeacher",
    "Teacher",
    "TeacherSpec",
    "WeightsInfo",
    "build_teacher",
    "get_teacher_spec",
    "patchify",
    "teacher_input_size",
    "unpatchify",
]


def build_teacher(
    name: str,
    weights: str | None = None,
    *,
    student_img_size: int = 224,
    student_patch_size: int = 16,
    device: str | torch.device = "cpu",
    overrides: dict | None = None,
) -> Teacher:
    """Build the frozen teacher `name` with the student's patch grid, on `device`.

    weights: None loads the published tag of the teacher, from the Hugging Face cache or
    downloaded. "random" initializes randomly from a fixed seed, the same weights in every
    process and run, and logs a warning, because the targets are then not CLIP features. Any other value is the path of a local open_clip checkpoint. The SHA-256
    of the loaded checkpoint is recorded in `teacher.weights`.

    overrides: for tests, a tiny image tower built by the same open_clip code; the keys are
    OVERRIDE_KEYS ("width", "layers", "heads", "patch_size", "mlp_ratio", "embed_dim").

    Raises UsageError for an unknown name, a missing or unfitting checkpoint, or a student
    image size that is not a multiple of its patch size, and WeightsUnavailableError when
    the published weights cannot be fetched.
    """
    spec = get_teacher_spec(name)

    if spec.open_clip_model is None:
        build = build_pixel_teacher
    else:
        build = build_clip_teacher
    teacher = build(
        spec,
        weights,
        student_img_size=student_img_size,
        student_patch_size=student_patch_size,
        device=device,
        overrides=overrides,
    )

    logger.info(
        "teacher %s: weights %s (sha256 %s), input %d px, grid %dx%d, target dim %d, activation %s",
        name, teacher.weights.source, teacher.weights.sha256, teacher.input_size,
        *teacher.grid_size, teacher.target_dim, teacher.activation,
    )
    return teacher
