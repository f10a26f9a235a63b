"""CLIP teachers: open_clip image towers that return per-patch targets.

Target definition, the same for every CLIP teacher: the patch tokens output by the last
transformer block of the image tower, before the final LayerNorm `ln_post` and the projection.
The class token is not a target. For a batch of views [B, 3, S, S] the targets are [B, L, D],
with L the number of patches and D the tower width.

Only the image tower is built and loaded (the "visual." keys of an open_clip CLIP state dict).
When the checkpoint was trained at another patch grid, open_clip's `resize_pos_embed` resamples
its position embeddings to the teacher's grid (bicubic, with antialiasing).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import Tensor

from pipeline.errors import UsageError
from pipeline.teachers.registry import Teacher, TeacherSpec, teacher_input_size
from pipeline.teachers.weights import (
    RANDOM_WEIGHTS,
    WeightsInfo,
    read_visual_state_dict,
    resolve_local_weights,
    resolve_published_weights,
    sha256_file,
)

logger = logging.getLogger(__name__)

# Keys of `overrides`, applied on top of the open_clip model config. "heads" sets open_clip's
# head_width to width // heads. "embed_dim" is the output size of the tower's projection.
OVERRIDE_KEYS = ("width", "layers", "heads", "patch_size", "mlp_ratio", "embed_dim")

# Seed of `--teacher-weights random`: a killed cache-targets run resumes, and every torchrun rank
# writes its shards, with the same random teacher.
RANDOM_INIT_SEED = 0


class ClipTeacher(Teacher):
    """A frozen open_clip image tower whose targets are the last block's patch tokens."""

    def __init__(self, spec: TeacherSpec, visual: VisionTransformer, input_size: int, weights: WeightsInfo):
        last_block = len(visual.transformer.resblocks) - 1
        super().__init__(
            spec,
            input_size,
            weights,
            target_layer=(
                f"output of the last transformer block (visual.transformer.resblocks.{last_block}), "
                f"before ln_post; class token removed"
            ),
            activation=activation_name(visual),
        )
        self.visual = visual

    # no_grad, not inference_mode: inference tensors cannot be saved for backward, and the
    # online trainer feeds the targets to a loss.
    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Compute targets [B, L, D] float32 from un-normalized [B, 3, S, S] pixels in [0, 1]."""
        self.check_images(images)

        features = self.visual.forward_intermediates(
            self.normalize(images),
            indices=1,
            intermediates_only=True,
            output_fmt="NLC",
        )
        # open_clip strips the class token, and applies ln_post only with normalize_intermediates.
        return features["image_intermediates"][0].float()


def activation_name(visual: VisionTransformer) -> str:
    """Return "quick_gelu" or "gelu", the MLP activation of the tower's blocks."""
    activation = visual.transformer.resblocks[0].mlp.gelu
    return "quick_gelu" if isinstance(activation, QuickGELU) else "gelu"


def check_spec_against_open_clip(spec: TeacherSpec) -> dict:
    """Check a spec against open_clip's configs and return the pretrained config of its tag.

    Patch size and width must match the open_clip model config. quick_gelu, mean and std must
    match the pretrained config of the tag, because the weights were trained with them. A
    mismatch raises UsageError.
    """
    version = open_clip.__version__
    model_cfg = open_clip.get_model_config(spec.open_clip_model)
    if model_cfg is None:
        raise UsageError(
            f"teacher {spec.name}: open_clip {version} has no model {spec.open_clip_model!r}; "
            f"install open_clip_torch 3.x as pyproject.toml requires"
        )
    pretrained_cfg = open_clip.get_pretrained_cfg(spec.open_clip_model, spec.pretrained_tag)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.open_clip_model))
        raise UsageError(
            f"teacher {spec.name}: open_clip {version} has no pretrained tag {spec.pretrained_tag!r} "
            f"for {spec.open_clip_model} (tags: {tags}); "
            f"install open_clip_torch 3.x as pyproject.toml requires"
        )

    vision_cfg = model_cfg["vision_cfg"]
    expected = {
        "patch_size": (spec.patch_size, vision_cfg["patch_size"]),
        "width": (spec.width, vision_cfg["width"]),
        "quick_gelu": (spec.quick_gelu, bool(pretrained_cfg.get("quick_gelu", False))),
        "mean": (tuple(spec.mean), tuple(pretrained_cfg["mean"])),
        "std": (tuple(spec.std), tuple(pretrained_cfg["std"])),
    }
    mismatches = [
        f"{field}={ours} but open_clip sets {field}={theirs}"
        for field, (ours, theirs) in expected.items()
        if not _values_equal(ours, theirs)
    ]
    if mismatches:
        raise UsageError(
            f"teacher {spec.name} does not match open_clip {version} {spec.open_clip_model}/"
            f"{spec.pretrained_tag}: {'; '.join(mismatches)}. Fix its TeacherSpec in "
            f"pipeline/teachers/registry.py"
        )
    return pretrained_cfg


def _values_equal(ours: object, theirs: object) -> bool:
    if isinstance(ours, tuple):
        if len(ours) != len(theirs):
            return False
        return all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, theirs))
    return ours == theirs


