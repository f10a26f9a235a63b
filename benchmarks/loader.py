"""Loader throughput: samples/s of `CachedViews` batches in one process, that is per worker and core.

For each codec a one-view zarr cache is written with `CacheWriter`: real JPEG student views of
the bundled photos and synthetic targets (196 x 768 at full scale) encoded by the codec. One pass
reads a whole epoch in the trainer's order (`plan_epoch`), batch by batch through
`CachedViews.__getitems__`: shard reads, target decoding, mask sampling and JPEG decoding. The
reference side decodes the same JPEG bytes alone with `torchvision.io.decode_jpeg`. The
passes of every codec and the reference alternate, round after round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from benchmarks.harness import (
    PHOTOS,
    BenchOptions,
    Goal,
    interleave,
    logger,
    measurement,
    median,
    rounded,
    run_module,
    setup_record,
    synchronize,
)
from benchmarks.synthetic import CacheSpec, render_student_views, write_synthetic_cache
from pipeline.cache import CacheReader
from pipeline.codecs import build_codec
from pipeline.data.cached import CachedViews
from pipeline.data.order import plan_epoch
from pipeline.masking import MaskConfig, sample_masks

NAME = "loader"
TITLE = "Loader throughput per core"
GOAL = Goal(">=", 800.0)
CODECS = (
    "fp16",
    "bf16",
    "int8-channel",
    "int8-token",
    "pca-64",
    "fp16+zstd",
    "bf16+zstd",
    "int8-channel+zstd",
    "int8-token+zstd",
    "pca-64+zstd",
)
DESCRIPTION = (
    "Samples/s of `CachedViews.__getitems__` in one process (one DataLoader worker, one core, "
    "`torch.set_num_threads(1)`), for 224 px JPEG student views with 196 x 768 targets in each codec. "
    "A pass reads one epoch in the trainer's batch order: shard reads, block-mask sampling, JPEG "
    "decoding, and gathering the stored target parts of the batch. The workers send the stored parts "
    "(int8 codes, float16 scales or values) and the trainer expands them on its device "
    "(`finish_targets`), so the loader's rate leaves that out and `finish_per_s` reports it, timed "
    "on the benchmark's device. The cache files sit in the OS page cache, because they were just "
    "written. The reference is `torchvision.io.decode_jpeg` alone on the same JPEG bytes, measured in "
    "the same rounds. The ratio is the loader's samples/s per core. The raw figures also time the parts "
    "of a batch alone (`shard_read_per_s`, `target_parts_per_s`, `mask_sampling_per_s`, "
    "`jpeg_decode_per_s`), so the slowest part shows where the loader spends its time."
)


@dataclass(frozen=True)
class LoaderScale:
    """Size of the loader benchmark."""

    samples: int
    shard_size: int
    batch_size: int
    img_size: int
    patch_size: int
    target_dim: int
    rounds: int


SCALES = {
    "full": LoaderScale(samples=512, shard_size=128, batch_size=64, img_size=224, patch_size=16, target_dim=768, rounds=5),
    "quick": LoaderScale(samples=16, shard_size=8, batch_size=8, img_size=64, patch_size=16, target_dim=64, rounds=1),
}


def epoch_batches(dataset: CachedViews, batch_size: int, epoch: int) -> list[list[tuple[int, int, int]]]:
    """Return the (epoch, view, sample id) items of every batch of one epoch, in the trainer's order."""
    plan = plan_epoch(dataset.layout.groups(), seed=0, epoch=epoch, batch_size=batch_size)
    return [[(epoch, 0, int(sample_id)) for sample_id in batch] for batch in plan.batches]


def loader_pass(root: Path, batch_size: int) -> float:
    """Read one epoch with a fresh `CachedViews` (no shard in memory yet) and return samples/s."""
    dataset = CachedViews(root, MaskConfig(*_grid(root)), seed=0)
    batches = epoch_batches(dataset, batch_size, epoch=0)

    start = time.perf_counter()
    for items in batches:
        dataset.__getitems__(items)
    elapsed = time.perf_counter() - start
    return sum(len(items) for items in batches) / elapsed


def jpeg_pass(jpegs: list[torch.Tensor], batch_size: int) -> float:
    """Decode every JPEG in batches with `torchvision.io.decode_jpeg` and return samples/s."""
    start = time.perf_counter()
    for first in range(0, len(jpegs), batch_size):
        decoded = torchvision.io.decode_jpeg(jpegs[first : first + batch_size], mode=torchvision.io.ImageReadMode.RGB)
        torch.stack(decoded)
    return len(jpegs) / (time.perf_counter() - start)


