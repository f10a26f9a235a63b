"""`cache-targets` under torchrun with 2 CPU processes (gloo) writes the cache a single process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import (
    IMG_SIZE,
    REPO,
    TEACHER,
    copy_photos,
    free_port,
    sample_photos,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader

SHARD_SIZE = 4
RUN_TIMEOUT = 240
# One thread per process, torchrun's default for several processes, in every run, so that the
# single-process and the torchrun runs compute bitwise equal targets.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Ten real photos with bad inputs among them, a tiny CLIP checkpoint and a preset.

    Sorted by name, the photos fill shards of 4 images. A truncated JPEG lands in shard 0
    (rank 0), a text file named .jpg in shard 1 (rank 1), and an empty file is skipped while
    indexing.
    """
    root = tmp_path_factory.mktemp("distributed")
    photos = copy_photos(root / "photos", 10)
    names = [path.name for path in sample_photos(10)]
    (photos / f"{names[1]}-truncated.jpg").write_bytes((photos / names[1]).read_bytes()[:300])
    (photos / f"{names[4]}-text.jpg").write_text("<html>not an image</html>")
    (photos / f"{names[6]}-empty.jpg").write_bytes(b"")

    teacher = write_teacher_checkpoint(root)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"cache_targets": {
        "teacher": TEACHER, "teacher_weights": str(teacher), "teacher_overrides": tiny_overrides(),
        "img_size": IMG_SIZE, "views": 2, "shard_size": SHARD_SIZE, "batch_size": 8, "workers": 0, "device": "cpu",
        "codec": "int8-channel", "calibration_images": 4, "fidelity_views": 6, "max_bad_fraction": 0.5,
    }}))
    return {"root": root, "photos": photos, "preset": preset, "names": names}


def cache_targets_args(setup: dict, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "cli", "cache-targets", "--config", str(setup["preset"]), "--data", str(setup["photos"]),
        "--out", str(out), *extra,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_single(setup: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, *cache_targets_args(setup, out, *extra)])


def run_torchrun(setup: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]
    return run(launcher + cache_targets_args(setup, out, *extra))


def test_two_ranks_write_single_process_cache(setup: dict):
    single = setup["root"] / "single"
    run_single(setup, single)
    distributed = setup["root"] / "two-ranks"
    result = run_torchrun(setup, distributed)

    left, right = CacheReader(distributed, verify=True), CacheReader(single, verify=True)
    assert left.manifest["num_shards"] == 3
    assert left.manifest["num_images"] == right.manifest["num_images"] == 10
    assert left.manifest["num_samples"] == right.manifest["num_samples"] == 20
    assert left.manifest["codec_state"] == right.manifest["codec_state"]
    assert left.manifest["fidelity"] == right.manifest["fidelity"]
    assert [r.to_json() for r in left.shards] == [r.to_json() for r in right.shards]

    for record in right.shards:
        got, want = left.read_shard(record.shard_id), right.read_shard(record.shard_id)
        np.testing.assert_array_equal(got.image_index, want.image_index)
        np.testing.assert_array_equal(got.params, want.params)
        assert got.jpeg == want.jpeg
        for name in want.targets:
            np.testing.assert_array_equal(got.targets[name], want.targets[name])

    # the bad input of shard 1 was met by rank 1, and the manifest lists every rank's skips
    names = setup["names"]
    assert f"[rank 1] WARNING pipeline.cache_build: skipping {names[4]}-text.jpg" in result.stderr
    skipped = {item["source"] for item in left.manifest["skipped"]}
    assert skipped == {f"{names[1]}-truncated.jpg", f"{names[4]}-text.jpg", f"{names[6]}-empty.jpg"}
    assert left.manifest["skipped"] == right.manifest["skipped"]
    assert left.manifest["num_skipped"] == 3


def test_rank_without_shards_finishes(setup: dict):
    out = setup["root"] / "one-shard"
    run_torchrun(setup, out, "--shard-size", "64")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["num_shards"] == 1
    assert manifest["num_images"] == 10
    assert manifest["num_skipped"] == 3
    assert manifest["codec_state"] is not None
