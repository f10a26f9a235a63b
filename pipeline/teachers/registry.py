"""Teacher specs, the registry of teacher names, and the interface every teacher implements.

A teacher is frozen. It takes a view as [0, 1] pixels, normalizes it with its own mean and std,
and returns one target vector per patch, on the same patch grid as the student.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from open_clip.constants import INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from pipeline.errors import UsageError
from pipeline.teachers.weights import WeightsInfo


PIXEL_TEACHER = "pixel"


@dataclass(frozen=True)
class TeacherSpec:
    """Static description of a teacher: the open_clip architecture, its weights and its input.

    `open_clip_model` and `pretrained_tag` are None for the pixel teacher. Its patch size is the
    student's, so its `patch_size` and `width` here are only the defaults for a /16 student.
    `width` is the dimension D of the targets, which is 3 * p * p for the pixel teacher.
    """

    name: str
    open_clip_model: str | None
    pretrained_tag: str | None
    patch_size: int
    width: int
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_SPECS = (
    # OpenAI weights were trained with QuickGELU, x * sigmoid(1.702 x), not the exact GELU.
    TeacherSpec(
        "clip_vit_base_patch32", "ViT-B-32", "openai", 32, 768, True,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    TeacherSpec(
        "clip_vit_base_patch16", "ViT-B-16", "openai", 16, 768, True,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    TeacherSpec(
        "clip_vit_large_patch14", "ViT-L-14", "openai", 14, 1024, True,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    TeacherSpec(
        "openclip_vit_base_patch32", "ViT-B-32", "laion2b_s34b_b79k", 32, 768, False,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    # This LAION-2B checkpoint alone was trained on inputs normalized with mean = std = 0.5.
    TeacherSpec(
        "openclip_vit_large_patch14", "ViT-L-14", "laion2b_s32b_b82k", 14, 1024, False,
        INCEPTION_MEAN, INCEPTION_STD,
    ),
    TeacherSpec(
        "openclip_vit_huge_patch14", "ViT-H-14", "laion2b_s32b_b79k", 14, 1280, False,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    TeacherSpec(
        "openclip_vit_giant_patch14", "ViT-g-14", "laion2b_s34b_b88k", 14, 1408, False,
        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
    ),
    TeacherSpec(PIXEL_TEACHER, None, None, 16, 3 * 16 * 16, False, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
)

TEACHERS: dict[str, TeacherSpec] = {spec.name: spec for spec in _SPECS}


def get_teacher_spec(name: str) -> TeacherSpec:
    """Return the spec of teacher `name`, or raise UsageError listing the valid names."""
    if name not in TEACHERS:
        valid = ", ".join(sorted(TEACHERS))
        raise UsageError(f"unknown teacher {name!r}; valid teachers are: {valid}")
    return TEACHERS[name]


def teacher_input_size(spec: TeacherSpec, student_img_size: int, student_patch_size: int) -> int:
    """Compute the pixels per side that give the teacher the student's patch grid.

    grid = student_img_size // student_patch_size, and the result is grid * teacher patch size,
    for example 196 for a /14 teacher and a 224 px /16 student. The pixel teacher uses the
    student's patch size, so its input size is the student's image size.
    """
    if student_patch_size <= 0 or student_img_size <= 0:
        raise UsageError(
            f"student image size {student_img_size} and patch size {student_patch_size} must be positive"
        )
    if student_img_size % student_patch_size != 0:
        raise UsageError(
            f"student image size {student_img_size} is not a multiple of the student patch size "
            f"{student_patch_size}; choose an image size that is, for example "
            f"{student_img_size // student_patch_size * student_patch_size}"
        )

    grid = student_img_size // student_patch_size
    teacher_patch_size = student_patch_size if spec.open_clip_model is None else spec.patch_size
    return grid * teacher_patch_size


class Teacher(nn.Module, ABC):
    """Frozen network that turns [B, 3, S, S] pixels in [0, 1] into targets [B, L, D].

    S is `input_size`, L = grid_size[0] * grid_size[1] and D is `target_dim`. The module stays
    in eval mode with requires_grad False, and `train()` does not change that.
    """

    def __init__(
        self,
        spec: TeacherSpec,
        input_size: int,
        weights: WeightsInfo,
        target_layer: str,
        activation: str | None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.input_size = input_size
        self.grid_size = (input_size // spec.patch_size, input_size // spec.patch_size)
        self.target_dim = spec.width
        self.weights = weights
        self.target_layer = target_layer
        self.activation = activation
        self.mean = tuple(spec.mean)
        self.std = tuple(spec.std)

        # Non-persistent buffers move with .to(device) but stay out of the state dict.
        self.register_buffer("input_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> Teacher:
        """Switch to eval mode and turn off gradients for every parameter."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode, even when a parent module calls train()."""
        return super().train(False)

    def normalize(self, images: Tensor) -> Tensor:
        """Apply the teacher's own mean and std to [B, 3, S, S] pixels in [0, 1]."""
        return (images - self.input_mean) / self.input_std

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless `images` is a float [B, 3, S, S] batch with S = input_size.

        The [0, 1] value range is not checked, because that would synchronize with the device.
        """
        expected = f"[B, 3, {self.input_size}, {self.input_size}]"
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"teacher {self.spec.name} expects images {expected}, got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"teacher {self.spec.name} expects float pixels in [0, 1], got dtype {images.dtype}"
            )

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """Compute targets [B, L, D] float32 from un-normalized [B, 3, S, S] pixels in [0, 1]."""

    def describe(self) -> dict:
        """Return the JSON-ready fields that identify this teacher in a cache manifest."""
        return {
            "name": self.spec.name,
            "open_clip_model": self.spec.open_clip_model,
            "pretrained_tag": self.spec.pretrained_tag,
            "weights_source": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "random_weights": self.weights.is_random,
            "input_size": self.input_size,
            "patch_size": self.spec.patch_size,
            "grid_size": list(self.grid_size),
            "target_dim": self.target_dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "activation": self.activation,
            "target_layer": self.target_layer,
        }
