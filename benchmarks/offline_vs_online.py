"""Offline against online: `pretrain --cache` img/s over `pretrain` img/s with the teacher online.

Both sides are real `run_pretrain` runs with the same student and batch. The cached side reads a
synthetic fp16 cache with the teacher's target grid and width. The online side renders views of
the bundled photos and runs the teacher (random weights, real size) every step. The ideal ratio
is (teacher forward + student step) / student step, both timed on tensors in memory: what the
cache saves when neither loader costs anything.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
)
from benchmarks.synthetic import CacheSpec, render_student_views, write_synthetic_cache
from benchmarks.training import BareStep, TeacherForward, run_trainer
from pipeline.config import PretrainConfig

NAME = "offline_vs_online"
TITLE = "Offline (cached) against online teacher"
IDEAL_SHARE = 0.95
"""The goal: the measured ratio reaches this share of the ideal ratio."""
DESCRIPTION = (
    "`pretrain --cache` img/s divided by `pretrain` img/s with the teacher online (random weights, real "
    "size), same student and batch, both read from the trainer's metrics.jsonl without the warm-up "
    "steps. The cache is a synthetic fp16 cache with real 224 px JPEG views and the teacher's grid and "
    "width; the online run renders views of the bundled photos. The ideal ratio is (teacher forward + "
    "student step) / student step, timed on tensors in memory in the same rounds. Goal: ratio >= 0.95 x ideal. "
    "On a machine without a GPU the loader workers of both runs share the CPU cores with the models, which "
    "the ideal ratio leaves out."
)

TINY_STUDENT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_TEACHER = {"width": 64, "layers": 2, "heads": 2, "patch_size": 16, "embed_dim": 32}


@dataclass(frozen=True)
class PairScale:
    """One student and teacher pair, and the size of its runs."""

    student: str
    teacher: str
    batch_size: int
    student_overrides: dict | None = None
    teacher_overrides: dict | None = None


@dataclass(frozen=True)
class OfflineScale:
    """Size of the offline-against-online benchmark."""

    pairs: tuple[PairScale, ...]
    img_size: int
    warmup_steps: int
    timed_steps: int
    workers: int
    rounds: int


# Two warm-up steps, as in cached_efficiency. A fresh process training ViT-B/16 at batch 4 on CPU
# took about 406,000 minor page faults in its first step, 135,000 in its second and almost none
# after that. The trainer runs in a fresh process, but the bare step runs in this one, whose
# memory is already mapped.
SCALES = {
    "full": OfflineScale(
        pairs=(
            PairScale("vit_small_patch16", "clip_vit_base_patch16", batch_size=8),
            PairScale("vit_base_patch16", "clip_vit_large_patch14", batch_size=4),
        ),
        img_size=224, warmup_steps=2, timed_steps=4, workers=1, rounds=3,
    ),
    "quick": OfflineScale(
        pairs=(
            PairScale(
                "vit_tiny_patch16", "clip_vit_base_patch16", batch_size=4,
                student_overrides=TINY_STUDENT, teacher_overrides=TINY_TEACHER,
            ),
        ),
        img_size=64, warmup_steps=1, timed_steps=1, workers=0, rounds=1,
    ),
}
PATCH_SIZE = 16


def run_pair(options: BenchOptions, workdir: Path, scale: OfflineScale, pair: PairScale) -> dict:
    """Measure one student and teacher pair and return its JSON record."""
    probe = TeacherForward(pair.teacher, pair.batch_size, scale.img_size, PATCH_SIZE, options.device, pair.teacher_overrides)
    target_dim, grid, input_size = probe.teacher.target_dim, probe.teacher.grid_size, probe.teacher.input_size
    del probe
    offline, online = pair_configs(options, workdir, scale, pair, target_dim)

    ideal_parts: list[tuple[float, float]] = []

    def ideal_side() -> float:
        teacher_seconds, student_seconds = seconds_per_image(options, scale, pair, offline, target_dim)
        ideal_parts.append((teacher_seconds, student_seconds))
        return (teacher_seconds + student_seconds) / student_seconds

    sides = {
        "cached": lambda: run_trainer(offline, workdir / "run-cached", scale.warmup_steps).img_per_s,
        "online": lambda: run_trainer(online, workdir / "run-online", scale.warmup_steps).img_per_s,
        "ideal": ideal_side,
    }
    logger.info("offline_vs_online: %s with teacher %s, batch %d", pair.student, pair.teacher, pair.batch_size)
    values = interleave(sides, scale.rounds, warmup_rounds=0)

    cached_rate, online_rate = median(values["cached"]), median(values["online"])
    ratio, ideal = cached_rate / online_rate, median(values["ideal"])
    raw = {
        "cached_img_per_s": cached_rate,
        "cached_img_per_s_rounds": rounded(values["cached"]),
        "online_img_per_s": online_rate,
        "online_img_per_s_rounds": rounded(values["online"]),
        "ideal": ideal,
        "ideal_rounds": rounded(values["ideal"]),
        "teacher_forward_img_per_s": 1 / median(part[0] for part in ideal_parts),
        "student_step_img_per_s": 1 / median(part[1] for part in ideal_parts),
        "ratio_over_ideal": ratio / ideal,
    }
    setup = setup_record(
        options,
        student=pair.student,
        student_overrides=pair.student_overrides,
        teacher=pair.teacher,
        teacher_weights="random",
        teacher_overrides=pair.teacher_overrides,
        teacher_input=f"{input_size} px, {grid[0]}x{grid[1]} patches x {target_dim}",
        img_size=scale.img_size,
        batch_size=pair.batch_size,
        loader_workers=scale.workers,
        warmup_steps=scale.warmup_steps,
        timed_steps=scale.timed_steps,
        rounds=scale.rounds,
    )
    goal = Goal(">=", IDEAL_SHARE * ideal)
    return measurement(NAME, f"{pair.student} / {pair.teacher}", ratio, goal, raw, setup)


def pair_configs(
    options: BenchOptions, workdir: Path, scale: OfflineScale, pair: PairScale, target_dim: int
) -> tuple[PretrainConfig, PretrainConfig]:
    """Write the pair's synthetic cache and return the (cached, online) trainer configs."""
    steps = scale.warmup_steps + scale.timed_steps
    samples = pair.batch_size * steps
    views = render_student_views(PHOTOS, samples, scale.img_size)
    spec = CacheSpec(samples, pair.batch_size, scale.img_size, PATCH_SIZE, target_dim, "fp16")
    cache = write_synthetic_cache(workdir / f"cache-{pair.teacher}", spec, views)

    common = dict(
        student=pair.student,
        student_overrides=pair.student_overrides,
        img_size=scale.img_size,
        steps=steps,
        batch_size=pair.batch_size,
        workers=scale.workers,
        device=str(options.device),
    )
    offline = PretrainConfig(cache=str(cache), **common)
    online = PretrainConfig(
        teacher=pair.teacher,
        teacher_weights="random",
        teacher_overrides=pair.teacher_overrides,
        data=str(PHOTOS),
        shard_size=pair.batch_size,
        **common,
    )
    return offline, online


def seconds_per_image(
    options: BenchOptions, scale: OfflineScale, pair: PairScale, config: PretrainConfig, target_dim: int
) -> tuple[float, float]:
    """Time the teacher forward and the student step on tensors in memory; return seconds per image of each.

    Each model is built, timed and freed in turn, so that the process never keeps both models
    of the large pair in memory beside the trainer runs.
    """
    teacher = TeacherForward(
        pair.teacher, pair.batch_size, scale.img_size, PATCH_SIZE, options.device, pair.teacher_overrides
    )
    teacher_seconds = 1 / teacher.img_per_s(scale.timed_steps, scale.warmup_steps)
    del teacher
    gc.collect()

    bare = BareStep(config, target_dim, options.device)
    student_seconds = 1 / bare.img_per_s(scale.timed_steps, scale.warmup_steps)
    del bare
    gc.collect()
    return teacher_seconds, student_seconds


def run(options: BenchOptions, workdir: Path) -> list[dict]:
    scale = SCALES["quick" if options.quick else "full"]
    return [run_pair(options, workdir, scale, pair) for pair in scale.pairs]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_module(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
