"""Memory against cache size: peak RSS of `pretrain --cache` on a cache of N and of 10 N samples.

Both caches are synthetic fp16 caches with the same shard size, real JPEG views and 196 x 768
targets at full scale. Each run is one epoch of the `maskdistill pretrain` command in a
subprocess with a tiny student, so the data path dominates the memory. The peak RSS of a run is
the `ru_maxrss` that `os.wait4` returns for it: the largest peak of the trainer process and of
its loader worker processes. The peak of the sum over the process tree, sampled with psutil, is
reported beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from benchmarks.harness import (
    PHOTOS,
    REPO,
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

NAME = "memory"
TITLE = "Peak memory against cache size"
GOAL = Goal("<=", 1.10)
SIZE_FACTOR = 10
SAMPLE_INTERVAL_S = 0.05
DESCRIPTION = (
    "Peak RSS of one epoch of `maskdistill pretrain --cache` (a subprocess) on a cache of 10 N samples "
    "divided by the same on a cache of N samples. Both are synthetic fp16 caches with the same shard size, "
    "real 224 px JPEG views and 196 x 768 targets; the student is a 2-block ViT of width 64, so the data "
    "path dominates. N = 160 samples already fill 10 shards, more than the shard slices a loader worker "
    "keeps in memory (`pipeline.data.order.SHARD_WINDOW`), so the ratio shows growth with the cache size "
    "rather than the filling of that window. The peak is `ru_maxrss` from `os.wait4`: the largest single process of the run (the "
    "trainer or a loader worker). The sampled peak of the whole process tree is reported beside it."
)


@dataclass(frozen=True)
class MemoryScale:
    """Size of the memory benchmark: N samples, shard size and the trainer's loader."""

    samples: int
    shard_size: int
    img_size: int
    target_dim: int
    batch_size: int
    workers: int
    distinct_views: int
    rounds: int


SCALES = {
    "full": MemoryScale(
        samples=160, shard_size=16, img_size=224, target_dim=768, batch_size=32, workers=2,
        distinct_views=256, rounds=2,
    ),
    "quick": MemoryScale(
        samples=8, shard_size=4, img_size=64, target_dim=64, batch_size=4, workers=1, distinct_views=8, rounds=1,
    ),
}
PATCH_SIZE = 16
TINY_STUDENT = {"embed_dim": 64, "depth": 2, "num_heads": 2}


@dataclass(frozen=True)
class PeakMemory:
    """Peak RSS of one run, in MiB: the largest process, and the sampled sum over the process tree."""

    max_rss_mib: float
    tree_rss_mib: float


def write_preset(path: Path, scale: MemoryScale, device: str) -> Path:
    """Write the YAML preset of the measured `pretrain` runs."""
    preset = {
        "pretrain": {
            "student": "vit_tiny_patch16",
            "student_overrides": TINY_STUDENT,
            "img_size": scale.img_size,
            "epochs": 1,
            "batch_size": scale.batch_size,
            "lr": 1.0e-4,
            "warmup_steps": 0,
            "val_fraction": 0.0,
            "log_every": 10,
            "checkpoint_every": 10**9,
            "workers": scale.workers,
            "device": device,
        }
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def measure_pretrain(preset: Path, cache: Path, out: Path, log: Path) -> PeakMemory:
    """Run `maskdistill pretrain` in a subprocess and return its peak memory.

    Raises RuntimeError with the tail of the run's log when it fails.
    """
    command = [sys.executable, "-m", "cli", "pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(out)]
    with log.open("w") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
        tree_peak, status, usage = _watch(process.pid)
        process.returncode = os.waitstatus_to_exitcode(status)

    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"pretrain exited with code {process.returncode}: {' '.join(command)}\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return PeakMemory(max_rss_mib=usage.ru_maxrss / 1024, tree_rss_mib=tree_peak / 2**20)


def _watch(pid: int) -> tuple[int, int, object]:
    """Sample the RSS sum of `pid` and its descendants until it exits; return (peak bytes, status, rusage)."""
    root = psutil.Process(pid)
    peak = 0
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == pid:
            return peak, status, usage
        peak = max(peak, _tree_rss(root))
        time.sleep(SAMPLE_INTERVAL_S)


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue  # a loader worker that exited between the listing and the read
    return total


def run(options: BenchOptions, workdir: Path) -> list[dict]:
    scale = SCALES["quick" if options.quick else "full"]
    views = render_student_views(PHOTOS, scale.distinct_views, scale.img_size)
    sizes = {"N": scale.samples, f"{SIZE_FACTOR}N": SIZE_FACTOR * scale.samples}
    caches = {
        label: write_synthetic_cache(
            workdir / f"cache-{label}",
            CacheSpec(samples, scale.shard_size, scale.img_size, PATCH_SIZE, scale.target_dim, "fp16"),
            views,
        )
        for label, samples in sizes.items()
    }
    preset = write_preset(workdir / "preset.yaml", scale, str(options.device))

    peaks: dict[str, list[PeakMemory]] = {label: [] for label in sizes}

    def side(label: str) -> float:
        run_folder = workdir / f"run-{label}-{len(peaks[label])}"
        peak = measure_pretrain(preset, caches[label], run_folder, workdir / f"run-{label}.log")
        peaks[label].append(peak)
        return peak.max_rss_mib

    logger.info("memory: caches of %s samples, %d rounds", list(sizes.values()), scale.rounds)
    values = interleave({label: (lambda label=label: side(label)) for label in sizes}, scale.rounds, warmup_rounds=0)

    small, large = (median(values[label]) for label in sizes)
    small_tree, large_tree = (median(peak.tree_rss_mib for peak in peaks[label]) for label in sizes)
    raw = {
        "peak_rss_mib_n": small,
        "peak_rss_mib_10n": large,
        "peak_rss_mib_n_rounds": rounded(values["N"]),
        "peak_rss_mib_10n_rounds": rounded(values[f"{SIZE_FACTOR}N"]),
        "tree_peak_rss_mib_n": small_tree,
        "tree_peak_rss_mib_10n": large_tree,
        "tree_ratio": large_tree / small_tree,
        "growth_mib": large - small,
        "cache_bytes_n": _folder_bytes(caches["N"]),
        "cache_bytes_10n": _folder_bytes(caches[f"{SIZE_FACTOR}N"]),
    }
    setup = setup_record(
        options,
        samples_n=scale.samples,
        samples_10n=SIZE_FACTOR * scale.samples,
        shard_size=scale.shard_size,
        targets=f"{scale.img_size // PATCH_SIZE}x{scale.img_size // PATCH_SIZE} patches x {scale.target_dim}, fp16",
        student="vit_tiny_patch16",
        student_overrides=TINY_STUDENT,
        batch_size=scale.batch_size,
        loader_workers=scale.workers,
        epochs=1,
        rounds=scale.rounds,
        pretrain_threads="torch default in the subprocess",
    )
    case = f"{scale.samples} vs {SIZE_FACTOR * scale.samples} samples"
    return [measurement(NAME, case, large / small, GOAL, raw, setup)]


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_module(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
