"""Student encoders: BEiT-style ViTs and Swin transformers with a mask token, built on timm.

Every student maps images [B, 3, H, W] and a block mask on the target grid [B, Gh, Gw]
(True = masked) to features [B, N, out_dim]; see `Student` for the attributes the trainer and
the heads read.
"""

from typing import Any

from pipeline.students.registry import STUDENTS, Student, StudentSpec, resolve_spec, validate_img_size
from pipeline.students.swin import SwinStudent
from pipeline.students.vit import VitStudent

__all__ = ["STUDENTS", "Student", "StudentSpec", "SwinStudent", "VitStudent", "build_student"]


def build_student(
        name: str,
        img_size: int = 224,
        *,
        drop_path_rate: float | None = None,
        overrides: dict[str, Any] | None = None,
) -> Student:
    """Build the student `name` for square images of `img_size` pixels.

    `drop_path_rate` replaces the registry's default. `overrides` changes the architecture with
    the same code, e.g. `{"embed_dim": 64, "depth": 2, "num_heads": 2}` for a tiny ViT or
    `{"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}` for a tiny Swin.
    Valid keys: embed_dim, depth (depths for swin), num_heads, mlp_ratio, layer_scale_init (vit),
    window_size (swin). Raises UsageError for an unknown name or key, or an `img_size` that is not
    a multiple of the student's output stride.
    """
    spec = resolve_spec(name, drop_path_rate=drop_path_rate, overrides=overrides)
    validate_img_size(spec, img_size)
    if spec.family == "vit":
        return VitStudent(spec, img_size)
    return SwinStudent(spec, img_size)
