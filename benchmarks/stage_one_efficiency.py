"""Stage-one efficiency: `cache-targets` views/s over the teacher's forward pass alone on tensors in memory.

The cache side is a real `run_cache_targets` on copies of the bundled photos. Its rate is the
views it stored over the seconds of its shard loop (view rendering, teacher, codec and shard
writes) after the first shard, without the teacher build and the fidelity check. The other side runs the same teacher (random
weights) on a batch already on the device. The decode rates per core render views with
`pipeline.images` and `pipeline.views` in this process, with JPEG draft mode and without it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import pipeline.images
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
    run_python_module,
    setup_record,
)
from benchmarks.synthetic import photo_paths
from benchmarks.training import TeacherForward
from pipeline.cache_build import ShardWriterLoop
from pipeline.config import CacheConfig, config_to_dict, resolve_config
from pipeline.distributed import DistInfo, resolve_device
from pipeline.data.teacher_views import TeacherViews
from pipeline.images import load_image
from pipeline.sources import open_source
from pipeline.teachers import build_teacher
from pipeline.views import AugmentConfig, render_views, sample_view_params
from stages.cache_targets import run_cache_targets

NAME = "stage_one_efficiency"
TITLE = "Stage-one efficiency"
GOAL = Goal(">=", 0.9)
DESCRIPTION = (
    "`cache-targets` views/s divided by the views/s of the same teacher's forward pass on a batch already "
    "in device memory. The cache-targets rate is the stored views over the seconds of its shard loop "
    "(`ShardWriterLoop.run`: view rendering, teacher, codec and shard writes) after the first shard, which "
    "is the warm-up of its freshly built teacher. The teacher side leaves out as many batches. Every round "
    "of each side runs in a fresh process. On a GPU one loader worker renders the views. On a CPU device "
    "they render in the main process (`--workers 0`), because a worker process takes a core from the "
    "teacher's threads, which then wait for each other. Teacher `clip_vit_base_patch16` with random "
    "weights, 224 px student views, fp16 codec, zarr format. The raw figures add three rates per core. The "
    "first two render one view (decode the full-size JPEG, crop, resize to the student and teacher sizes, "
    "jitter) with JPEG draft mode and without it. The third builds a whole stage-one item (the same plus "
    "JPEG encoding of the student view and the teacher view as a tensor)."
)
SINGLE_CORE_THREADS = 1


@dataclass(frozen=True)
class StageOneScale:
    """Size of the stage-one benchmark."""

    teacher: str
    teacher_overrides: dict | None
    img_size: int
    images: int
    views: int
    batch_size: int
    shard_size: int
    workers: int
    rounds: int
    render_photos: int | None  # photos of the decode rates; None for all


SCALES = {
    # cache-targets builds a fresh teacher, whose first batches run slower than later ones, so the
    # full run has 16 batches, which keeps that warm-up a small part of the loop
    "full": StageOneScale(
        teacher="clip_vit_base_patch16", teacher_overrides=None, img_size=224, images=64, views=4,
        batch_size=16, shard_size=16, workers=1, rounds=3, render_photos=None,
    ),
    "quick": StageOneScale(
        teacher="clip_vit_base_patch16",
        teacher_overrides={"width": 64, "layers": 2, "heads": 2, "patch_size": 16, "embed_dim": 32},
        img_size=64, images=4, views=1, batch_size=4, shard_size=2, workers=0, rounds=1, render_photos=8,
    ),
}
PATCH_SIZE = 16
SIDE_FLAG = "--side"


def loader_workers(scale: StageOneScale, device: torch.device) -> int:
    """Return the loader workers of the cache-targets side: none on a CPU device, see DESCRIPTION."""
    return 0 if device.type == "cpu" else scale.workers


def copy_photos(folder: Path, count: int) -> Path:
    """Copy the first `count` bundled photos into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in photo_paths(PHOTOS, count):
        shutil.copy(path, folder / path.name)
    return folder


