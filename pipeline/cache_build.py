"""The work of stage one: codec calibration, the teacher pass over each shard, fidelity, manifest.

Every file a shard leaves behind is written before its ``.done.json`` record, the record that
marks the shard finished: first ``shards/<name>.skipped.json`` (the inputs of the shard that
could not be used), then the shard files. A run killed at any point therefore resumes with
complete bookkeeping for every finished shard.
"""

from __future__ import annotations

import itertools
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_json, naming_disk_full
from pipeline.cache import CacheWriter, ShardData, ShardRecord, shard_name
from pipeline.cache.manifest import done_record_path, read_json
from pipeline.cache.wds_store import read_wds_view, tar_name
from pipeline.cache.zarr_store import read_zarr_shard
from pipeline.codecs import NonFiniteTargetError, TargetRangeError, encoded_nbytes, fidelity_report
from pipeline.config import CacheConfig
from pipeline.data.teacher_views import ImageViews, TeacherViews, collate_views
from pipeline.data.workers import exit_with_parent_init
from pipeline.distributed import DistInfo, barrier
from pipeline.engine import autocast_context, autocast_dtype_for
from pipeline.errors import CorruptCacheError, UsageError
from pipeline.logs import ProgressReporter
from pipeline.provenance import package_versions
from pipeline.sources import ImageSource, count_reasons, is_bad_input, printable_source

logger = logging.getLogger(__name__)

