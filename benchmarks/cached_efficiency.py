"""Cached training efficiency: `pretrain --cache` img/s over the same student step on tensors in memory.

The trainer side is a real `run_pretrain` on a synthetic fp16 cache with real JPEG views of the
bundled photos and 196 x 768 targets at full scale. Its img/s comes from the metrics.jsonl it
writes, without the warm-up steps. The bare side runs `train_step` of the same student, head and
optimizer on one batch already on the device. A ratio of 1 means the loader, the device copy and
the loop's bookkeeping cost nothing.
"""

from __future__ import annotations

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
from benchmarks.training import BareStep, run_trainer
from pipeline.config import PretrainConfig

NAME = "cached_efficiency"
TITLE = "Cached training efficiency"
GOAL = Goal(">=", 0.95)
DESCRIPTION = (
    "`pretrain --cache` img/s (read from its metrics.jsonl, warm-up steps left out) divided by the img/s "
    "of `pipeline.engine.train_step` of the same student, head and optimizer on one batch already in "
    "device memory. The cache is a synthetic fp16 cache with real 224 px JPEG views of the bundled "
    "photos and 196 x 768 targets. Trainer runs and bare steps alternate, round after round. On a machine "
    "without a GPU the loader worker shares the CPU cores with the step, which the bare step does not."
)


@dataclass(frozen=True)
class EfficiencyScale:
    """Size of the cached-efficiency benchmark."""

    student: str
    student_overrides: dict | None
    img_size: int
    target_dim: int
    batch_size: int
    warmup_steps: int
    timed_steps: int
    workers: int
    rounds: int

    @property
    def samples(self) -> int:
        """Enough samples that every step of a run falls in its first epoch."""
        return self.batch_size * (self.warmup_steps + self.timed_steps)


SCALES = {
    "full": EfficiencyScale(
        student="vit_small_patch16", student_overrides=None, img_size=224, target_dim=768,
        batch_size=16, warmup_steps=2, timed_steps=4, workers=1, rounds=3,
    ),
    "quick": EfficiencyScale(
        student="vit_tiny_patch16", student_overrides={"embed_dim": 64, "depth": 2, "num_heads": 2}, img_size=64,
        target_dim=64, batch_size=4, warmup_steps=1, timed_steps=2, workers=0, rounds=1,
    ),
}
PATCH_SIZE = 16


def run(options: BenchOptions, workdir: Path) -> list[dict]:
    scale = SCALES["quick" if options.quick else "full"]
    views = render_student_views(PHOTOS, scale.samples, scale.img_size)
    spec = CacheSpec(scale.samples, scale.batch_size, scale.img_size, PATCH_SIZE, scale.target_dim, "fp16")
    cache = write_synthetic_cache(workdir / "cache", spec, views)

    steps = scale.warmup_steps + scale.timed_steps
    config = PretrainConfig(
        student=scale.student,
        student_overrides=scale.student_overrides,
        cache=str(cache),
        img_size=scale.img_size,
        steps=steps,
        batch_size=scale.batch_size,
        workers=scale.workers,
        device=str(options.device),
    )
    bare = BareStep(config, scale.target_dim, options.device)
    trainer_runs = []

    def trainer_side() -> float:
        rate = run_trainer(config, workdir / "run", scale.warmup_steps)
        trainer_runs.append(rate)
        return rate.img_per_s

    def bare_side() -> float:
        return bare.img_per_s(scale.timed_steps, scale.warmup_steps)

    logger.info("cached_efficiency: %s, batch %d, %d rounds", scale.student, scale.batch_size, scale.rounds)
    values = interleave({"trainer": trainer_side, "bare step": bare_side}, scale.rounds, warmup_rounds=0)

    trainer_rate, bare_rate = median(values["trainer"]), median(values["bare step"])
    raw = {
        "trainer_img_per_s": trainer_rate,
        "trainer_img_per_s_rounds": rounded(values["trainer"]),
        "bare_step_img_per_s": bare_rate,
        "bare_step_img_per_s_rounds": rounded(values["bare step"]),
        "trainer_data_wait_share": median(run.data_wait_share for run in trainer_runs),
    }
    setup = setup_record(
        options,
        student=scale.student,
        student_overrides=scale.student_overrides,
        head="fc",
        img_size=scale.img_size,
        targets=f"{scale.img_size // PATCH_SIZE}x{scale.img_size // PATCH_SIZE} patches x {scale.target_dim}, fp16",
        batch_size=scale.batch_size,
        loader_workers=scale.workers,
        warmup_steps=scale.warmup_steps,
        timed_steps=scale.timed_steps,
        rounds=scale.rounds,
    )
    return [measurement(NAME, scale.student, trainer_rate / bare_rate, GOAL, raw, setup)]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_module(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
