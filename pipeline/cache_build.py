"""The work of stage one: codec calibration, the teacher pass over each shard, fidelity, manifest."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_json
from pipeline.cache import CacheReader, CacheWriter, ShardData
from pipeline.codecs import NonFiniteTargetError, TargetRangeError, encoded_nbytes, fidelity_report
from pipeline.config import CacheConfig
from pipeline.data.teacher_views import ImageViews, TeacherViews, collate_views
from pipeline.distributed import DistInfo, barrier
from pipeline.engine import autocast_context
from pipeline.errors import UsageError
from pipeline.logs import ProgressReporter
from pipeline.provenance import package_versions
from pipeline.sources import ImageSource

logger = logging.getLogger(__name__)


@dataclass
class ShardJob:
    """Everything the teacher pass needs, shared by calibration, shards and fidelity."""

    config: CacheConfig
    source: ImageSource
    teacher: torch.nn.Module
    codec: object
    augment: object
    device: torch.device

    def views_dataset(self, indices: list[int], view_indices: list[int] | None = None) -> TeacherViews:
        return TeacherViews(
            self.source,
            indices,
            self.config.views,
            self.config.img_size,
            self.teacher.input_size,
            self.augment,
            self.config.seed,
            self.config.jpeg_quality,
            view_indices=view_indices,
        )

    def loader(self, dataset: TeacherViews) -> torch.utils.data.DataLoader:
        views_per_image = len(dataset.view_indices)
        workers = self.config.workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=max(1, self.config.batch_size // views_per_image),
            num_workers=workers,
            collate_fn=collate_views,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    @torch.no_grad()
    def run_teacher(self, images: torch.Tensor) -> np.ndarray:
        """[N, 3, S, S] teacher views in [0, 1] to float32 targets [N, L, D], in batches."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        outputs = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start : start + self.config.batch_size].to(self.device, non_blocking=True)
            with autocast_context(self.device, dtype):
                outputs.append(self.teacher(chunk).float().cpu())
        return torch.cat(outputs).numpy()


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) source indices of every shard."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def calibration_indices(num_images: int, count: int) -> list[int]:
    """Evenly spaced images, so a folder sorted by class still calibrates on every class."""
    count = min(count, num_images)
    if count <= 0:
        return []
    return sorted(set(np.linspace(0, num_images - 1, count).round().astype(int).tolist()))


def fit_codec(job: ShardJob, writer: CacheWriter, info: DistInfo) -> None:
    """Fit the codec on view 0 of a calibration slice (rank 0), or load the stored fit."""
    if not job.codec.needs_fit:
        return
    state = writer.read_codec_state()
    if state is None and info.is_main:
        indices = calibration_indices(len(job.source), job.config.calibration_images)
        logger.info("fitting codec %s on view 0 of %d calibration images", job.codec.name, len(indices))
        items = _good_items(job.loader(job.views_dataset(indices, view_indices=[0])))
        if not items:
            raise UsageError(f"no calibration image of {job.config.data} could be decoded")
        targets = job.run_teacher(torch.cat([item.teacher_images for item in items]))
        job.codec.fit(targets)
        writer.write_codec_state(job.codec.state())
    barrier()
    if state is None:
        state = writer.read_codec_state()
    job.codec.load_state(state)


def _good_items(loader) -> list[ImageViews]:
    return [item for batch in loader for item in batch if item.skipped is None]


@dataclass
class ShardWriterLoop:
    """Writes shards one after another, counting skipped inputs against the allowed fraction."""

    job: ShardJob
    writer: CacheWriter
    enabled_progress: bool = True
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def run(self, shard_ids: list[int], ranges: list[tuple[int, int]]) -> None:
        total_images = sum(ranges[s][1] - ranges[s][0] for s in shard_ids)
        progress = ProgressReporter("cache-targets", total_images, enabled=self.enabled_progress)
        written_bytes = 0
        try:
            for done, shard_id in enumerate(shard_ids, start=1):
                record = self.write_one(shard_id, ranges[shard_id], progress)
                written_bytes += record.nbytes
                progress.advance(0, extra=f"shards {done}/{len(shard_ids)}, {written_bytes / 2**20:.1f} MiB written")
        finally:
            progress.close()

    def write_one(self, shard_id: int, image_range: tuple[int, int], progress: ProgressReporter):
        start, stop = image_range
        config = self.job.config
        items: list[ImageViews] = []
        targets: list[np.ndarray] = []
        shard_skipped = []

        # render views in the loader workers, run the teacher on each batch
        for batch in self.job.loader(self.job.views_dataset(list(range(start, stop)))):
            good = []
            for item in batch:
                if item.skipped is None:
                    good.append(item)
                    continue
                self._skip(item, shard_skipped)
            if good:
                output = self.job.run_teacher(torch.cat([item.teacher_images for item in good]))
                targets.append(output.reshape(len(good), config.views, *output.shape[1:]))
                items.extend(good)
            progress.advance(len(batch))

        # encode view-major and write the shard atomically
        data = self._shard_data(shard_id, items, targets)
        record = self.writer.write_shard(shard_id, data, image_range, num_images=len(items))
        skipped_path = Path(config.out) / "shards" / f"shard_{shard_id:06d}.skipped.json"
        atomic_write_json(skipped_path, [{"source": s, "reason": r} for s, r in shard_skipped])
        return record

    def _skip(self, item: ImageViews, shard_skipped: list) -> None:
        config = self.job.config
        if config.strict:
            raise UsageError(f"cannot use input {item.source}: {item.skipped} (--strict stops at the first bad input)")
        logger.warning("skipping %s: %s", item.source, item.skipped)
        shard_skipped.append((item.source, item.skipped))
        self.skipped.append((item.source, item.skipped))

        allowed = config.max_bad_fraction * len(self.job.source)
        if len(self.skipped) + len(self.job.source.skipped) > allowed:
            raise UsageError(
                f"{len(self.skipped) + len(self.job.source.skipped)} of {len(self.job.source)} inputs could not "
                f"be used, more than --max-bad-fraction {config.max_bad_fraction}; the last was {item.source} "
                f"({item.skipped}). Fix or remove the bad files, or raise --max-bad-fraction"
            )

    def _shard_data(self, shard_id: int, items: list[ImageViews], targets: list[np.ndarray]) -> ShardData:
        views = self.job.config.views
        codec = self.job.codec
        if targets:
            stacked = np.concatenate(targets)  # [N, K, L, D]
            view_major = np.ascontiguousarray(stacked.transpose(1, 0, 2, 3)).reshape(-1, *stacked.shape[2:])
        else:
            num_patches = self.job.teacher.grid_size[0] * self.job.teacher.grid_size[1]
            view_major = np.zeros((0, num_patches, self.job.teacher.target_dim), dtype=np.float32)
        try:
            parts = codec.encode(view_major)
        except (NonFiniteTargetError, TargetRangeError) as error:
            first, last = (items[0].source, items[-1].source) if items else ("", "")
            raise UsageError(f"teacher targets of shard {shard_id} ({first} .. {last}) cannot be stored: {error}") from error

        num_images = len(items)
        return ShardData(
            image_index=np.tile(np.array([item.index for item in items], dtype=np.int64), views),
            view_index=np.repeat(np.arange(views, dtype=np.int32), num_images),
            source=[item.source for item in items] * views,
            label=np.tile(np.array([item.label for item in items], dtype=np.int64), views),
            params=np.concatenate([np.stack([item.params[v] for item in items]) for v in range(views)])
            if items
            else np.zeros((0, 0)),
            jpeg=[item.jpeg[v] for v in range(views) for item in items],
            targets=parts,
        )


