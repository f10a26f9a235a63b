"""Stage one: run the frozen teacher once over recorded views and store the targets.

Every (image, view) gets augmentation parameters drawn from (seed, image index, view index).
The student view is stored as JPEG with its parameters. The teacher view, cut from the same
source crop, goes through the teacher, and its per-patch targets are encoded with the codec.
Images are grouped into shards of `shard_size` consecutive source images. Each shard is
written by one process to a temporary name and recorded when complete, so a killed run resumes
by writing only the unrecorded shards, and writes the same bytes an uninterrupted run would.

Under torchrun, shard s belongs to rank s mod world size. Rank 0 creates the cache and fits the
codec while the other ranks wait at a barrier, and finalizes the manifest once every rank has
written its shards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.cache import CacheWriter
from pipeline.cache.manifest import check_same_content, load_manifest, manifest_path, to_json_value
from pipeline.cache.writer import holds_written_data
from pipeline.cache_build import (
    ShardJob,
    ShardWriterLoop,
    finalize_cache,
    fit_codec,
    read_skipped,
    shard_ranges,
)
from pipeline.codecs import build_codec
from pipeline.config import CacheConfig
from pipeline.distributed import (
    DistInfo,
    barrier,
    destroy_process_group,
    init_process_group,
    read_torchrun_env,
    resolve_device,
)
from pipeline.engine import autocast_dtype_for
from pipeline.errors import UsageError
from pipeline.folder_lock import FolderLock
from pipeline.output_paths import check_output_folder
from pipeline.sources import open_source
from pipeline.teachers import Teacher, build_teacher
from pipeline.views import PARAM_NAMES
from pipeline.data.teacher_views import JPEG_SUBSAMPLING

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def run_cache_targets(config: CacheConfig, teacher: Teacher | None = None) -> dict:
    """Build (or finish) the cache described by `config`; return its manifest (rank 0) or {}.

    `teacher` is a teacher built by the caller, for example one shared by several caches of
    a benchmark. It must be the teacher `config.teacher` names. When omitted, the teacher is
    built from `config`.

    Raises CacheMismatchError when `config.out` contains a cache written with other settings,
    naming the first differing setting with both values.
    """
    _check_config(config)
    info = read_torchrun_env()
    device = resolve_device(config.device, info)
    joined = init_process_group(info, device)
    lock = FolderLock()
    try:
        return _run(config, teacher, info, device, lock)
    finally:
        lock.release()
        if joined:
            destroy_process_group()


def _run(
    config: CacheConfig, teacher: Teacher | None, info: DistInfo, device: torch.device, lock: FolderLock
) -> dict:
    source = open_source(config.data)
    if teacher is None:
        teacher = build_teacher(
            config.teacher,
            config.teacher_weights,
            student_img_size=config.img_size,
            student_patch_size=config.student_patch_size,
            device=device,
            overrides=config.teacher_overrides,
        )
    elif teacher.describe()["name"] != config.teacher:
        raise ValueError(f"the teacher passed in is {teacher.describe()['name']}, but config.teacher is {config.teacher}")
    codec = build_codec(config.codec)

    settings = content_settings(config, teacher, codec, source)
    check_existing_cache(Path(config.out), config.format, settings)
    writer = _open_writer(config, settings, teacher, codec, info, lock)
    job = ShardJob(config=config, source=source, teacher=teacher, codec=codec, augment=config.augment, device=device)

    ranges = shard_ranges(len(source), config.shard_size)
    if writer.manifest.get("complete") and writer.finished_shards() == set(range(len(ranges))):
        logger.info("cache %s is already complete: nothing to do", config.out)
        return writer.manifest if info.is_main else {}
    return _write_cache(job, writer, ranges, info)


def _write_cache(job: ShardJob, writer: CacheWriter, ranges: list[tuple[int, int]], info: DistInfo) -> dict:
    """Fit the codec, write this rank's unfinished shards and finalize on rank 0."""
    config = job.config
    fit_codec(job, writer, info)
    finished = writer.finished_shards()
    mine = [shard for shard in range(len(ranges)) if shard % info.world_size == info.rank and shard not in finished]
    logger.info(
        "%d images in %d shards; %d already finished; this process writes %d",
        len(job.source), len(ranges), len(finished), len(mine),
    )

    skipped_before = len(job.bad_at_index()) + len(read_skipped(Path(config.out), sorted(finished)))
    barrier()  # every rank counts the same finished shards before any rank writes one

    started = time.monotonic()
    loop = ShardWriterLoop(job, writer, enabled_progress=info.is_main, skipped_before=skipped_before)
    loop.run(mine, ranges)
    barrier()

    manifest = {}
    if info.is_main:
        manifest = finalize_cache(job, writer, ranges, elapsed=time.monotonic() - started)
    barrier()
    return manifest


def _open_writer(
    config: CacheConfig, settings: dict, teacher, codec, info: DistInfo, lock: FolderLock
) -> CacheWriter:
    """Create or resume the cache: rank 0 first, then the other ranks.

    Opening a new cache writes its first manifest, so only one process may do it. Rank 0 locks
    the folder first, and every other command has a rank 0 too, so a second command on the same
    folder stops there. The last barrier lets every rank finish opening, which removes temp
    files of killed runs, before any rank writes a shard.
    """
    if info.is_main:
        lock.acquire(Path(config.out), "--out")
    else:
        barrier()
    num_patches = teacher.grid_size[0] * teacher.grid_size[1]
    writer = CacheWriter(
        Path(config.out),
        config.format,
        settings,
        codec.part_specs(num_patches, teacher.target_dim),
        f"{codec.compressor}:{codec.compression_level}" if codec.compressor else None,
        config.views,
    )
    if info.is_main:
        barrier()
    barrier()
    return writer


def check_existing_cache(root: Path, fmt: str, settings: dict) -> None:
    """Raise CacheMismatchError when `root` contains a cache written with other content settings.

    The message names the first differing setting in the terms of this run's settings (for
    example `seed`, `codec.name` or `teacher.name`) with the stored and requested values. A
    cache without a finished shard or codec state passes, because the writer starts it over.
    """
    if not manifest_path(root).is_file() or not holds_written_data(root):
        return
    manifest = load_manifest(root)
    stored = {"format": manifest.get("format"), **(manifest.get("settings") or {})}
    check_same_content(root, stored, {"format": fmt, **to_json_value(settings)})


def _check_config(config: CacheConfig) -> None:
    if not config.data:
        raise UsageError("missing --data: pass a folder of images or webdataset tar shards")
    if not config.out:
        raise UsageError("missing --out: pass the folder for the cache")
    check_output_folder(config.out, "--out")
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
    autocast_dtype_for(config.precision, torch.device("cpu"))  # raises UsageError for an invalid --precision
    build_codec(config.codec)  # raises UsageError for an invalid --codec before the teacher is loaded
    if config.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {config.workers}")
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
            "jpeg_subsampling": JPEG_SUBSAMPLING,
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