# Below this mean cosine between stored and exact targets the cache is suspect: the lossiest
# codec measured on the bundled photos (pca-64) still reaches about 0.97.
LOW_FIDELITY_COSINE = 0.9


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

    @property
    def images_per_batch(self) -> int:
        """Images per loader batch: `--batch-size` counts views, and each image brings all its views."""
        return max(1, self.config.batch_size // self.config.views)

    def loader(
        self, dataset: TeacherViews, batch_sampler: list[list[int]] | None = None
    ) -> torch.utils.data.DataLoader:
        """Return a loader of `dataset` in order, or of the dataset positions in `batch_sampler`."""
        workers = self.config.workers
        batching = (
            {"batch_sampler": batch_sampler}
            if batch_sampler is not None
            else {"batch_size": max(1, self.config.batch_size // len(dataset.view_indices))}
        )
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=workers,
            collate_fn=collate_views,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=exit_with_parent_init() if workers > 0 else None,
            **batching,
        )

    @torch.no_grad()
    def run_teacher(self, images: torch.Tensor) -> np.ndarray:
        """[N, 3, S, S] teacher views in [0, 1] to float32 targets [N, L, D], in batches."""
        dtype = autocast_dtype_for(self.config.precision, self.device)
        outputs = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start : start + self.config.batch_size].to(self.device, non_blocking=True)
            with autocast_context(self.device, dtype):
                outputs.append(self.teacher(chunk).float().cpu())
        return torch.cat(outputs).numpy()

    def bad_at_index(self) -> list[tuple[str, str]]:
        """Return the broken inputs found while indexing, without entries that were never images (OS junk, .txt)."""
        return [(source, reason) for source, reason in self.source.skipped if is_bad_input(reason)]

    def num_inputs(self) -> int:
        """Return the inputs that ``--max-bad-fraction`` refers to: indexed images and broken inputs."""
        return len(self.source) + len(self.bad_at_index())

    def allowed_bad_inputs(self) -> float:
        """Return how many inputs may be skipped before the run stops (``--max-bad-fraction``)."""
        return self.config.max_bad_fraction * self.num_inputs()


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
    """Fit the codec on view 0 of a calibration slice, or load the stored fit.

    Rank 0 alone fits and writes the state. Every rank then meets at a barrier and loads the
    stored state, so all shards are encoded with the same fit.
    """
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


def skipped_path(root: Path, shard_id: int) -> Path:
    """Return the file listing the skipped inputs of one shard, ``shards/<name>.skipped.json``."""
    return Path(root) / "shards" / f"{shard_name(shard_id)}.skipped.json"


def read_skipped(root: Path, shard_ids: list[int]) -> list[dict]:
    """Return the skipped inputs, {"source", "reason"}, of finished shards in shard order.

    Raises CorruptCacheError when a finished shard has no skipped-inputs file.
    """
    skipped = []
    for shard_id in sorted(shard_ids):
        path = skipped_path(root, shard_id)
        if not path.is_file():
            done = done_record_path(root, shard_name(shard_id)).relative_to(root)
            raise CorruptCacheError(
                f"shard {shard_name(shard_id)} of {root} is recorded as finished but {path.name} is missing: "
                f"delete {done} and rerun cache-targets with the same settings to write the shard again"
            )
        skipped.extend(read_json(path))
    return skipped


@dataclass
class TeacherPass:
    """The teacher's output for one shard: good items, their targets [n, K, L, D] per batch, skipped inputs."""

    items: list[ImageViews] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ShardWriterLoop:
    """Writes shards one after another, counting skipped inputs against the allowed fraction.

    ``skipped_before`` is the number of bad inputs skipped before this loop started: while
    indexing the source and in shards that an earlier run finished.
    """

    job: ShardJob
    writer: CacheWriter
    enabled_progress: bool = True
    skipped_before: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards_written: int = 0
    written_bytes: int = 0

    def run(self, shard_ids: list[int], ranges: list[tuple[int, int]]) -> None:
        """Write the shards `shard_ids`, whose source index ranges are `ranges[shard_id]`.

        One loader renders the views of every shard in turn, so its workers prepare the next
        shard while the teacher finishes this one. A background thread encodes and writes each
        finished shard while the teacher runs on the next. At most one write is pending, so host
        memory contains the float32 targets of up to two shards, plus the encoding copies of the
        one being written. A failed write stops the teacher pass at its next batch.
        """
        self._check_bad_at_index()
        if not shard_ids:
            return
        total_images = sum(ranges[s][1] - ranges[s][0] for s in shard_ids)
        progress = ProgressReporter("cache-targets", total_images, enabled=self.enabled_progress)
        batches = iter(self._shard_loader(shard_ids, ranges))
        pending: Future | None = None
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer_thread:
                try:
                    for shard_id in shard_ids:
                        start, stop = ranges[shard_id]
                        count = math.ceil((stop - start) / self.job.images_per_batch)
                        teacher_pass = self._teacher_pass(itertools.islice(batches, count), progress, pending)
                        self._wait(pending, progress, len(shard_ids))
                        pending = writer_thread.submit(self.write_one, shard_id, ranges[shard_id], teacher_pass)
                        del teacher_pass
                    self._wait(pending, progress, len(shard_ids))
                except BaseException as error:
                    _log_lost_write(pending, error)
                    raise
        finally:
            progress.close()

    def _shard_loader(self, shard_ids: list[int], ranges: list[tuple[int, int]]) -> torch.utils.data.DataLoader:
        """Return one loader over the images of all `shard_ids`. No batch spans two shards."""
        indices: list[int] = []
        batch_positions: list[list[int]] = []
        for shard_id in shard_ids:
            start, stop = ranges[shard_id]
            first = len(indices)
            indices.extend(range(start, stop))
            for batch_start in range(first, len(indices), self.job.images_per_batch):
                batch_positions.append(list(range(batch_start, min(batch_start + self.job.images_per_batch, len(indices)))))
        return self.job.loader(self.job.views_dataset(indices), batch_sampler=batch_positions)

    def _wait(self, pending: Future | None, progress: ProgressReporter, num_shards: int) -> None:
        """Wait for the write in `pending`, raising its error, and report it."""
        if pending is None:
            return
        record = pending.result()
        self.written_bytes += record.nbytes
        self.shards_written += 1
        progress.advance(0, extra=f"shards {self.shards_written}/{num_shards}, {self.written_bytes / 2**20:.1f} MiB written")

    def _teacher_pass(self, batches, progress: ProgressReporter, pending: Future | None) -> TeacherPass:
        """Run the teacher on the good images of one shard's batches and collect the skipped ones.

        Raises the error of the `pending` write of the previous shard as soon as it fails.
        """
        result = TeacherPass()
        for batch in batches:
            if pending is not None and pending.done():
                pending.result()
            good = []
            for item in batch:
                if item.skipped is None:
                    good.append(item)
                    continue
                self._skip(item, result.skipped)
            if good:
                output = self.job.run_teacher(torch.cat([item.teacher_images for item in good]))
                result.targets.append(output.reshape(len(good), self.job.config.views, *output.shape[1:]))
                for item in good:
                    item.teacher_images = None  # float32 views, as large as the targets and not needed again
                result.items.extend(good)
            progress.advance(len(batch))
        return result

    def write_one(self, shard_id: int, image_range: tuple[int, int], teacher_pass: TeacherPass) -> ShardRecord:
        """Encode the targets of one shard and write its skipped list, then the shard itself."""
        config = self.job.config
        data = self._shard_data(shard_id, teacher_pass.items, teacher_pass.targets)

        # Write the skipped list first, because the shard counts as finished once write_shard records it.
        atomic_write_json(
            skipped_path(Path(config.out), shard_id), [{"source": s, "reason": r} for s, r in teacher_pass.skipped]
        )
        # zarr's writes raise a disk-full OSError without a file name
        with naming_disk_full(self.writer.shards_dir / shard_name(shard_id)):
            return self.writer.write_shard(shard_id, data, image_range, num_images=len(teacher_pass.items))

    def _check_bad_at_index(self) -> None:
        """Stop before the teacher pass when indexing already found too many broken inputs, or any with --strict."""
        bad = self.job.bad_at_index()
        if bad and self.job.config.strict:
            source, reason = bad[0]
            raise UsageError(
                f"cannot use input {printable_source(source)}: {reason} (--strict stops at the first bad input)"
            )
        if bad:
            self._check_count(*bad[-1])

    def _skip(self, item: ImageViews, shard_skipped: list) -> None:
        source = printable_source(item.source)
        if self.job.config.strict:
            raise UsageError(f"cannot use input {source}: {item.skipped} (--strict stops at the first bad input)")
        logger.warning("skipping %s: %s", source, item.skipped)
        shard_skipped.append((source, item.skipped))
        self.skipped.append((source, item.skipped))
        self._check_count(source, item.skipped)

    def _check_count(self, last_source: str, last_reason: str) -> None:
        count = self.skipped_before + len(self.skipped)
        if count > self.job.allowed_bad_inputs():
            raise UsageError(
                f"{count} of {self.job.num_inputs()} inputs could not be used, more than --max-bad-fraction "
                f"{self.job.config.max_bad_fraction}; the last was {printable_source(last_source)} ({last_reason}). "
                "Fix or remove the bad files, or raise --max-bad-fraction"
            )

    def _shard_data(self, shard_id: int, items: list[ImageViews], targets: list[np.ndarray]) -> ShardData:
        views = self.job.config.views
        codec = self.job.codec
        if targets:
            view_major = _view_major(targets)
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
            source=[printable_source(item.source) for item in items] * views,
            label=np.tile(np.array([item.label for item in items], dtype=np.int64), views),
            params=np.concatenate([np.stack([item.params[v] for item in items]) for v in range(views)])
            if items
            else np.zeros((0, 0)),
            jpeg=[item.jpeg[v] for v in range(views) for item in items],
            targets=parts,
        )


