"""BEiT-style ViT student: timm's `Beit` with a learnable mask token.

Each block has its own relative position bias table and layer scale, and an absolute position
embedding is added as well (BEiT's pre-training setup). The mask token replaces the patch
embedding of every masked patch before the class token and the position embedding are added,
so a masked patch keeps its position.
"""

import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch.utils.checkpoint import checkpoint

from pipeline.students.registry import Student, StudentSpec


class VitStudent(Student, Beit):
    """ViT student. Its state dict is timm `Beit`'s (without a classifier) plus `mask_token`."""

    def __init__(self, spec: StudentSpec, img_size: int = 224) -> None:
        super().__init__(**beit_kwargs(spec, img_size), drop_path_rate=spec.drop_path_rate)
        self.mask_token = torch.nn.Parameter(torch.empty(1, 1, spec.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

        self.spec = spec
        self.img_size = img_size
        self.target_patch_size = spec.patch_size
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.out_dim = spec.embed_dim
        self.out_stride_ratio = 1

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode `images` [B, 3, H, W], masking where `mask` [B, Gh, Gw] is True.

        Returns the final-norm tokens [B, 1 + Gh * Gw, D]: the class token, then the patches in
        row-major order.
        """
        self.check_inputs(images, mask)
        x = self.patch_embed(images)  # [B, L, D]
        if mask is not None:
            x = torch.where(mask.flatten(1).unsqueeze(-1), self.mask_token.to(x.dtype), x)

        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)

        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the class token, mask token, position embedding and relative position tables."""
        return super().no_weight_decay() | {"mask_token"}


def beit_kwargs(spec: StudentSpec, img_size: int) -> dict:
    """Return the timm `Beit` keyword arguments for `spec` without a classifier or drop path.

    `global_pool="token"` keeps the final LayerNorm as `norm` over all tokens, the same key and
    function as in timm's `VisionTransformer`.
    """
    return {
        "img_size": img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
        "qkv_bias": True,
        "init_values": spec.layer_scale_init,
        "use_abs_pos_emb": True,
        "use_rel_pos_bias": True,
        "use_shared_rel_pos_bias": False,
        "num_classes": 0,
        "global_pool": "token",
    }
