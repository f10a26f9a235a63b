"""Student names, their sizes, and the interface every student implements.

Default regularisation per size. Stochastic depth (drop path) grows with model size. Layer scale
starts at 0.1 up to base size and at 1e-5 for large and huge, where near-zero residual branches
keep early training stable:

| name               | embed_dim | depth         | num_heads       | drop path | layer scale init |
|--------------------|-----------|---------------|-----------------|-----------|------------------|
| vit_tiny_patch16   | 192       | 12            | 3               | 0.0       | 0.1              |
| vit_small_patch16  | 384       | 12            | 6               | 0.1       | 0.1              |
| vit_base_patch16   | 768       | 12            | 12              | 0.1       | 0.1              |
| vit_large_patch16  | 1024      | 24            | 16              | 0.2       | 1e-5             |
| vit_huge_patch14   | 1280      | 32            | 16              | 0.3       | 1e-5             |
| swin_tiny_patch4   | 96        | (2, 2, 6, 2)  | (3, 6, 12, 24)  | 0.1       | none             |
| swin_small_patch4  | 96        | (2, 2, 18, 2) | (3, 6, 12, 24)  | 0.2       | none             |
| swin_base_patch4   | 128       | (2, 2, 18, 2) | (4, 8, 16, 32)  | 0.3       | none             |
| swin_large_patch4  | 192       | (2, 2, 18, 2) | (6, 12, 24, 48) | 0.3       | none             |

Swin students use window 7. Every student uses an MLP ratio of 4.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import UsageError

# Pixels per target-grid cell for Swin. Its final stride (32 at four stages) is coarser, so the
# head predicts several target cells per output token.
SWIN_TARGET_PATCH_SIZE = 16


@dataclass(frozen=True)
class StudentSpec:
    """Architecture of one student: the registry entry, possibly changed by overrides."""

    name: str
    family: Literal["vit", "swin"]
    patch_size: int
    embed_dim: int
    depth: int | tuple[int, ...]  # blocks, or blocks per stage for swin
    num_heads: int | tuple[int, ...]  # heads, or heads per stage for swin
    drop_path_rate: float
    layer_scale_init: float | None
    mlp_ratio: float = 4.0
    window_size: int | None = None  # swin only

    @property
    def target_patch_size(self) -> int:
        """Pixels per side of one target-grid cell."""
        return self.patch_size if self.family == "vit" else SWIN_TARGET_PATCH_SIZE

    @property
    def out_stride(self) -> int:
        """Pixels per side of one output token."""
        if self.family == "vit":
            return self.patch_size
        return self.patch_size * 2 ** (len(self.depth) - 1)


def _vit(name: str, patch_size: int, embed_dim: int, depth: int, num_heads: int, drop_path_rate: float,
         layer_scale_init: float) -> StudentSpec:
    return StudentSpec(name, "vit", patch_size, embed_dim, depth, num_heads, drop_path_rate, layer_scale_init)


def _swin(name: str, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
          drop_path_rate: float) -> StudentSpec:
    return StudentSpec(name, "swin", 4, embed_dim, depths, num_heads, drop_path_rate, None, window_size=7)


STUDENTS: dict[str, StudentSpec] = {
    spec.name: spec
    for spec in (
        _vit("vit_tiny_patch16", 16, 192, 12, 3, 0.0, 0.1),
        _vit("vit_small_patch16", 16, 384, 12, 6, 0.1, 0.1),
        _vit("vit_base_patch16", 16, 768, 12, 12, 0.1, 0.1),
        _vit("vit_large_patch16", 16, 1024, 24, 16, 0.2, 1e-5),
        _vit("vit_huge_patch14", 14, 1280, 32, 16, 0.3, 1e-5),
        _swin("swin_tiny_patch4", 96, (2, 2, 6, 2), (3, 6, 12, 24), 0.1),
        _swin("swin_small_patch4", 96, (2, 2, 18, 2), (3, 6, 12, 24), 0.2),
        _swin("swin_base_patch4", 128, (2, 2, 18, 2), (4, 8, 16, 32), 0.3),
        _swin("swin_large_patch4", 192, (2, 2, 18, 2), (6, 12, 24, 48), 0.3),
    )
}

# Spec fields that `overrides` may set. "depths" is timm's Swin spelling of `depth`.
OVERRIDE_KEYS = ("embed_dim", "depth", "depths", "num_heads", "layer_scale_init", "mlp_ratio", "window_size")
FAMILY_ONLY_KEYS = {"vit": {"layer_scale_init"}, "swin": {"depths", "window_size"}}


def resolve_spec(
        name: str,
        *,
        drop_path_rate: float | None = None,
        overrides: dict[str, Any] | None = None,
) -> StudentSpec:
    """Look up a student by name and apply the drop path rate and architecture overrides.

    Raises UsageError for an unknown name, an unknown override key or an inconsistent
    architecture (for example heads that do not divide the width).
    """
    if name not in STUDENTS:
        raise UsageError(f"unknown student {name!r}; valid names: {', '.join(STUDENTS)}")
    spec = STUDENTS[name]

    changes = _normalize_overrides(name, spec.family, overrides or {})
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    spec = dataclasses.replace(spec, **changes)

    _validate_spec(spec)
    return spec


def _normalize_overrides(name: str, family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise UsageError(
            f"unknown override {', '.join(map(repr, unknown))} for student {name}; "
            f"valid keys: {', '.join(OVERRIDE_KEYS)}"
        )
    other_family = "swin" if family == "vit" else "vit"
    other_family_keys = sorted(set(overrides) & FAMILY_ONLY_KEYS[other_family])
    if other_family_keys:
        raise UsageError(
            f"override {', '.join(map(repr, other_family_keys))} applies to {other_family} students, not {name}"
        )
    if "depth" in overrides and "depths" in overrides:
        raise UsageError(f"overrides for {name} set both 'depth' and 'depths'; keep one")

    changes = dict(overrides)
    if "depths" in changes:
        changes["depth"] = changes.pop("depths")

    # YAML and JSON configs give lists where Swin takes per-stage tuples.
    for key in ("depth", "num_heads"):
        if isinstance(changes.get(key), list):
            changes[key] = tuple(changes[key])
    return changes


def _validate_spec(spec: StudentSpec) -> None:
    if spec.family == "vit":
        _validate_vit_spec(spec)
    else:
        _validate_swin_spec(spec)
    if not 0.0 <= spec.drop_path_rate < 1.0:
        raise UsageError(f"drop_path_rate {spec.drop_path_rate} for {spec.name} must be in [0, 1)")


def _validate_vit_spec(spec: StudentSpec) -> None:
    if not isinstance(spec.depth, int) or not isinstance(spec.num_heads, int):
        raise UsageError(f"{spec.name}: depth and num_heads must be integers, got {spec.depth!r}, {spec.num_heads!r}")
    if spec.embed_dim % spec.num_heads:
        raise UsageError(f"{spec.name}: embed_dim {spec.embed_dim} is not divisible by num_heads {spec.num_heads}")


def _validate_swin_spec(spec: StudentSpec) -> None:
    depths, heads = spec.depth, spec.num_heads
    if not isinstance(depths, tuple) or not isinstance(heads, tuple) or len(depths) != len(heads):
        raise UsageError(
            f"{spec.name}: depths and num_heads must be sequences with one entry per stage, "
            f"got {depths!r} and {heads!r}"
        )
    for stage, stage_heads in enumerate(heads):
        stage_dim = spec.embed_dim * 2**stage
        if stage_dim % stage_heads:
            raise UsageError(f"{spec.name}: stage {stage} width {stage_dim} is not divisible by {stage_heads} heads")
    if spec.out_stride % spec.target_patch_size:
        raise UsageError(
            f"{spec.name}: {len(depths)} stages give a final stride of {spec.out_stride} px, which is not a "
            f"multiple of the {spec.target_patch_size} px target cell; use at least 3 stages"
        )


def validate_img_size(spec: StudentSpec, img_size: int) -> None:
    """Raise UsageError unless `img_size` gives a whole number of output tokens and target cells."""
    stride = max(spec.out_stride, spec.target_patch_size)
    if img_size <= 0 or img_size % stride:
        raise UsageError(
            f"img_size {img_size} is not a positive multiple of {stride} px, the output stride of {spec.name}; "
            f"pass an --img-size such as {stride * max(1, round(img_size / stride))}"
        )


class Student(nn.Module):
    """Interface shared by the ViT and Swin students, which the trainer, heads and tests rely on.

    Subclasses also provide `no_weight_decay() -> set[str]`: the names of the tokens, position
    embedding and relative position bias tables.
    """

    spec: StudentSpec
    img_size: int
    target_patch_size: int  # pixels per target-grid cell
    grid_size: tuple[int, int]  # target grid (Gh, Gw) = img_size // target_patch_size
    num_prefix_tokens: int  # 1 for vit (class token), 0 for swin
    out_dim: int  # width of the features given to the head
    out_stride_ratio: int  # target cells per output token and side

    @property
    def out_grid_size(self) -> tuple[int, int]:
        """Output-token grid (h, w) = grid_size // out_stride_ratio."""
        return (self.grid_size[0] // self.out_stride_ratio, self.grid_size[1] // self.out_stride_ratio)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode `images` [B, 3, H, W] with the patches under `mask` [B, Gh, Gw] (True = masked)
        replaced by the mask token; return [B, num_prefix_tokens + h * w, out_dim]."""
        raise NotImplementedError

    def check_inputs(self, images: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Raise ValueError when `images` or `mask` do not match this student's size and grid."""
        expected_images = (3, self.img_size, self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected_images:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected_images))}], got {list(images.shape)}")
        if mask is None:
            return

        expected_mask = (images.shape[0], *self.grid_size)
        if tuple(mask.shape) != expected_mask:
            raise ValueError(f"mask must be {list(expected_mask)} (batch, target grid), got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool with True = masked, got {mask.dtype}")