def _grid(root: Path) -> tuple[int, int]:
    grid = CacheReader(root).manifest["settings"]["targets"]["grid"]
    return int(grid[0]), int(grid[1])


def component_rates(root: Path, batch_size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Time the parts of a batch alone and return samples/s of each.

    The parts: reading a shard's view slice (sha256 already checked), wrapping the targets of
    one batch as the loader does (`loader_parts`), and sampling its masks. `finish_per_s` times
    the trainer's side of target decoding (`finish` on `device`), which no longer runs in the loader.
    """
    reader = CacheReader(root)
    record = reader.shards[0]
    data = reader.read_shard(record.shard_id, 0)
    read_seconds = _best_seconds(lambda: reader.read_shard(record.shard_id, 0), repeats)
    count = min(batch_size, len(data))
    parts = {name: part[:count] for name, part in data.targets.items()}
    codec = build_codec(reader.manifest["settings"]["codec"]["name"])
    if codec.needs_fit:
        codec.load_state(reader.codec_state())
    mask_config = MaskConfig(*_grid(root))
    on_device = {name: part.to(device) for name, part in codec.loader_parts(parts).items()}

    return {
        "shard_read_per_s": record.num_images / read_seconds,
        "target_parts_per_s": count / _best_seconds(lambda: codec.loader_parts(parts), repeats),
        "finish_per_s": count / _best_seconds(lambda: (codec.finish(on_device), synchronize(device)), repeats),
        "mask_sampling_per_s": count / _best_seconds(lambda: sample_masks(mask_config, 0, 0, range(count)), repeats),
    }


def _best_seconds(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def run(options: BenchOptions, workdir: Path) -> list[dict]:
    scale = SCALES["quick" if options.quick else "full"]
    codecs = CODECS
    views = render_student_views(PHOTOS, min(scale.samples, 256), scale.img_size)
    jpegs = [torch.frombuffer(bytearray(view.jpeg), dtype=torch.uint8) for view in views]
    jpegs = [jpegs[index % len(jpegs)] for index in range(scale.samples)]

    roots = {}
    for codec in codecs:
        spec = CacheSpec(scale.samples, scale.shard_size, scale.img_size, scale.patch_size, scale.target_dim, codec)
        roots[codec] = write_synthetic_cache(workdir / codec.replace("+", "-"), spec, views)

    sides: dict[str, Callable[[], float]] = {
        codec: (lambda root=root: loader_pass(root, scale.batch_size)) for codec, root in roots.items()
    }
    sides["jpeg decode only"] = lambda: jpeg_pass(jpegs, scale.batch_size)
    logger.info("loader: %d codecs, %d samples each, %d rounds", len(codecs), scale.samples, scale.rounds)
    values = interleave(sides, scale.rounds, warmup_rounds=1)

    jpeg_rate = median(values["jpeg decode only"])
    records = []
    for codec, root in roots.items():
        rate = median(values[codec])
        raw = {
            "samples_per_s": rate,
            "samples_per_s_rounds": rounded(values[codec]),
            "jpeg_decode_per_s": jpeg_rate,
            "jpeg_decode_per_s_rounds": rounded(values["jpeg decode only"]),
            "share_of_jpeg_decode_rate": rate / jpeg_rate,
            "target_bytes_per_sample": _target_bytes_per_sample(root),
            "jpeg_bytes_per_sample": float(np.mean([len(view.jpeg) for view in views])),
            **component_rates(root, scale.batch_size, repeats=3, device=options.device),
        }
        setup = setup_record(
            options,
            codec=codec,
            samples=scale.samples,
            shard_size=scale.shard_size,
            batch_size=scale.batch_size,
            img_size=scale.img_size,
            targets=f"{scale.img_size // scale.patch_size}x{scale.img_size // scale.patch_size} patches x {scale.target_dim}",
            processes=1,
            rounds=scale.rounds,
        )
        records.append(measurement(NAME, codec, rate, GOAL, raw, setup))
    return records


def _target_bytes_per_sample(root: Path) -> float:
    reader = CacheReader(root)
    target_bytes = 0
    for record in reader.shards:
        target_bytes += sum((root / path).stat().st_size for path in record.files if "/targets/" in path)
    return target_bytes / reader.num_samples()


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_module(__doc__.splitlines()[0], run, argv, default_threads=1)


if __name__ == "__main__":
    main()
