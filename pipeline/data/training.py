"""Training data of a run: train and validation sample ids, loaders and targets.

`build_training_data` hides the difference between a cache (targets decoded from storage) and
the online teacher (targets computed on the device from teacher views).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torchvision

from pipeline.cache import CacheReader
from pipeline.config import PretrainConfig
from pipeline.data.cached import CachedViews
from pipeline.data.online import OnlineViews, image_groups
from pipeline.data.order import SHARD_WINDOW, interleave_streams, plan_epoch
from pipeline.data.workers import exit_with_parent_init
from pipeline.distributed import read_torchrun_env
from pipeline.engine import StepSettings, autocast_context, normalize_images, prepare_targets
from pipeline.errors import CacheMismatchError, CorruptCacheError, UsageError
from pipeline.masking import MaskConfig

logger = logging.getLogger(__name__)

VAL_STREAM = 0x56414C


def order_streams(workers: int) -> int:
    """Return the number of interleaved runs (`interleave_streams`) of a loader with `workers` worker processes."""
    return max(1, workers)


def passthrough(batch):
    """collate_fn for datasets whose __getitems__ already returns a collated batch."""
    return batch


class BatchList(torch.utils.data.Sampler):
    """Batches of one epoch and view, given as sample id arrays and yielded as (epoch, view, sample id) lists.

    The items of a batch are built when the DataLoader requests it, so an epoch of the whole
    cache costs one int64 per sample here instead of one Python tuple.
    """

    def __init__(self, epoch: int, view: int, batches: list[np.ndarray]) -> None:
        self.epoch = epoch
        self.view = view
        self.batches = batches

    def __iter__(self):
        for sample_ids in self.batches:
            yield [(self.epoch, self.view, sample_id) for sample_id in sample_ids.tolist()]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class TrainingData:
    """Train/validation split, loaders and the device-side target preparation of one run."""

    dataset: torch.utils.data.Dataset
    train_groups: list[np.ndarray]
    train_ids: np.ndarray
    val_ids: np.ndarray
    target_dim: int
    num_views: int
    description: str
    config: PretrainConfig
    device: torch.device
    teacher: Callable | None = None
    rank: int = 0
    world_size: int = 1
    decode_on_device: bool = False
    extra: dict = field(default_factory=dict)

    def view_for_epoch(self, epoch: int) -> int:
        """Epoch e reads view (e mod K): K views repeat in order when epochs outnumber them."""
        return epoch % self.num_views

    def loader(self, epoch: int, skip_batches: int = 0, streams: int | None = None) -> torch.utils.data.DataLoader:
        """Return the loader of one epoch's training batches, from batch `skip_batches` of the epoch on.

        The batches come as `streams` interleaved runs, by default one per worker. A run resumed
        inside an epoch passes the stream count that the epoch started with, so the skipped
        batches are the ones already trained on.
        """
        view = self.view_for_epoch(epoch)
        plan = plan_epoch(
            self.train_groups, self.config.seed, epoch, self.config.batch_size, self.rank, self.world_size, SHARD_WINDOW
        )
        streams = order_streams(self.config.workers) if streams is None else streams
        batches = interleave_streams(plan.batches, streams)
        logger.info("epoch %d reads view %d of %d (%d batches)", epoch, view, self.num_views, len(batches))
        return self._loader(BatchList(epoch, view, batches[skip_batches:]))

    def val_loader(self) -> torch.utils.data.DataLoader:
        """Validation batches: view 0, masks of a fixed epoch (-1), split across ranks.

        NOTE: the validation samples are spread over all shards, so each validation reads the
        view-0 slice of every shard, 1/K of a K-view cache, for a small fraction of its samples.
        """
        mine = np.array_split(self.val_ids, self.world_size)[self.rank]
        size = self.config.batch_size
        batches = [mine[start : start + size] for start in range(0, len(mine), size)]
        return self._loader(BatchList(-1, 0, batches))

    def _loader(self, batches: BatchList) -> torch.utils.data.DataLoader:
        workers = self.config.workers
        # Each iterator draws a base seed from this generator. With the global one, the draws of
        # the loaders made between a checkpoint and the next step would shift the drop-path RNG
        # of a resumed run. The datasets take no randomness from worker seeds.
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=passthrough,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=exit_with_parent_init() if workers > 0 else None,
            generator=torch.Generator(),
        )

    def to_device(self, batch: dict, device: torch.device, settings: StepSettings):
        """Return (normalized images [B, 3, H, W], prepared targets [B, L, D], mask [B, Gh, Gw])."""
        if self.decode_on_device:
            # nvjpeg reads the encoded bytes from host memory, so `jpeg` stays on the CPU
            sizes = batch["jpeg_offsets"].diff().tolist()
            encoded = list(torch.split(batch["jpeg"], sizes))
            decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device)
            images = torch.stack(decoded)
        else:
            images = batch["images"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)

        if self.teacher is not None:
            with torch.no_grad(), autocast_context(device, settings.autocast_dtype):
                targets = self.teacher(batch["teacher_images"].to(device, non_blocking=True))
        else:
            parts = {name: part.to(device, non_blocking=True) for name, part in batch["target_parts"].items()}
            targets = self.dataset.finish_targets(parts)
        return normalize_images(images), prepare_targets(targets, settings.target_norm), mask


def split_validation(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fixed random fraction of sample ids; the same images for every view and epoch."""
    count = int(round(num_samples * fraction))
    if fraction > 0 and num_samples > 1:
        count = max(1, count)
    rng = np.random.default_rng(np.random.SeedSequence([seed, VAL_STREAM]))
    val_ids = np.sort(rng.choice(num_samples, size=min(count, num_samples - 1), replace=False))
    train_mask = np.ones(num_samples, dtype=bool)
    train_mask[val_ids] = False
    return np.flatnonzero(train_mask), val_ids.astype(np.int64)


