"""A second command on an output folder that a running command writes stops with one line.

Each test starts the real command line, stops it (SIGSTOP) once it writes its folder, runs the
same command again, and then lets the first one finish: its output must be what a single
run writes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import (
    IMG_SIZE,
    REPO,
    STUDENT,
    STUDENT_OVERRIDES,
    TEACHER,
    copy_photos,
    read_metrics,
    run_cli,
    subprocess_env,
    tiny_cache_config,
    write_teacher_checkpoint,
)

from pipeline import folder_lock
from pipeline.cache import CacheReader
from pipeline.folder_lock import FolderLock
from stages.cache_targets import run_cache_targets

RUN_TIMEOUT = 300
POLL_SECONDS = 0.01


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concurrent")
    photos = copy_photos(root / "photos", 16)
    teacher = write_teacher_checkpoint(root)
    cache = root / "cache"
    run_cache_targets(tiny_cache_config(photos, cache, teacher, views=1, fidelity_views=2))
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "cache_targets": {
            "teacher": TEACHER, "teacher_weights": str(teacher), "teacher_overrides": tiny_overrides(),
            "img_size": IMG_SIZE, "views": 2, "shard_size": 2, "batch_size": 4, "workers": 0, "device": "cpu",
            "fidelity_views": 2,
        },
        "pretrain": {
            "student": STUDENT, "student_overrides": STUDENT_OVERRIDES, "img_size": IMG_SIZE, "steps": 60,
            "batch_size": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 5, "workers": 0, "device": "cpu",
        },
    }))
    return {"photos": photos, "cache": cache, "preset": preset}


def start_and_stop(arguments: list[str], started: Path) -> subprocess.Popen:
    """Start `python -m cli ARGUMENTS` and SIGSTOP it as soon as the file `started` exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *arguments], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    while not started.exists():
        if process.poll() is not None:
            pytest.fail(f"the first command ended before writing {started.name}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the first command did not write {started.name} in time")
        time.sleep(POLL_SECONDS)
    process.send_signal(signal.SIGSTOP)
    return process


def resume_to_end(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGCONT)
    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]


def assert_in_use_error(result: subprocess.CompletedProcess, folder: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ")
    assert str(folder) in lines[-1]
    assert "in use by another process" in lines[-1]


def test_second_cache_targets_rejected(setup: dict[str, Path], tmp_path: Path):
    out = tmp_path / "cache"
    arguments = ["cache-targets", "--config", str(setup["preset"]), "--data", str(setup["photos"]), "--out", str(out)]
    first = start_and_stop(arguments, out / "manifest.json")
    try:
        second = run_cli(arguments, env=subprocess_env(), timeout=RUN_TIMEOUT)
    finally:
        resume_to_end(first)

    assert_in_use_error(second, out)
    reader = CacheReader(out, verify=True)
    assert reader.manifest["complete"]
    assert reader.num_samples() == 2 * 16


def test_second_pretrain_rejected(setup: dict[str, Path], tmp_path: Path):
    run_dir = tmp_path / "run"
    arguments = ["pretrain", "--config", str(setup["preset"]), "--cache", str(setup["cache"]), "--out", str(run_dir)]
    first = start_and_stop(arguments, run_dir / "checkpoint-00000005.pt")
    try:
        second = run_cli([*arguments, "--resume"], env=subprocess_env(), timeout=RUN_TIMEOUT)
    finally:
        resume_to_end(first)

    assert_in_use_error(second, run_dir)
    steps = [record["step"] for record in read_metrics(run_dir) if "loss" in record]
    assert steps == list(range(1, 61))


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_folder_without_flock_runs_unlocked(tmp_path: Path, monkeypatch, caplog, code: int):
    def unsupported(descriptor: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(folder_lock.fcntl, "flock", unsupported)
    lock = FolderLock()
    with caplog.at_level(logging.WARNING, logger="pipeline.folder_lock"):
        lock.acquire(tmp_path / "out", "--out")

    assert (tmp_path / "out").is_dir()
    assert "has no flock" in caplog.text
    assert str(tmp_path / "out") in caplog.text
    lock.release()


def test_folder_lock_other_error_raises(tmp_path: Path, monkeypatch):
    def broken(descriptor: int, operation: int) -> None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(folder_lock.fcntl, "flock", broken)
    with pytest.raises(OSError, match=os.strerror(errno.EBADF)):
        FolderLock().acquire(tmp_path / "out", "--out")