def cache_views_per_s(config: CacheConfig) -> float:
    """Run `cache-targets` into a fresh folder and return its views/s after the first shard.

    The rate counts the views of every shard but the first over the seconds from the end of the
    first shard's teacher pass to the end of the shard loop. The first shard is the warm-up of
    the freshly built teacher, as the teacher side leaves out its first batch.
    """
    out = Path(config.out)
    if out.exists():
        shutil.rmtree(out)
    passes: list[tuple[float, int]] = []
    loop_ends: list[float] = []
    with timed_shard_loop(passes, loop_ends):
        run_cache_targets(config)
    shutil.rmtree(out)
    if len(passes) < 2:
        raise RuntimeError(f"cache-targets wrote {len(passes)} shard(s); the rate needs at least 2")
    views_after_first = sum(views for _, views in passes[1:])
    return views_after_first / (loop_ends[-1] - passes[0][0])


def teacher_views_per_s(config: CacheConfig) -> float:
    """Return the views/s of the config's teacher on a batch in device memory.

    It runs as many batches as one cache-targets run of `config`. The batches of one shard are
    left out as warm-up, as the cache-targets side leaves out its first shard.
    """
    teacher = TeacherForward(
        config.teacher, config.batch_size, config.img_size, config.student_patch_size, resolve_device(config.device, DistInfo()),
        config.teacher_overrides,
    )
    num_images = len(photo_paths(Path(config.data)))
    num_views = num_images * config.views
    shard_batches = -(-min(config.shard_size, num_images) * config.views // config.batch_size)
    total_batches = -(-num_views // config.batch_size)
    return teacher.img_per_s(max(1, total_batches - shard_batches), warmup_batches=shard_batches)


SIDES = {"cache-targets": cache_views_per_s, "teacher forward": teacher_views_per_s}


def views_per_s_in_subprocess(side: str, config: CacheConfig, workdir: Path) -> float:
    """Return the rate of `side` (a key of SIDES) measured in a fresh Python process with this process's thread count.

    The stage-two trainer runs slowed down when repeated in one long process, so every round of
    both sides gets a process of its own, as a user's run would.
    """
    config_file = workdir / "stage-one-run.json"
    config_file.write_text(json.dumps(config_to_dict(config)))
    output = run_python_module(["benchmarks.stage_one_efficiency", SIDE_FLAG, side, str(config_file)])
    return float(json.loads(output.strip().splitlines()[-1])["views_per_s"])


def side_main(side: str, config_file: Path) -> None:
    """Print the rate of `side` for the config in `config_file` as one JSON line (the subprocess)."""
    config = resolve_config(CacheConfig, json.loads(config_file.read_text()), {}, source=str(config_file))
    print(json.dumps({"views_per_s": SIDES[side](config)}))


@contextmanager
def timed_shard_loop(passes: list[tuple[float, int]], loop_ends: list[float]) -> Iterator[None]:
    """Record, in the block, the end time and view count of every shard's teacher pass, and the end of each shard loop.

    A shard's views count when its teacher pass ends. Its encoding and writing overlap the next
    pass and finish before the loop ends.
    """
    original_pass, original_run = ShardWriterLoop._teacher_pass, ShardWriterLoop.run

    def teacher_pass(self, *args, **kwargs):
        result = original_pass(self, *args, **kwargs)
        passes.append((time.perf_counter(), len(result.items) * self.job.config.views))
        return result

    def run(self, *args, **kwargs):
        try:
            return original_run(self, *args, **kwargs)
        finally:
            loop_ends.append(time.perf_counter())

    ShardWriterLoop._teacher_pass, ShardWriterLoop.run = teacher_pass, run
    try:
        yield
    finally:
        ShardWriterLoop._teacher_pass, ShardWriterLoop.run = original_pass, original_run


@contextmanager
def full_size_decoding() -> Iterator[None]:
    """Turn off JPEG draft mode in `pipeline.images` for the duration of the block."""
    saved = pipeline.images.DRAFT_REDUCTIONS
    pipeline.images.DRAFT_REDUCTIONS = (1,)
    try:
        yield
    finally:
        pipeline.images.DRAFT_REDUCTIONS = saved


def render_per_s(encoded: list[tuple[str, bytes]], sizes: list[int], draft: bool) -> float:
    """Render view 0 of every photo at `sizes` from its encoded bytes and return views/s."""
    augment = AugmentConfig()
    start = time.perf_counter()
    with nullcontext() if draft else full_size_decoding():
        for index, (name, data) in enumerate(encoded):
            image = load_image(data, name)
            params = sample_view_params(image.size, 0, index, 0, augment)
            render_views(image, params, sizes, augment)
    return len(encoded) / (time.perf_counter() - start)


def stage_one_items_per_s(dataset: TeacherViews) -> float:
    """Build every stage-one item of `dataset` (all views, JPEG-encoded student views) and return views/s."""
    start = time.perf_counter()
    for position in range(len(dataset)):
        dataset[position]
    return len(dataset) * len(dataset.view_indices) / (time.perf_counter() - start)


def run(options: BenchOptions, workdir: Path) -> list[dict]:
    scale = SCALES["quick" if options.quick else "full"]
    photos = copy_photos(workdir / "photos", scale.images)
    config = CacheConfig(
        data=str(photos),
        out=str(workdir / "cache"),
        teacher=scale.teacher,
        teacher_weights="random",
        teacher_overrides=scale.teacher_overrides,
        img_size=scale.img_size,
        student_patch_size=PATCH_SIZE,
        views=scale.views,
        batch_size=scale.batch_size,
        workers=loader_workers(scale, options.device),
        device=str(options.device),
        shard_size=scale.shard_size,
        fidelity_views=min(4, scale.images),
    )
    input_size = build_teacher(
        scale.teacher, "random", student_img_size=scale.img_size, student_patch_size=PATCH_SIZE,
        overrides=scale.teacher_overrides,
    ).input_size

    sides = {
        "cache-targets": lambda: views_per_s_in_subprocess("cache-targets", config, workdir),
        "teacher forward": lambda: views_per_s_in_subprocess("teacher forward", config, workdir),
    }
    logger.info("stage_one_efficiency: %s, %d images x %d views", scale.teacher, scale.images, scale.views)
    values = interleave(sides, scale.rounds, warmup_rounds=0)
    cache_rate, teacher_rate = median(values["cache-targets"]), median(values["teacher forward"])

    raw = {
        "cache_targets_views_per_s": cache_rate,
        "cache_targets_views_per_s_rounds": rounded(values["cache-targets"]),
        "teacher_forward_views_per_s": teacher_rate,
        "teacher_forward_views_per_s_rounds": rounded(values["teacher forward"]),
        **decode_rates(scale, input_size),
    }
    setup = setup_record(
        options,
        teacher=scale.teacher,
        teacher_weights="random",
        teacher_overrides=scale.teacher_overrides,
        teacher_input_size=input_size,
        img_size=scale.img_size,
        images=scale.images,
        views=scale.views,
        batch_size=scale.batch_size,
        shard_size=scale.shard_size,
        loader_workers=loader_workers(scale, options.device),
        codec="fp16",
        format="zarr",
        rounds=scale.rounds,
        decode_threads=SINGLE_CORE_THREADS,
    )
    return [measurement(NAME, scale.teacher, cache_rate / teacher_rate, GOAL, raw, setup)]


def decode_rates(scale: StageOneScale, teacher_size: int) -> dict[str, float]:
    """Measure the per-core view rendering rates (draft, full size, whole item) over every bundled photo."""
    encoded = [(path.name, path.read_bytes()) for path in photo_paths(PHOTOS, scale.render_photos)]
    sizes = [scale.img_size, teacher_size]
    source = open_source(PHOTOS)
    count = len(encoded)
    dataset = TeacherViews(
        source, list(range(count)), 1, scale.img_size, teacher_size, AugmentConfig(), seed=0, jpeg_quality=95
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(SINGLE_CORE_THREADS)
    try:
        values = interleave(
            {
                "draft": lambda: render_per_s(encoded, sizes, draft=True),
                "full size": lambda: render_per_s(encoded, sizes, draft=False),
                "item": lambda: stage_one_items_per_s(dataset),
            },
            rounds=scale.rounds,
            warmup_rounds=1,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "render_views_per_s_per_core_draft": median(values["draft"]),
        "render_views_per_s_per_core_full_size": median(values["full size"]),
        "stage_one_item_views_per_s_per_core": median(values["item"]),
        "render_photos": count,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_module(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == SIDE_FLAG:
        side_main(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