def _filter_groups(groups: list[np.ndarray], keep: np.ndarray) -> list[np.ndarray]:
    keep_set = np.zeros(int(max((g.max() for g in groups if g.size), default=-1)) + 1, dtype=bool)
    keep_set[keep] = True
    filtered = [g[keep_set[g]] for g in groups]
    return [g for g in filtered if g.size]


def build_training_data(config: PretrainConfig, student, mask_config: MaskConfig, device: torch.device) -> TrainingData:
    info = read_torchrun_env()
    if config.cache is not None:
        data = _cached_data(config, student, mask_config, device)
    else:
        data = _online_data(config, student, mask_config, device)
    data.rank, data.world_size = info.rank, info.world_size
    return data


def _cached_data(config, student, mask_config, device) -> TrainingData:
    reader = CacheReader(config.cache)
    check_cache_fits_student(reader.manifest["settings"], student, config)
    check_cache_files_exist(reader)
    gpu_decode = config.gpu_decode and device.type == "cuda"
    if config.gpu_decode and not gpu_decode:
        logger.warning("--gpu-decode needs CUDA; decoding JPEG views in the loader workers instead")
    dataset = CachedViews(
        config.cache, mask_config, config.seed, decode_jpeg=not gpu_decode, shards_in_memory=SHARD_WINDOW
    )

    train_ids, val_ids = split_validation(len(dataset), config.val_fraction, config.seed)
    groups = _filter_groups(dataset.layout.groups(), train_ids)
    settings = reader.manifest["settings"]
    teacher = settings["teacher"]
    return TrainingData(
        dataset=dataset,
        train_groups=groups,
        train_ids=train_ids,
        val_ids=val_ids,
        target_dim=int(settings["targets"]["dim"]),
        num_views=int(settings["views"]),
        description=f"cache {config.cache} (teacher {teacher['name']}, weights {teacher['weights_source']}, "
        f"codec {settings['codec']['full_name']})",
        config=config,
        device=device,
        decode_on_device=gpu_decode,
    )


def check_cache_files_exist(reader: CacheReader) -> None:
    """Raise CorruptCacheError before the first step when a file listed in the manifest is missing.

    This costs one stat per file. The sha256 of each shard is checked when a worker first reads it.
    """
    for record in reader.shards:
        for name in record.files:
            if not (reader.root / name).is_file():
                raise CorruptCacheError(
                    f"cache shard {record.name} of {reader.root} is damaged: {name} is missing; run "
                    f"maskdistill verify {reader.root}, then delete {record.name}.done.json and rerun "
                    "cache-targets with the same settings to rewrite that shard"
                )


def check_cache_fits_student(manifest: dict, student, config: PretrainConfig) -> None:
    """Raise CacheMismatchError, before any step, when the cache's grid or input size differs.

    `manifest` is the cache's content settings (the manifest's "settings" entry).
    """
    cache_grid = tuple(manifest["targets"]["grid"])
    cache_size = int(manifest["student_view"]["img_size"])
    cache_patch = int(manifest["student_view"]["patch_size"])
    if cache_size == student.img_size and cache_grid == tuple(student.grid_size):
        return
    raise CacheMismatchError(
        f"cache {config.cache} has {cache_size} px student views and a {cache_grid[0]}x{cache_grid[1]} target grid "
        f"(patch {cache_patch}), but student {config.student} at --img-size {student.img_size} has a "
        f"{student.grid_size[0]}x{student.grid_size[1]} grid (patch {student.target_patch_size}); pass "
        f"--img-size {cache_size} with a patch-{cache_patch} student, or rebuild the cache with "
        f"--img-size {student.img_size} --student-patch-size {student.target_patch_size}"
    )


def _online_data(config, student, mask_config, device) -> TrainingData:
    from pipeline.teachers import build_teacher

    if config.gpu_decode:
        logger.warning("--gpu-decode applies to cached views only, so the online teacher's views are decoded in the loader workers")

    teacher = build_teacher(
        config.teacher,
        config.teacher_weights,
        student_img_size=config.img_size,
        student_patch_size=student.target_patch_size,
        device=device,
        overrides=config.teacher_overrides,
    )
    if tuple(teacher.grid_size) != tuple(student.grid_size):
        raise UsageError(
            f"teacher {config.teacher} gives a {teacher.grid_size} grid but student {config.student} "
            f"has {student.grid_size}; adjust --img-size"
        )
    augment = config.augment
    dataset = OnlineViews(
        config.data, config.img_size, teacher.input_size, augment, mask_config,
        view_seed=config.seed, mask_seed=config.seed,
    )
    train_ids, val_ids = split_validation(len(dataset), config.val_fraction, config.seed)
    groups = _filter_groups(image_groups(len(dataset), config.shard_size), train_ids)
    return TrainingData(
        dataset=dataset,
        train_groups=groups,
        train_ids=train_ids,
        val_ids=val_ids,
        target_dim=teacher.target_dim,
        num_views=config.views,
        description=f"online teacher {config.teacher} (weights {teacher.weights.source}) on {config.data}",
        config=config,
        device=device,
        teacher=teacher,
    )
