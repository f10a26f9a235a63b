"""Prediction heads: student features [B, N, C] to target predictions [B, Gh * Gw, target_dim].

The head drops the student's prefix tokens (the ViT class token) and returns one prediction per
target-grid cell in row-major order, the order of `mask.flatten(1)`. When an output token covers
r x r target cells (`out_stride_ratio` r > 1, Swin), the head predicts r * r * target_dim values
per token and rearranges them onto the target grid like a pixel shuffle.
"""

from typing import Literal

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.errors import UsageError
from pipeline.students import Student

HEAD_KINDS = ("fc", "vit")


class Head(nn.Module):
    """Base of the prediction heads: token layout bookkeeping shared by every kind."""

    def __init__(self, student: Student, target_dim: int) -> None:
        super().__init__()
        self.target_dim = target_dim
        self.num_prefix_tokens = student.num_prefix_tokens
        self.out_grid_size = student.out_grid_size
        self.out_stride_ratio = student.out_stride_ratio
        self.num_tokens = self.num_prefix_tokens + self.out_grid_size[0] * self.out_grid_size[1]
        self.num_outputs = self.out_stride_ratio**2 * target_dim

    def check_features(self, features: torch.Tensor) -> None:
        """Raise ValueError unless `features` has the student's token count."""
        if features.ndim != 3 or features.shape[1] != self.num_tokens:
            raise ValueError(f"features must be [B, {self.num_tokens}, C], got {list(features.shape)}")

    def to_target_grid(self, predictions: torch.Tensor) -> torch.Tensor:
        """Drop the prefix tokens of `predictions` [B, N, r * r * D] and return [B, Gh * Gw, D]."""
        tokens = predictions[:, self.num_prefix_tokens:]
        return tokens_to_target_grid(tokens, self.out_grid_size, self.out_stride_ratio)


def tokens_to_target_grid(tokens: torch.Tensor, out_grid_size: tuple[int, int], ratio: int) -> torch.Tensor:
    """Rearrange `tokens` [B, h * w, r * r * D] into target cells [B, (h * r) * (w * r), D].

    The channels of a token are ordered (row in the token, column in the token, D), so channel
    block (i, j) is the target cell at row h_index * r + i and column w_index * r + j.
    """
    batch_size = tokens.shape[0]
    height, width = out_grid_size
    dim = tokens.shape[-1] // (ratio * ratio)

    cells = tokens.reshape(batch_size, height, width, ratio, ratio, dim)
    cells = cells.permute(0, 1, 3, 2, 4, 5)  # [B, h, r, w, r, D]
    return cells.reshape(batch_size, height * ratio * width * ratio, dim)


class FcHead(Head):
    """LayerNorm and a linear projection per output token."""

    def __init__(self, student: Student, target_dim: int) -> None:
        super().__init__(student, target_dim)
        self.norm = nn.LayerNorm(student.out_dim, eps=1e-6)
        self.proj = nn.Linear(student.out_dim, self.num_outputs)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Predict targets [B, Gh * Gw, target_dim] from student features [B, N, C]."""
        self.check_features(features)
        return self.to_target_grid(self.proj(self.norm(features)))


class VitHead(Head):
    """A small transformer decoder: embed to its own width, add a position embedding, run timm
    `Block`s, then LayerNorm and a linear projection (as in MAE's decoder, without mask tokens
    because the student already saw them)."""

    def __init__(
            self,
            student: Student,
            target_dim: int,
            *,
            depth: int = 2,
            width: int = 384,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(student, target_dim)
        if width % num_heads:
            raise UsageError(f"head width {width} is not divisible by head num_heads {num_heads}")

        self.embed = nn.Linear(student.out_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.blocks = nn.Sequential(*[
            Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, self.num_outputs)

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Predict targets [B, Gh * Gw, target_dim] from student features [B, N, C]."""
        self.check_features(features)
        x = self.embed(features) + self.pos_embed
        x = self.blocks(x)
        return self.to_target_grid(self.proj(self.norm(x)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Name of the decoder position embedding."""
        return {"pos_embed"}


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_head(
        kind: Literal["fc", "vit"],
        student: Student,
        target_dim: int,
        *,
        depth: int = 2,
        width: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
) -> Head:
    """Build a head that maps `student` features to `target_dim` targets per target-grid cell.

    `depth`, `width`, `num_heads` and `mlp_ratio` size the "vit" decoder; the "fc" head ignores
    them. Raises UsageError for an unknown `kind`.
    """
    if target_dim <= 0:
        raise UsageError(f"target_dim must be positive, got {target_dim}")
    if kind == "fc":
        return FcHead(student, target_dim)
    if kind == "vit":
        return VitHead(student, target_dim, depth=depth, width=width, num_heads=num_heads, mlp_ratio=mlp_ratio)
    raise UsageError(f"unknown head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")