def finalize_cache(job: ShardJob, writer: CacheWriter, ranges, elapsed: float) -> dict:
    """Measure fidelity on held-out views, gather skipped inputs and write the final manifest."""
    root = Path(job.config.out)
    skipped = [{"source": s, "reason": r} for s, r in job.source.skipped]
    for path in sorted((root / "shards").glob("shard_*.skipped.json")):
        skipped.extend(json.loads(path.read_text()))

    manifest = writer.finalize({}, expected_shards=len(ranges))
    fidelity = measure_fidelity(job, root)
    extra = {
        "num_inputs": len(job.source) + len(job.source.skipped),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "fidelity": fidelity,
        "bytes_per_view": {**manifest_bytes_per_view(manifest), "targets": fidelity.get("bytes_per_view")},
        "source_path": str(Path(job.config.data).resolve()),
        "packages": package_versions(),
        "last_run_seconds": round(elapsed, 1),
    }
    manifest = writer.finalize(extra, expected_shards=len(ranges))
    logger.info(
        "cache %s: %d images, %d views each, %d samples, %d skipped; fidelity: cosine mean %.5f, "
        "p1 %.5f, relative MSE %.2e; %.0f bytes per view",
        root, manifest["num_images"], job.config.views, manifest["num_samples"], len(skipped),
        fidelity.get("cosine_mean", float("nan")), fidelity.get("cosine_p1", float("nan")),
        fidelity.get("relative_mse", float("nan")), extra["bytes_per_view"]["total"],
    )
    return manifest


def manifest_bytes_per_view(manifest: dict) -> dict:
    samples = max(1, manifest["num_samples"])
    total = sum(shard["nbytes"] for shard in manifest["shards"])
    return {"total": total / samples}


def measure_fidelity(job: ShardJob, root: Path) -> dict:
    """Compare stored targets with a fresh teacher pass on held-out views (not calibration images)."""
    count = job.config.fidelity_views
    if count <= 0:
        return {}
    reader = CacheReader(root)
    excluded = set(calibration_indices(len(job.source), job.config.calibration_images)) if job.codec.needs_fit else set()
    records = sorted(reader.shards, key=lambda record: record.shard_id)
    stride = max(1, len(records) // max(1, math.ceil(count / max(1, job.config.shard_size))))

    stored, indices = [], []
    for record in records[::stride]:
        data = reader.read_shard(record.shard_id, 0)
        keep = [i for i in range(len(data)) if int(data.image_index[i]) not in excluded][: count - len(indices)]
        if keep:
            subset = data.select(np.array(keep))
            stored.append(subset)
            indices.extend(int(i) for i in subset.image_index)
        if len(indices) >= count:
            break
    if not indices:
        return {}

    position = {record.index: i for i, record in enumerate(job.source.records)}
    items = _good_items(job.loader(job.views_dataset([position[i] for i in indices], view_indices=[0])))
    exact = job.run_teacher(torch.cat([item.teacher_images for item in items]))
    parts = {name: np.concatenate([piece.targets[name] for piece in stored]) for name in stored[0].targets}
    decoded = job.codec.decode(parts)
    target_bytes = encoded_nbytes(parts, job.codec.compressor)
    report = fidelity_report(exact, decoded, bytes_per_view=target_bytes)
    report["num_views"] = len(indices)
    report["held_out"] = "view 0 of images outside the codec calibration slice"
    return report