def _view_major(targets: list[np.ndarray]) -> np.ndarray:
    """Copy per-batch targets [n, K, L, D] into one view-major array [K * N, L, D], emptying `targets`.

    One copy, and each batch is freed once copied, so a shard's targets exist about once in memory.
    """
    num_images = sum(batch.shape[0] for batch in targets)
    views, num_patches, dim = targets[0].shape[1:]
    view_major = np.empty((views, num_images, num_patches, dim), dtype=np.float32)
    row = 0
    while targets:
        batch = targets.pop(0)
        view_major[:, row : row + len(batch)] = batch.transpose(1, 0, 2, 3)
        row += len(batch)
    return view_major.reshape(views * num_images, num_patches, dim)


def _log_lost_write(pending: Future | None, error: BaseException) -> None:
    """Wait for the shard write in `pending` while `error` stops the run, and log its own error.

    The write finishes either way: a shard is either complete or left for the next run.
    """
    if pending is None:
        return
    if not pending.done():
        logger.info("finishing the shard write in progress before stopping")
    write_error = pending.exception()
    if write_error is not None and write_error is not error:
        logger.error("the shard write in progress failed as well: %s", write_error)


def finalize_cache(job: ShardJob, writer: CacheWriter, ranges: list[tuple[int, int]], elapsed: float) -> dict:
    """Measure fidelity on held-out views, gather skipped inputs and write the final manifest.

    Call it from one process after every shard is finished. The manifest is written once, at
    the end, so a cache marked complete always contains its fidelity and skipped inputs.
    Raises UsageError when shards are missing, or when the inputs skipped by all processes
    together exceed ``--max-bad-fraction``.
    """
    root = Path(job.config.out)
    records = finished_records(root, len(ranges))
    skipped = [{"source": printable_source(s), "reason": r} for s, r in job.source.skipped]
    skipped.extend(read_skipped(root, [record.shard_id for record in records]))
    _check_bad_fraction(job, skipped)

    fidelity = measure_fidelity(job, writer, records)
    num_samples = max(1, sum(record.num_samples for record in records))
    extra = {
        "num_inputs": len(job.source) + len(job.source.skipped),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "fidelity": fidelity,
        "bytes_per_view": {
            "total": sum(record.nbytes for record in records) / num_samples,
            "targets": fidelity.get("bytes_per_view"),
        },
        "source_path": str(Path(job.config.data).resolve()),
        "packages": package_versions(),
        "last_run_seconds": round(elapsed, 3),
    }
    manifest = writer.finalize(extra, expected_shards=len(ranges))
    logger.info(
        "cache %s: %d images, %d views each, %d samples, %d skipped; fidelity: cosine mean %.5f, "
        "p1 %.5f, relative MSE %.2e; %.0f bytes per view",
        root, manifest["num_images"], job.config.views, manifest["num_samples"], len(skipped),
        fidelity.get("cosine_mean", float("nan")), fidelity.get("cosine_p1", float("nan")),
        fidelity.get("relative_mse", float("nan")), extra["bytes_per_view"]["total"],
    )
    if fidelity.get("cosine_mean", 1.0) < LOW_FIDELITY_COSINE:
        logger.warning(
            "stored targets of %s match a fresh teacher pass poorly (cosine mean %.3f < %.2f): the codec is too "
            "lossy for these targets, or shards were written by a different teacher; run maskdistill verify and "
            "check the teacher weights", root, fidelity["cosine_mean"], LOW_FIDELITY_COSINE,
        )
    if skipped:
        logger.warning(
            "skipped %d of %d inputs (%s); the \"skipped\" list of %s names each with its reason",
            len(skipped), extra["num_inputs"], count_reasons((item["source"], item["reason"]) for item in skipped),
            root / "manifest.json",
        )
    return manifest