def clip_vision_config(model_name: str, overrides: dict | None = None) -> tuple[int, dict]:
    """Return (embed_dim, vision_cfg) of an open_clip model with `overrides` applied.

    The image size is left for the caller to set. `overrides` takes the keys in OVERRIDE_KEYS,
    for example {"width": 64, "layers": 2, "heads": 2, "patch_size": 16, "embed_dim": 32}
    for a tiny tower in tests.
    """
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UsageError(f"open_clip {open_clip.__version__} has no model {model_name!r}")
    embed_dim = model_cfg["embed_dim"]
    vision_cfg = dict(model_cfg["vision_cfg"])

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise UsageError(
            f"unknown teacher override keys {unknown}; valid keys are: {', '.join(OVERRIDE_KEYS)}"
        )

    embed_dim = overrides.pop("embed_dim", embed_dim)
    heads = overrides.pop("heads", None)
    vision_cfg.update(overrides)
    if heads is not None:
        if vision_cfg["width"] % heads != 0:
            raise UsageError(
                f"teacher override width {vision_cfg['width']} is not divisible by heads {heads}"
            )
        vision_cfg["head_width"] = vision_cfg["width"] // heads
    return embed_dim, vision_cfg


def build_visual(embed_dim: int, vision_cfg: dict, quick_gelu: bool) -> VisionTransformer:
    """Build an open_clip image tower on the current default device, randomly initialized."""
    # NOTE: _build_vision_tower is private in open_clip 3.3. It is the only builder of the image
    # tower alone, while open_clip.CLIP would also allocate the unused text tower.
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def build_random_visual(
    embed_dim: int, vision_cfg: dict, quick_gelu: bool, device: str | torch.device
) -> VisionTransformer:
    """Build an open_clip image tower initialized from the fixed seed `RANDOM_INIT_SEED`.

    The weights are drawn by the CPU generator, so every process, device and resumed run builds
    the same random teacher, and the caller's random state is left as it was. On the meta device
    nothing is drawn.
    """
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return build_visual(embed_dim, vision_cfg, quick_gelu)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
        return build_visual(embed_dim, vision_cfg, quick_gelu)


def load_visual_weights(visual: VisionTransformer, checkpoint: Path, teacher_name: str) -> None:
    """Load the image tower of an open_clip checkpoint into `visual`, as float32.

    `visual` may live on the meta device, because the checkpoint tensors are assigned, not
    copied. Position embeddings are resampled to `visual.grid_size` when the grids differ.
    Raises UsageError naming the file and the first mismatching keys if it does not fit.
    """
    state_dict = {
        key: value.float() if value.is_floating_point() else value
        for key, value in read_visual_state_dict(checkpoint).items()
    }

    old_tokens = _token_count(state_dict)
    # resize_pos_embed only reads model.visual.grid_size, so the tower alone is enough.
    resize_pos_embed(state_dict, SimpleNamespace(visual=visual))
    new_tokens = _token_count(state_dict)
    if new_tokens != old_tokens:
        logger.info(
            "teacher %s: resampled position embeddings of %s from %d to %d patches",
            teacher_name, checkpoint, old_tokens - 1, new_tokens - 1,
        )

    visual_state = {key.removeprefix("visual."): value for key, value in state_dict.items()}
    check_state_dict_fits(visual, visual_state, checkpoint, teacher_name)
    visual.load_state_dict(visual_state, strict=True, assign=True)


def _token_count(state_dict: dict[str, Tensor]) -> int:
    pos_embed = state_dict.get("visual.positional_embedding")
    return 0 if pos_embed is None else pos_embed.shape[0]


def check_state_dict_fits(
    visual: VisionTransformer, state_dict: dict[str, Tensor], checkpoint: Path, teacher_name: str
) -> None:
    """Raise UsageError unless `state_dict` has exactly the keys and shapes of `visual`."""
    expected = visual.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {list(state_dict[key].shape)} vs {list(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return

    problems = []
    labelled = (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape (checkpoint vs model)", wrong_shape),
    )
    for label, keys in labelled:
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label}: visual.{', visual.'.join(keys[:5])}{more}")
    raise UsageError(
        f"teacher checkpoint {str(checkpoint)!r} does not fit the image tower of teacher {teacher_name} "
        f"({'; '.join(problems)}); pass a checkpoint of the same open_clip architecture"
    )


def build_clip_teacher(
    spec: TeacherSpec,
    weights: str | None,
    *,
    student_img_size: int,
    student_patch_size: int,
    device: str | torch.device,
    overrides: dict | None,
) -> ClipTeacher:
    """Build a frozen CLIP teacher on `device`; see `pipeline.teachers.build_teacher`."""
    pretrained_cfg = check_spec_against_open_clip(spec)

    embed_dim, vision_cfg = clip_vision_config(spec.open_clip_model, overrides)
    spec = replace(spec, patch_size=vision_cfg["patch_size"], width=vision_cfg["width"])
    input_size = teacher_input_size(spec, student_img_size, student_patch_size)
    vision_cfg["image_size"] = input_size

    if weights == RANDOM_WEIGHTS:
        logger.warning(
            "teacher %s uses RANDOM weights: its targets are not CLIP features, use this only for tests",
            spec.name,
        )
        visual = build_random_visual(embed_dim, vision_cfg, spec.quick_gelu, device)
        teacher = ClipTeacher(spec, visual, input_size, WeightsInfo(RANDOM_WEIGHTS, None))
        return teacher.to(device).freeze()

    if weights is None:
        checkpoint = resolve_published_weights(
            pretrained_cfg, teacher_name=spec.name, tag=spec.pretrained_tag
        )
        source = spec.pretrained_tag
    else:
        checkpoint = resolve_local_weights(weights)
        source = str(checkpoint)

    with torch.device("meta"):
        visual = build_visual(embed_dim, vision_cfg, spec.quick_gelu)
    load_visual_weights(visual, checkpoint, spec.name)

    teacher = ClipTeacher(spec, visual, input_size, WeightsInfo(source, sha256_file(checkpoint)))
    return teacher.to(device).freeze()
