"""Views: recorded augmentations of a source image, sampled once and rendered at several sizes.

A view is a random resized crop, a horizontal flip and a color jitter. `sample_view_params`
draws its parameters from (seed, image index, view index) alone, so `cache-targets` can record
them and any later process can render the identical view. `render_views` cuts the student and
teacher images of one view from the same crop of the source pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipeline.errors import UsageError
from pipeline.images import SourceImage

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

PARAM_NAMES: tuple[str, ...] = (
    "left",
    "top",
    "width",
    "height",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "jitter_order_0",
    "jitter_order_1",
    "jitter_order_2",
)
"""Column names of `ViewParams.to_array`, stored in the cache manifest."""

PARAM_DIM = len(PARAM_NAMES)

CROP_ATTEMPTS = 10
"""Random boxes tried before the center-crop fallback, as in torchvision's RandomResizedCrop."""


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the view augmentation. Jitter strengths s give factors uniform in [max(0, 1 - s), 1 + s]."""

    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    hflip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        # YAML and JSON give lists: store tuples so configs compare and hash equal.
        object.__setattr__(self, "scale", _float_pair("scale", self.scale))
        object.__setattr__(self, "ratio", _float_pair("ratio", self.ratio))

        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise UsageError(f"invalid augment scale {self.scale}: expected (min, max) with 0 < min <= max <= 1")
        low, high = self.ratio
        if not 0 < low <= high:
            raise UsageError(f"invalid augment ratio {self.ratio}: expected (min, max) with 0 < min <= max")
        if not 0 <= self.hflip_prob <= 1:
            raise UsageError(f"invalid augment hflip_prob {self.hflip_prob}: expected a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"invalid augment {name} {getattr(self, name)}: expected a jitter strength >= 0")
        if self.interpolation not in RESAMPLING:
            raise UsageError(
                f"invalid augment interpolation {self.interpolation!r}: expected one of {', '.join(RESAMPLING)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, tuples as lists."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> AugmentConfig:
        """Rebuild a config from `to_dict` output. Raises UsageError naming any unknown field."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UsageError(f"unknown augment fields {unknown}: expected some of {sorted(known)}")
        return cls(**fields)


def _float_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        pair = tuple(float(item) for item in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2:
        raise UsageError(f"invalid augment {name} {value!r}: expected two numbers (min, max)")
    return pair


@dataclass(frozen=True)
class ViewParams:
    """Parameters of one view. The crop box is in oriented source pixels."""

    left: float
    top: float
    width: float
    height: float
    flip: bool
    brightness: float  # jitter factors, 1.0 = unchanged
    contrast: float
    saturation: float
    jitter_order: tuple[int, int, int]  # order of 0 = brightness, 1 = contrast, 2 = saturation

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Crop box as (left, top, right, bottom)."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)

    def to_array(self) -> np.ndarray:
        """Pack the parameters as float64 [PARAM_DIM], in the order of PARAM_NAMES."""
        values = [self.left, self.top, self.width, self.height, float(self.flip)]
        values += [self.brightness, self.contrast, self.saturation, *self.jitter_order]
        return np.array(values, dtype=np.float64)

    @classmethod
    def from_array(cls, array: np.ndarray) -> ViewParams:
        """Unpack `to_array` output. Raises ValueError for a wrong shape or invalid flip or order."""
        array = np.asarray(array, dtype=np.float64)
        if array.shape != (PARAM_DIM,):
            raise ValueError(f"view parameters must have shape ({PARAM_DIM},), got {array.shape}")

        flip = array[4]
        if flip not in (0.0, 1.0):
            raise ValueError(f"view parameter flip must be 0 or 1, got {flip}")
        order = tuple(int(value) for value in array[8:11])
        if sorted(order) != [0, 1, 2] or not np.array_equal(array[8:11], order):
            raise ValueError(f"view parameter jitter_order must be a permutation of (0, 1, 2), got {array[8:11]}")

        left, top, width, height = (float(value) for value in array[:4])
        brightness, contrast, saturation = (float(value) for value in array[5:8])
        return cls(left, top, width, height, bool(flip), brightness, contrast, saturation, order)


class CropBox(NamedTuple):
    """An integer crop box, and whether the center-crop fallback produced it."""

    left: int
    top: int
    width: int
    height: int
    fallback: bool


def sample_crop_box(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> CropBox:
    """Draw a random resized crop box inside an image of size (width, height).

    Follows torchvision's RandomResizedCrop: up to CROP_ATTEMPTS draws of an area fraction in
    `scale` and a log-uniform aspect ratio in `ratio`, keeping the first box that fits. When
    none fits, the fallback is a centered crop of the whole image with its aspect ratio clamped
    to `ratio`. Both box sides are rounded to whole pixels, so the ratio of a small box can
    leave `ratio` by the rounding.
    """
    width, height = image_size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return CropBox(left, top, crop_width, crop_height, fallback=False)

    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, max(1, round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = max(1, round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return CropBox((width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height, fallback=True)


def sample_view_params(
    image_size: tuple[int, int],
    seed: int,
    image_index: int,
    view_index: int,
    cfg: AugmentConfig,
) -> ViewParams:
    """Draw the parameters of one view of an image of oriented size (width, height).

    The result depends only on the arguments. The generator is seeded from
    SeedSequence(seed, spawn_key=(image_index, view_index)), never from global RNG state or the
    process or worker. Crop, flip and jitter draw from separate child streams, so changing the
    crop ranges leaves flips and jitter factors unchanged.
    """
    for name, value in (("seed", seed), ("image_index", image_index), ("view_index", view_index)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_size}")

    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(image_index), int(view_index)))
    crop_rng, flip_rng, color_rng = (np.random.default_rng(child) for child in sequence.spawn(3))

    box = sample_crop_box(crop_rng, (width, height), cfg.scale, cfg.ratio)
    flip = bool(flip_rng.random() < cfg.hflip_prob)
    brightness = _jitter_factor(color_rng, cfg.brightness)
    contrast = _jitter_factor(color_rng, cfg.contrast)
    saturation = _jitter_factor(color_rng, cfg.saturation)
    order = tuple(int(index) for index in color_rng.permutation(3))

    return ViewParams(
        left=float(box.left),
        top=float(box.top),
        width=float(box.width),
        height=float(box.height),
        flip=flip,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        jitter_order=order,
    )


def _jitter_factor(rng: np.random.Generator, strength: float) -> float:
    # Draws even at strength 0 (factor exactly 1.0), so each factor keeps its place in the stream.
    return float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def render_views(
    image: SourceImage,
    params: ViewParams,
    sizes: Sequence[int],
    cfg: AugmentConfig,
) -> list[Image.Image]:
    """Render one view at each side length in `sizes`, as RGB images.

    Every output is resized once from the source pixels of the same crop, then flipped, then
    jittered in `params.jitter_order` with the same factors for every size. Raises
    BadImageError when the source pixels cannot be decoded.
    """
    crops = image.crop_resize_many(params.box, sizes, RESAMPLING[cfg.interpolation])

    views = []
    for crop in crops:
        if params.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(_jitter(crop, params))
    return views


def _jitter(image: Image.Image, params: ViewParams) -> Image.Image:
    factors = (params.brightness, params.contrast, params.saturation)
    for index in params.jitter_order:
        if factors[index] != 1.0:
            image = _ENHANCERS[index](image).enhance(factors[index])
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an image to float32 [3, H, W] in [0, 1].

    The arithmetic is done in numpy: torch's thread pool costs more than the work on one view.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels) / np.float32(255))
