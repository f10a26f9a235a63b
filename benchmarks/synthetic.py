"""Caches for the stage-two benchmarks: real JPEG views of the bundled photos, synthetic targets.

The student views are rendered from `data/imagenet-sample-64` with the stage-one code
(`pipeline.views`, JPEG quality 95), so the loader decodes real photos. The targets are drawn at
random and encoded by the chosen codec, so no teacher has to run. The manifest has the same
settings entries that `cache-targets` writes, with teacher and source marked "synthetic".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import CacheWriter, ShardData
from pipeline.codecs import TargetCodec, build_codec
from pipeline.data.teacher_views import encode_jpeg
from pipeline.images import load_image
from pipeline.views import PARAM_NAMES, AugmentConfig, render_views, sample_view_params
from stages.cache_targets import SCHEMA_VERSION

logger = logging.getLogger("benchmarks")

JPEG_QUALITY = 95
CALIBRATION_SAMPLES = 64
OUTLIER_CHANNELS = 8
"""Channels scaled up 20x, because CLIP features have a few channels far larger than the rest."""


@dataclass(frozen=True)
class StudentView:
    """One rendered student view: its JPEG bytes, view parameters float64 [P] and source photo."""

    jpeg: bytes
    params: np.ndarray
    source: str


@dataclass(frozen=True)
class CacheSpec:
    """Shape of a synthetic cache: sample count, shard size, student view and target grid."""

    samples: int
    shard_size: int
    img_size: int
    patch_size: int
    target_dim: int
    codec: str = "fp16"

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def photo_paths(photos: Path, count: int | None = None) -> list[Path]:
    """Return the first `count` JPEG files of `photos` in name order (all when `count` is None)."""
    paths = sorted(path for path in photos.iterdir() if path.suffix.lower() in (".jpeg", ".jpg"))
    if not paths:
        raise FileNotFoundError(f"no JPEG photos in {photos}")
    return paths[:count] if count is not None else paths


def render_student_views(photos: Path, count: int, img_size: int, seed: int = 0) -> list[StudentView]:
    """Render `count` student views, cycling over the photos; pass v of a photo renders its view v."""
    paths = photo_paths(photos)
    augment = AugmentConfig()
    passes = -(-count // len(paths))

    views: list[StudentView | None] = [None] * count
    for photo_index, path in enumerate(paths):
        image = load_image(path.read_bytes(), path.name)
        for view_index in range(passes):
            position = view_index * len(paths) + photo_index
            if position >= count:
                break
            params = sample_view_params(image.size, seed, photo_index, view_index, augment)
            (student,) = render_views(image, params, [img_size], augment)
            views[position] = StudentView(encode_jpeg(student, JPEG_QUALITY), params.to_array(), path.name)
    return [view for view in views if view is not None]


def synthetic_targets(rng: np.random.Generator, count: int, num_patches: int, dim: int) -> np.ndarray:
    """Draw float32 targets [count, num_patches, dim]: low rank plus noise, with a few outlier channels.

    Rank-32 structure gives the PCA codec something to find. The magnitudes only resemble
    CLIP features and are not fitted to them.
    """
    rank = min(32, dim)
    basis = rng.standard_normal((rank, dim), dtype=np.float32)
    coefficients = rng.standard_normal((count * num_patches, rank), dtype=np.float32)
    targets = coefficients @ basis
    targets += 0.3 * rng.standard_normal(targets.shape, dtype=np.float32)
    targets[:, : min(OUTLIER_CHANNELS, dim)] *= 20.0
    return targets.reshape(count, num_patches, dim)


def write_synthetic_cache(root: Path, spec: CacheSpec, views: list[StudentView], seed: int = 0) -> Path:
    """Write and finalize a one-view zarr cache of `spec.samples` samples at `root`.

    Sample i uses `views[i % len(views)]`, so a large cache can reuse a few hundred rendered
    views; every sample still has its own image index and targets.
    """
    rng = np.random.default_rng(seed)
    codec = build_codec(spec.codec)
    if codec.needs_fit:
        calibration = min(CALIBRATION_SAMPLES, spec.samples)
        codec.fit(synthetic_targets(rng, calibration, spec.num_patches, spec.target_dim))

    writer = CacheWriter(
        root,
        "zarr",
        cache_settings(spec, codec, seed),
        codec.part_specs(spec.num_patches, spec.target_dim),
        f"{codec.compressor}:{codec.compression_level}" if codec.compressor else None,
        num_views=1,
    )
    if codec.needs_fit:
        writer.write_codec_state(codec.state())

    for shard_id, start in enumerate(range(0, spec.samples, spec.shard_size)):
        stop = min(start + spec.shard_size, spec.samples)
        targets = synthetic_targets(rng, stop - start, spec.num_patches, spec.target_dim)
        data = _shard_data(start, stop, views, codec.encode(targets))
        writer.write_shard(shard_id, data, (start, stop), num_images=stop - start)

    writer.finalize({"num_inputs": spec.samples, "num_skipped": 0, "skipped": []})
    logger.info("wrote synthetic %s cache of %d samples at %s", spec.codec, spec.samples, root)
    return root


def _shard_data(start: int, stop: int, views: list[StudentView], parts: dict[str, np.ndarray]) -> ShardData:
    chosen = [views[index % len(views)] for index in range(start, stop)]
    count = stop - start
    return ShardData(
        image_index=np.arange(start, stop, dtype=np.int64),
        view_index=np.zeros(count, dtype=np.int32),
        source=[view.source for view in chosen],
        label=np.full(count, -1, dtype=np.int64),
        params=np.stack([view.params for view in chosen]),
        jpeg=[view.jpeg for view in chosen],
        targets=parts,
    )


def cache_settings(spec: CacheSpec, codec: TargetCodec, seed: int) -> dict:
    """Return the manifest settings in the layout `cache-targets` writes, for a synthetic teacher."""
    grid = list(spec.grid)
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": {
            "name": "synthetic",
            "weights_source": "synthetic targets (random low-rank plus noise)",
            "weights_sha256": None,
            "random_weights": True,
            "grid_size": grid,
            "target_dim": spec.target_dim,
        },
        "student_view": {
            "img_size": spec.img_size,
            "patch_size": spec.patch_size,
            "grid": grid,
            "jpeg_quality": JPEG_QUALITY,
            "normalization": "none: uint8 RGB; the trainer applies the ImageNet mean and std",
        },
        "targets": {
            "grid": grid,
            "dim": spec.target_dim,
            "layer": "synthetic",
            "normalization": "stored raw; the trainer applies LayerNorm without affine per patch",
            "dtype_before_codec": "float32",
        },
        "codec": codec.describe(),
        "views": 1,
        "augment": AugmentConfig().to_dict(),
        "view_params": list(PARAM_NAMES),
        "seed": seed,
        "shard_size": spec.shard_size,
        "calibration_images": min(CALIBRATION_SAMPLES, spec.samples) if codec.needs_fit else 0,
        "source": {"fingerprint": "synthetic", "images": spec.samples},
    }
