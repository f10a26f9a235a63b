"""`cache-targets` killed with SIGKILL at chosen points resumes into the cache of an uninterrupted run.

Each run is the real command line in a subprocess. The test polls the cache folder for the file
that marks a point (the codec record, a shard's done record, a shard's temp folder, the last
done record before finalize) and kills the process as soon as it appears. A tiny teacher over
full-size photos makes each shard take tens of milliseconds, far longer than the polling
interval.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import IMG_SIZE, REPO, TEACHER, copy_photos, write_teacher_checkpoint

from pipeline.cache import CacheReader

NUM_IMAGES = 28
SHARD_SIZE = 4
NUM_SHARDS = NUM_IMAGES // SHARD_SIZE
RUN_TIMEOUT = 120
POLL_SECONDS = 0.001
TEMP_SHARD_FOLDER = re.compile(r"^\.tmp-shard_\d{6}-\d+-[0-9a-f]{8}@")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Real photos, a tiny CLIP checkpoint and a preset that makes `cache-targets` tiny."""
    root = tmp_path_factory.mktemp("resume")
    photos = copy_photos(root / "photos", NUM_IMAGES)

    teacher = write_teacher_checkpoint(root)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"cache_targets": {
        "teacher": TEACHER, "teacher_weights": str(teacher), "teacher_overrides": tiny_overrides(),
        "img_size": IMG_SIZE, "views": 2, "shard_size": SHARD_SIZE, "batch_size": 8, "workers": 0, "device": "cpu",
        "calibration_images": 4, "fidelity_views": 16,
    }}))
    return {"root": root, "photos": photos, "preset": preset}


def command(setup: dict[str, Path], out: Path, fmt: str, codec: str) -> list[str]:
    return [
        sys.executable, "-m", "cli", "cache-targets", "--config", str(setup["preset"]),
        "--data", str(setup["photos"]), "--out", str(out), "--format", fmt, "--codec", codec,
    ]


def run_to_end(args: list[str]) -> None:
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


def run_and_kill(args: list[str], reached: Callable[[], bool]) -> None:
    """Start the command and SIGKILL it as soon as `reached()` is true. Fail when it ends before."""
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not reached():
            if process.poll() is not None:
                pytest.fail(f"cache-targets ended before the kill point:\n{process.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("cache-targets did not reach the kill point in time")
            time.sleep(POLL_SECONDS)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def done_records(cache: Path) -> list[Path]:
    return sorted((cache / "shards").glob("shard_*.done.json")) if (cache / "shards").is_dir() else []


def temp_shard_folders(cache: Path) -> list[str]:
    if not (cache / "shards").is_dir():
        return []
    return [entry.name for entry in os.scandir(cache / "shards") if TEMP_SHARD_FOLDER.match(entry.name)]


def is_complete(cache: Path) -> bool:
    path = cache / "manifest.json"
    return path.is_file() and json.loads(path.read_text())["complete"]


def finished_files(cache: Path) -> dict[str, tuple[int, int]]:
    """Return (inode, mtime in ns) of every file of the finished shards and of the recorded codec state."""
    files = []
    for record_path in done_records(cache):
        record = json.loads(record_path.read_text())
        files += list(record["files"]) + [record_path.relative_to(cache).as_posix()]
        files.append(f"shards/{record['name']}.skipped.json")
    if (cache / "codec.done.json").is_file():
        files += list(json.loads((cache / "codec.done.json").read_text())["files"]) + ["codec.done.json"]

    stamps = {}
    for name in files:
        info = (cache / name).stat()
        stamps[name] = (info.st_ino, info.st_mtime_ns)
    return stamps


def assert_untouched(cache: Path, stamps: dict[str, tuple[int, int]]) -> None:
    now = finished_files(cache)
    changed = sorted(name for name, stamp in stamps.items() if now.get(name) != stamp)
    assert not changed, f"files of finished shards were rewritten: {changed[:5]}"


def assert_same_cache(actual: Path, expected: Path) -> None:
    """Compare two finished caches: every recorded file hash, every array and every JPEG."""
    left, right = CacheReader(actual, verify=True), CacheReader(expected, verify=True)
    for key in ("settings", "num_shards", "num_images", "num_samples", "skipped", "codec_state", "fidelity"):
        assert left.manifest[key] == right.manifest[key], key
    assert [r.to_json() for r in left.shards] == [r.to_json() for r in right.shards]

    for record in right.shards:
        got, want = left.read_shard(record.shard_id), right.read_shard(record.shard_id)
        np.testing.assert_array_equal(got.image_index, want.image_index)
        np.testing.assert_array_equal(got.view_index, want.view_index)
        np.testing.assert_array_equal(got.label, want.label)
        np.testing.assert_array_equal(got.params, want.params)
        assert got.source == want.source
        assert got.jpeg == want.jpeg
        for name in want.targets:
            np.testing.assert_array_equal(got.targets[name], want.targets[name])

    leftovers = [path.name for path in actual.rglob(".tmp-*")]
    assert not leftovers, f"temp files of killed runs remain: {leftovers}"


def test_zarr_int8_channel_resumes_after_kills(setup: dict[str, Path]):
    reference = setup["root"] / "zarr-reference"
    run_to_end(command(setup, reference, "zarr", "int8-channel"))
    cache = setup["root"] / "zarr-killed"
    args = command(setup, cache, "zarr", "int8-channel")

    # right after the fitted codec state is recorded
    run_and_kill(args, lambda: (cache / "codec.done.json").is_file())
    assert len(done_records(cache)) < NUM_SHARDS
    codec_stamps = finished_files(cache)
    assert "codec.done.json" in codec_stamps

    # in the middle of writing a shard's files; a kill that lands after the rename is retried
    stale = []
    for _ in range(NUM_SHARDS - 2):
        stamps = finished_files(cache)
        run_and_kill(args, lambda: bool(temp_shard_folders(cache)))
        assert_untouched(cache, stamps)
        stale = temp_shard_folders(cache)
        if stale:
            break
    assert stale, "no kill landed while a shard folder was being written"
    assert len(done_records(cache)) < NUM_SHARDS

    # during finalize, after the last shard is recorded
    stamps = finished_files(cache)
    run_and_kill(args, lambda: len(done_records(cache)) == NUM_SHARDS)
    assert not is_complete(cache)
    assert not any(name in temp_shard_folders(cache) for name in stale)
    assert_untouched(cache, stamps)

    stamps = finished_files(cache)
    run_to_end(args)
    assert is_complete(cache)
    assert_untouched(cache, stamps)
    assert_untouched(cache, codec_stamps)
    assert_same_cache(cache, reference)


def test_wds_resumes_after_kills(setup: dict[str, Path]):
    reference = setup["root"] / "wds-reference"
    run_to_end(command(setup, reference, "wds", "fp16+zstd"))
    cache = setup["root"] / "wds-killed"
    args = command(setup, cache, "wds", "fp16+zstd")

    # after the first shard is recorded, while the next one is rendered and encoded
    run_and_kill(args, lambda: (cache / "shards" / "shard_000000.done.json").is_file())
    finished = len(done_records(cache))
    assert 1 <= finished < NUM_SHARDS

    # during finalize
    stamps = finished_files(cache)
    run_and_kill(args, lambda: len(done_records(cache)) == NUM_SHARDS)
    assert not is_complete(cache)
    assert_untouched(cache, stamps)

    stamps = finished_files(cache)
    run_to_end(args)
    assert is_complete(cache)
    assert_untouched(cache, stamps)
    assert_same_cache(cache, reference)
