"""Setup for tests that run the real stages: bundled photos, a tiny teacher, small configs, the CLI.

Typical use, with `tests/` on sys.path as pytest sets it:

    from helpers.tiny_runs import copy_photos, tiny_cache_config, write_teacher_checkpoint

    photos = copy_photos(tmp_path / "photos", 8)
    teacher_file = write_teacher_checkpoint(tmp_path)
    run_cache_targets(tiny_cache_config(photos, tmp_path / "cache", teacher_file, views=1))

The config functions set small CPU defaults. Each keyword argument replaces one of them or sets
another field, and a field that neither sets keeps its dataclass default.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from helpers.tiny_clip import tiny_overrides, write_tiny_clip_checkpoint
from pipeline.config import CacheConfig, PretrainConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "data" / "imagenet-sample-64"

TEACHER = "clip_vit_base_patch16"
STUDENT = "vit_tiny_patch16"
IMG_SIZE = 96  # a 6x6 patch grid for /16 patches
STUDENT_OVERRIDES = {"embed_dim": 64, "depth": 2, "num_heads": 2}


# Inputs


def sample_photos(count: int | None = None) -> list[Path]:
    """Return the first `count` JPEGs of the bundled ImageNet sample (all for None), sorted by name."""
    return sorted(SAMPLE_DIR.glob("*.JPEG"))[:count]


def copy_photos(folder: Path, count: int) -> Path:
    """Create `folder`, copy the first `count` bundled JPEGs into it and return it."""
    folder.mkdir(parents=True)
    for path in sample_photos(count):
        shutil.copy(path, folder / path.name)
    return folder


def write_tar_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a ustar archive of `members` (name, bytes) in order, creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_teacher_checkpoint(folder: Path) -> Path:
    """Save a tiny open_clip checkpoint for `TEACHER` as `folder/tiny-clip.pt` and return its path.

    Its position embedding has the 14x14 grid of a 224 px model, so loading it resamples the
    embedding to the student's grid, as loading the published weights does.
    """
    return write_tiny_clip_checkpoint(folder / "tiny-clip.pt", image_size=224)


# Configs


def tiny_cache_config(data: Path, out: Path, teacher_file: Path, **changes: Any) -> CacheConfig:
    """Return the settings of a tiny `cache-targets` run of `TEACHER` with `changes` applied.

    Defaults: the tiny teacher from `teacher_file`, 2 views of IMG_SIZE px, batches of 8 and
    shards of 4 images, 4 fidelity views, no loader workers, on the CPU.
    """
    values = dict(
        data=str(data),
        out=str(out),
        teacher=TEACHER,
        teacher_weights=str(teacher_file),
        teacher_overrides=tiny_overrides(),
        img_size=IMG_SIZE,
        views=2,
        batch_size=8,
        workers=0,
        device="cpu",
        shard_size=4,
        fidelity_views=4,
    )
    values.update(changes)
    return CacheConfig(**values)


def tiny_pretrain_config(out: Path, **changes: Any) -> PretrainConfig:
    """Return the settings of a tiny `pretrain` run of `STUDENT` with `changes` applied.

    Defaults: a 2-block student at IMG_SIZE px and 3 steps of batch 4 at lr 1e-3 after 1 warmup
    step, without drop path. 10% of the samples are held out for validation, each step writes
    a metrics line, and a checkpoint is saved every 100 steps. No loader workers, on the CPU.
    Set the data with `cache=`, or with `data=` and the online teacher's fields.
    """
    values = dict(
        out=str(out),
        student=STUDENT,
        student_overrides=STUDENT_OVERRIDES,
        img_size=IMG_SIZE,
        steps=3,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        drop_path=0.0,
        val_fraction=0.1,
        log_every=1,
        checkpoint_every=100,
        workers=0,
        device="cpu",
    )
    values.update(changes)
    return PretrainConfig(**values)


# Runs


def read_metrics(run_dir: Path) -> list[dict]:
    """Return the records of `run_dir/metrics.jsonl`, one per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def subprocess_env(**variables: str) -> dict[str, str]:
    """Return this process's environment plus `variables`, with 2 OpenMP threads and the Hugging Face hub offline."""
    return {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **variables}


def run_cli(
    arguments: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m cli ARGUMENTS` in the repository and capture its output as text.

    With `env=None` the command inherits this process's environment. Raises
    subprocess.TimeoutExpired after `timeout` seconds.
    """
    return subprocess.run(
        [sys.executable, "-m", "cli", *arguments],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when checked. Another process may take it before use."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
