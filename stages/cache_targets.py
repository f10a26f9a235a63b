"""Stage one: run the frozen teacher once over recorded views and store the targets.

Every (image, view) gets augmentation parameters drawn from (seed, image index, view index).
The student view is stored as JPEG with its parameters; the teacher view, cut from the same
source crop, goes through the teacher, and its per-patch targets are encoded with the codec.
Images are grouped into shards of `shard_size` consecutive source images; each shard is
written by one process to a temporary name and renamed when complete, so a killed run resumes
by redoing only unfinished shards. Under torchrun, shard s belongs to rank s mod world size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path


from pipeline.cache import CacheWriter
from pipeline.codecs import build_codec
from pipeline.config import CacheConfig
from pipeline.distributed import barrier, init_process_group, read_torchrun_env, resolve_device
from pipeline.errors import UsageError
from pipeline.sources import open_source
from pipeline.teachers import build_teacher
from pipeline.views import PARAM_NAMES
from pipeline.cache_build import ShardJob, ShardWriterLoop, finalize_cache, fit_codec, shard_ranges

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def run_cache_targets(config: CacheConfig) -> dict:
    """Build (or finish) the cache described by `config`; return its manifest (rank 0) or {}."""
    _check_config(config)
    info = read_torchrun_env()
    device = resolve_device(config.device, info)
    init_process_group(info, device)

    source = open_source(config.data)
    teacher = build_teacher(
        config.teacher,
        config.teacher_weights,
        student_img_size=config.img_size,
        student_patch_size=config.student_patch_size,
        device=device,
        overrides=config.teacher_overrides,
    )
    codec = build_codec(config.codec)
    augment = config.augment

    settings = content_settings(config, teacher, codec, source)
    num_patches = teacher.grid_size[0] * teacher.grid_size[1]
    writer = CacheWriter(
        Path(config.out),
        config.format,
        settings,
        codec.part_specs(num_patches, teacher.target_dim),
        f"{codec.compressor}:{codec.compression_level}" if codec.compressor else None,
        config.views,
    )
    job = ShardJob(config=config, source=source, teacher=teacher, codec=codec, augment=augment, device=device)

    fit_codec(job, writer, info)
    ranges = shard_ranges(len(source), config.shard_size)
    finished = writer.finished_shards()
    mine = [shard for shard in range(len(ranges)) if shard % info.world_size == info.rank and shard not in finished]
    logger.info(
        "%d images in %d shards; %d already finished; this process writes %d",
        len(source), len(ranges), len(finished), len(mine),
    )

    started = time.monotonic()
    loop = ShardWriterLoop(job, writer, enabled_progress=info.is_main)
    loop.run(mine, ranges)
    barrier()

    if not info.is_main:
        return {}
    manifest = finalize_cache(job, writer, ranges, elapsed=time.monotonic() - started)
    barrier()
    return manifest


def _check_config(config: CacheConfig) -> None:
    if not config.data:
        raise UsageError("missing --data: pass a folder of images or webdataset tar shards")
    if not config.out:
        raise UsageError("missing --out: pass the folder for the cache")
    if config.views < 1:
        raise UsageError(f"--views must be at least 1, got {config.views}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1 image, got {config.shard_size}")
    if not 90 <= config.jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality must lie between 90 and 100, got {config.jpeg_quality}")
    if config.format not in ("zarr", "wds"):
        raise UsageError(f"--format must be zarr or wds, got {config.format!r}")
    if config.img_size % config.student_patch_size:
        raise UsageError(
            f"--img-size {config.img_size} is not a multiple of --student-patch-size {config.student_patch_size}"
        )
    if not 0.0 <= config.max_bad_fraction <= 1.0:
        raise UsageError(f"--max-bad-fraction must lie in [0, 1], got {config.max_bad_fraction}")


def content_settings(config: CacheConfig, teacher, codec, source) -> dict:
    """Everything that decides the cache's bytes; a resumed run must match it exactly."""
    grid = list(teacher.grid_size)
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher.describe(),
        "student_view": {
            "img_size": config.img_size,
            "patch_size": config.student_patch_size,
            "grid": grid,
            "jpeg_quality": config.jpeg_quality,
            "normalization": "none: uint8 RGB; the trainer applies the ImageNet mean and std",
        },
        "targets": {
            "grid": grid,
            "dim": teacher.target_dim,
            "layer": teacher.target_layer,
            "normalization": "stored raw; the trainer applies LayerNorm without affine per patch",
            "dtype_before_codec": "float32",
        },
        "codec": codec.describe(),
        "views": config.views,
        "augment": config.augment.to_dict(),
        "view_params": list(PARAM_NAMES),
        "seed": config.seed,
        "shard_size": config.shard_size,
        "calibration_images": config.calibration_images if codec.needs_fit else 0,
        "source": {"fingerprint": source.fingerprint(), "images": len(source)},
    }

