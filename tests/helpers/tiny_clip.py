"""Tiny open_clip CLIP checkpoints for tests, built by the real open_clip code.

Typical use, with `tests/` on sys.path as pytest sets it:

    from helpers.tiny_clip import tiny_overrides, write_tiny_clip_checkpoint

    path = write_tiny_clip_checkpoint(tmp_path / "tiny.pt", image_size=64)
    teacher = build_teacher("clip_vit_base_patch16", weights=str(path),
                            student_img_size=64, overrides=tiny_overrides())

The checkpoint is the state dict of a whole open_clip CLIP model (image and text tower), saved
with torch.save, so it has the same keys as a published one. Pass the same overrides and
quick_gelu to the checkpoint and to build_teacher. The quick_gelu of the teacher comes from its
registry spec: True for the clip_* teachers (OpenAI weights), False for the openclip_* ones.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from pipeline.teachers.clip import clip_vision_config

# A text tower just large enough to be a valid open_clip CLIP model; the teachers never use it.
TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def tiny_overrides(
    patch_size: int = 16,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 32,
) -> dict:
    """Return `build_teacher` overrides for a tiny image tower."""
    return {
        "patch_size": patch_size,
        "width": width,
        "layers": layers,
        "heads": heads,
        "embed_dim": embed_dim,
    }


def build_tiny_clip(
    model_name: str = "ViT-B-16",
    *,
    image_size: int = 64,
    quick_gelu: bool = True,
    overrides: dict | None = None,
    seed: int = 0,
) -> open_clip.CLIP:
    """Build a randomly initialized open_clip CLIP model with a tiny image and text tower.

    `overrides` defaults to `tiny_overrides()`; `image_size` sets the checkpoint's patch grid.
    """
    embed_dim, vision_cfg = clip_vision_config(model_name, overrides or tiny_overrides())
    vision_cfg["image_size"] = image_size

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=vision_cfg,
        text_cfg=dict(TINY_TEXT_CFG),
        quick_gelu=quick_gelu,
    )


def write_tiny_clip_checkpoint(
    path: str | Path,
    model_name: str = "ViT-B-16",
    *,
    image_size: int = 64,
    quick_gelu: bool = True,
    overrides: dict | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Save the state dict of `build_tiny_clip(...)` to `path` with torch.save, cast to `dtype`."""
    model = build_tiny_clip(
        model_name, image_size=image_size, quick_gelu=quick_gelu, overrides=overrides, seed=seed
    )
    state_dict = {key: value.to(dtype) for key, value in model.state_dict().items()}

    path = Path(path)
    torch.save(state_dict, path)
    return path
