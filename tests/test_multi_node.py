"""Two torchrun "nodes" of one CPU process each, on this machine, for both stages.

In a multi-node job with one process per node, every process has LOCAL_RANK 0 and only RANK differs.
Two launchers with `--nnodes 2 --node_rank 0|1` and a static rendezvous on 127.0.0.1 reproduce
that, so code that confuses the two ranks (two rank-0 writers, a rank that skips its shards)
fails here. The folders are shared, as a cluster's network filesystem is.
"""

from __future__ import annotations

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
    STUDENT,
    STUDENT_OVERRIDES,
    TEACHER,
    copy_photos,
    free_port,
    read_metrics,
    run_cli,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader
from pipeline.data.sample_log import read_sample_log

NUM_IMAGES = 9  # 1 held out for validation, 8 train: 2 global batches of 4 per epoch
STEPS = 4
RUN_TIMEOUT_S = 420
# One thread per process in every run, so that both cache runs compute bitwise equal targets.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

CACHE_SETTINGS = {
    "teacher": TEACHER, "teacher_overrides": tiny_overrides(), "img_size": IMG_SIZE, "views": 2,
    "shard_size": 3, "batch_size": 4, "workers": 0, "device": "cpu", "codec": "int8-token",
    "calibration_images": 3, "fidelity_views": 4,
}
PRETRAIN_SETTINGS = {
    "student": STUDENT, "student_overrides": STUDENT_OVERRIDES, "img_size": IMG_SIZE, "steps": STEPS,
    "lr": 1e-3, "warmup_steps": 1, "drop_path": 0.0, "val_fraction": 0.1, "log_every": 1,
    "checkpoint_every": 100, "device": "cpu", "seed": 0, "workers": 1,
}


def run_two_nodes(arguments: list[str]) -> list[subprocess.CompletedProcess]:
    """Run `python -m cli ARGUMENTS` as a 2-node torchrun job of one process per node and return both launchers' results."""
    port = str(free_port())
    launchers = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
            "-m", "cli", *arguments,
        ]
        launchers.append(subprocess.Popen(
            command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ))

    results = []
    try:
        for launcher in launchers:
            stdout, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for node_rank, result in enumerate(results):
        assert result.returncode == 0, f"node {node_rank}:\n{result.stderr[-3000:]}"
    return results


def run_one_process(arguments: list[str]) -> subprocess.CompletedProcess:
    result = run_cli(arguments, env=ONE_THREAD, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Nine photos, a tiny CLIP checkpoint, presets for both stages, and the 2-node cache."""
    root = tmp_path_factory.mktemp("two-nodes")
    photos = copy_photos(root / "photos", NUM_IMAGES)
    teacher = write_teacher_checkpoint(root)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "cache_targets": {**CACHE_SETTINGS, "teacher_weights": str(teacher)},
        "pretrain": PRETRAIN_SETTINGS,
    }))

    cache = root / "cache-two-nodes"
    cache_results = run_two_nodes(
        ["cache-targets", "--config", str(preset), "--data", str(photos), "--out", str(cache)]
    )
    return {"root": root, "photos": photos, "preset": preset, "cache": cache, "cache_results": cache_results}


def test_two_nodes_write_single_process_cache(setup: dict):
    single = setup["root"] / "cache-single"
    run_one_process(["cache-targets", "--config", str(setup["preset"]), "--data", str(setup["photos"]), "--out", str(single)])

    left, right = CacheReader(setup["cache"], verify=True), CacheReader(single, verify=True)
    assert left.manifest["complete"] is True
    assert left.manifest["num_shards"] == 3
    assert left.manifest["num_images"] == right.manifest["num_images"] == NUM_IMAGES
    assert left.manifest["codec_state"] == right.manifest["codec_state"]
    assert [record.to_json() for record in left.shards] == [record.to_json() for record in right.shards]
    for record in right.shards:
        got, want = left.read_shard(record.shard_id), right.read_shard(record.shard_id)
        np.testing.assert_array_equal(got.image_index, want.image_index)
        assert got.jpeg == want.jpeg
        for name in want.targets:
            np.testing.assert_array_equal(got.targets[name], want.targets[name])


def test_two_nodes_cache_logs_from_rank_zero(setup: dict):
    first, second = setup["cache_results"]
    assert " INFO stages.cache_targets: " in first.stderr
    assert " INFO stages.cache_targets: " not in second.stderr
    assert "[rank 1] INFO" not in second.stderr


def test_two_nodes_train_like_one_process(setup: dict):
    cache, preset, root = setup["cache"], setup["preset"], setup["root"]
    two_nodes, single = root / "run-two-nodes", root / "run-single"
    results = run_two_nodes(
        ["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(two_nodes),
         "--batch-size", "2", "--log-samples"]
    )
    run_one_process(["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(single), "--batch-size", "4"])

    distributed = {r["step"]: r["loss"] for r in read_metrics(two_nodes) if "loss" in r}
    alone = {r["step"]: r["loss"] for r in read_metrics(single) if "loss" in r}
    assert sorted(distributed) == sorted(alone) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([distributed[step] for step in alone], list(alone.values()), rtol=1e-4)

    # node 1's process has LOCAL_RANK 0 but is rank 1: it neither logs steps nor writes metrics
    assert len([record for record in read_metrics(two_nodes) if "loss" in record]) == STEPS
    assert results[0].stderr.count(f"step {STEPS}/{STEPS}") == 1
    assert f"step {STEPS}/{STEPS}" not in results[1].stderr
    assert f"finished {STEPS} steps" in results[0].stdout
    assert results[1].stdout == ""
    assert sorted(path.name for path in (two_nodes / "samples").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]

    records = read_sample_log(two_nodes)
    for step in range(1, STEPS + 1):
        first, second = [set(record["image_index"]) for record in records if record["step"] == step]
        assert len(first) == len(second) == 2
        assert not first & second
