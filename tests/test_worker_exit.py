"""Loader workers of a killed `cache-targets` exit with it instead of outliving it.

torch's DataLoader workers check for a dead parent only between batches, and a worker whose
finished batches fill the pipe to the parent then blocks at exit, flushing into a pipe that
no process reads. The test stops the real command (SIGSTOP) until a worker blocks on that
pipe, kills it with SIGKILL, and checks that every worker is gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import REPO, TEACHER, copy_photos, subprocess_env, write_teacher_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads worker threads from /proc")

WORKERS = 2
# One batch of 224 px JPEG views (about 8 x 25 KB) is larger than a 64 KiB pipe buffer.
IMG_SIZE = 224
DEADLINE_SECONDS = 60  # far beyond torch's 5 s check for a dead parent
POLL_SECONDS = 0.05


def loader_workers(process: psutil.Process) -> list[psutil.Process]:
    """Return the children of `process` forked by its DataLoader (same command line)."""
    command = process.cmdline()
    return [child for child in process.children() if child.cmdline() == command]


def blocked_on_pipe(worker: psutil.Process) -> bool:
    """Return whether a thread of `worker` waits in the kernel to write into a full pipe."""
    for task in Path(f"/proc/{worker.pid}/task").iterdir():
        try:
            if "pipe_write" in (task / "wchan").read_text():
                return True
        except OSError:
            continue
    return False


def wait_until(condition, description: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"cache-targets ended before {description}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {description}")
        time.sleep(POLL_SECONDS)


def test_workers_die_with_killed_cache_targets(tmp_path: Path):
    photos = copy_photos(tmp_path / "photos", 64)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"cache_targets": {
        "teacher": TEACHER, "teacher_weights": str(write_teacher_checkpoint(tmp_path)),
        "teacher_overrides": tiny_overrides(), "img_size": IMG_SIZE, "views": 2, "shard_size": 4,
        "batch_size": 8, "workers": WORKERS, "device": "cpu", "fidelity_views": 4,
    }}))
    command = [
        sys.executable, "-m", "cli", "cache-targets", "--config", str(preset),
        "--data", str(photos), "--out", str(tmp_path / "cache"),
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    workers: list[psutil.Process] = []
    try:
        main = psutil.Process(process.pid)
        # After the first shard the workers have their prefetch slots filled with indices.
        first_shard = tmp_path / "cache" / "shards" / "shard_000000.done.json"
        wait_until(first_shard.is_file, "the first shard was written", process)
        workers = loader_workers(main)
        assert len(workers) == WORKERS

        # With the main process stopped, the workers fill their prefetch slots and the pipe.
        process.send_signal(signal.SIGSTOP)
        wait_until(lambda: any(blocked_on_pipe(worker) for worker in workers), "a worker blocked on a full pipe")
        process.send_signal(signal.SIGKILL)
        process.wait()

        _, alive = psutil.wait_procs(workers, timeout=DEADLINE_SECONDS)
        assert not alive, f"loader workers outlived the killed cache-targets: {[w.pid for w in alive]}"
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
        for worker in workers:
            if worker.is_running():
                worker.kill()