def finished_records(root: Path, num_shards: int) -> list[ShardRecord]:
    """Return the records of the finished shards among ``range(num_shards)``, in shard order."""
    records = []
    for shard_id in range(num_shards):
        path = done_record_path(root, shard_name(shard_id))
        if path.is_file():
            records.append(ShardRecord.from_json(read_json(path)))
    return records


def _check_bad_fraction(job: ShardJob, skipped: list[dict]) -> None:
    """Raise UsageError when the skipped inputs of all processes exceed ``--max-bad-fraction``.

    Each process stops at the limit on its own count, so with several processes the total is
    checked here once more.
    """
    bad = [item for item in skipped if is_bad_input(item["reason"])]
    if len(bad) <= job.allowed_bad_inputs():
        return
    raise UsageError(
        f"{len(bad)} of {job.num_inputs()} inputs could not be used, more than --max-bad-fraction "
        f"{job.config.max_bad_fraction} (the manifest lists them once the cache is finalized; the first was "
        f"{bad[0]['source']}: {bad[0]['reason']}). Fix or remove the bad files and write a new cache, "
        "or rerun the same command with a higher --max-bad-fraction to finish this one"
    )


def read_written_view(writer: CacheWriter, record: ShardRecord, view: int) -> ShardData:
    """Read one view slice of a shard this run wrote, before the manifest is final."""
    if writer.fmt == "zarr":
        folder = writer.shards_dir / record.name
        data, _ = read_zarr_shard(folder, record.name, view, record.num_images, writer.layout)
        return data
    tar = writer.shards_dir / tar_name(record.name, view)
    data, _ = read_wds_view(tar.read_bytes(), record.name, view, record.num_images, writer.layout)
    return data


