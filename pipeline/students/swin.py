"""Swin student: timm's `SwinTransformer` with a learnable mask token after the patch embedding.

The mask arrives on the 16 px target grid. Each target cell covers (16 / 4)^2 Swin patches, so the
mask is upsampled to the 4 px patch grid and the mask token replaces every patch of a masked cell.
"""

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer

from pipeline.students.registry import Student, StudentSpec


class SwinStudent(Student, SwinTransformer):
    """Swin student. Its state dict is timm `SwinTransformer`'s (without a classifier) plus `mask_token`."""

    def __init__(self, spec: StudentSpec, img_size: int = 224) -> None:
        super().__init__(**swin_kwargs(spec, img_size), drop_path_rate=spec.drop_path_rate)
        self.mask_token = torch.nn.Parameter(torch.empty(1, 1, spec.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

        self.spec = spec
        self.img_size = img_size
        self.target_patch_size = spec.target_patch_size
        self.grid_size = (img_size // spec.target_patch_size, img_size // spec.target_patch_size)
        self.num_prefix_tokens = 0
        self.out_dim = self.num_features
        self.out_stride_ratio = spec.out_stride // spec.target_patch_size

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode `images` [B, 3, H, W], masking the target cells where `mask` [B, Gh, Gw] is True.

        Returns the final-norm tokens [B, h * w, C] of the last stage in row-major order, with
        (h, w) = `out_grid_size`.
        """
        self.check_inputs(images, mask)
        x = self.patch_embed(images)  # [B, Hp, Wp, C], NHWC
        if mask is not None:
            patch_mask = upsample_mask(mask, self.target_patch_size // self.spec.patch_size)
            x = torch.where(patch_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)

        x = self.layers(x)
        x = self.norm(x)  # [B, h, w, C]
        return x.flatten(1, 2)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the mask token and the relative position bias tables."""
        return super().no_weight_decay() | {"mask_token"}


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each cell of `mask` [B, Gh, Gw] into a factor x factor block: [B, Gh * factor, Gw * factor]."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def swin_kwargs(spec: StudentSpec, img_size: int) -> dict:
    """Return the timm `SwinTransformer` keyword arguments for `spec` without a classifier or drop path."""
    return {
        "img_size": img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depths": spec.depth,
        "num_heads": spec.num_heads,
        "window_size": spec.window_size,
        "mlp_ratio": spec.mlp_ratio,
        "num_classes": 0,
    }
