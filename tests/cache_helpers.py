"""Tiny real shards for the cache tests: random JPEGs, params and int8/float16 codec parts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cache import CacheWriter, ShardData

NUM_VIEWS = 2
PARAMS_DIM = 5
PARTS = {"codes": ((4, 8), np.dtype(np.int8)), "scale": ((4,), np.dtype(np.float16))}
SETTINGS = {"teacher": "ViT-B-16", "weights_sha256": "ab12", "seed": 0, "views": {"size": 32, "num_views": NUM_VIEWS}}


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """Encode a random RGB image as JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_shard(image_indices: list[int], num_views: int = NUM_VIEWS, seed: int = 0) -> ShardData:
    """Build a whole view-major shard of ``image_indices`` with distinct content per sample."""
    rng = np.random.default_rng(seed)
    n = len(image_indices)
    count = n * num_views
    images = np.tile(np.asarray(image_indices, dtype=np.int64), num_views)
    return ShardData(
        image_index=images,
        view_index=np.repeat(np.arange(num_views, dtype=np.int32), n),
        source=[f"train/class_{i % 3}/img {i}.jpg" for i in images],
        label=np.where(images % 4 == 0, -1, images % 3).astype(np.int64),
        params=rng.normal(size=(count, PARAMS_DIM)),
        jpeg=[jpeg_bytes(seed * 1000 + int(i) * 10 + v) for v in range(num_views) for i in image_indices],
        targets={
            "codes": rng.integers(-128, 128, (count, 4, 8), dtype=np.int8),
            "scale": rng.normal(size=(count, 4)).astype(np.float16),
        },
    )


def open_writer(root: Path, fmt: str, compressor: str | None = None, settings: dict | None = None) -> CacheWriter:
    return CacheWriter(root, fmt, settings or SETTINGS, PARTS, compressor, NUM_VIEWS)


def write_cache(
    root: Path, fmt: str, shard_images: list[list[int]], compressor: str | None = None
) -> tuple[CacheWriter, list[ShardData]]:
    """Write and finalize a cache with one shard per list of image indices (3 source images per shard)."""
    writer = open_writer(root, fmt, compressor)
    shards = []
    for shard_id, images in enumerate(shard_images):
        data = make_shard(images, seed=shard_id)
        writer.write_shard(shard_id, data, (3 * shard_id, 3 * shard_id + 3), len(images))
        shards.append(data)
    writer.finalize({"skipped": []})
    return writer, shards


def write_shards_worker(root: str, fmt: str, shard_ids: list[int]) -> None:
    """Write the given shards from a separate process (the target of a spawned process)."""
    writer = open_writer(Path(root), fmt)
    for shard_id in shard_ids:
        images = [3 * shard_id, 3 * shard_id + 2]
        writer.write_shard(shard_id, make_shard(images, seed=shard_id), (3 * shard_id, 3 * shard_id + 3), 2)