def spread_order(count: int, picks: int) -> list[int]:
    """Order ``range(count)`` so that the first ``picks`` entries are spread evenly across it."""
    first = calibration_indices(count, picks)
    chosen = set(first)
    return first + [i for i in range(count) if i not in chosen]


def measure_fidelity(job: ShardJob, writer: CacheWriter, records: list[ShardRecord]) -> dict:
    """Compare stored targets with a fresh teacher pass on view 0 of held-out images.

    The held-out images are those outside the calibration slice (``calibration_indices``),
    taken from shards spread across the cache. The slice is excluded for every codec, so
    caches of one source with different codecs are measured on the same views. When the slice
    covers every image, a fitted codec has no held-out view and no fidelity, and a fixed codec
    is measured on all images.
    """
    count = job.config.fidelity_views
    if count <= 0:
        return {}
    excluded = set(calibration_indices(len(job.source), job.config.calibration_images))
    if len(excluded) >= len(job.source) and not job.codec.needs_fit:
        excluded = set()

    per_shard = max(1, job.config.shard_size)
    stored, indices = [], []
    for position in spread_order(len(records), math.ceil(count / per_shard)):
        data = read_written_view(writer, records[position], 0)
        keep = [i for i in range(len(data)) if int(data.image_index[i]) not in excluded][: count - len(indices)]
        if keep:
            subset = data.select(np.array(keep))
            stored.append(subset)
            indices.extend(int(i) for i in subset.image_index)
        if len(indices) >= count:
            break
    if not indices:
        logger.warning(
            "fidelity not measured: every image of %s is in the %d-image calibration slice of codec %s; "
            "lower --calibration-images to hold some out",
            job.config.data, job.config.calibration_images, job.codec.name,
        )
        return {}

    position = {record.index: i for i, record in enumerate(job.source.records)}
    items = _good_items(job.loader(job.views_dataset([position[i] for i in indices], view_indices=[0])))
    exact = job.run_teacher(torch.cat([item.teacher_images for item in items]))
    parts = {name: np.concatenate([piece.targets[name] for piece in stored]) for name in stored[0].targets}
    decoded = job.codec.decode(parts)
    target_bytes = encoded_nbytes(parts, job.codec.compressor, job.codec.compression_level)
    report = fidelity_report(exact, decoded, bytes_per_view=target_bytes)
    report["num_views"] = len(indices)
    report["held_out"] = (
        f"view 0 of {len(indices)} images outside the {len(excluded)}-image calibration slice"
        if excluded
        else f"view 0 of {len(indices)} images"
    )
    return report
