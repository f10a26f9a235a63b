"""DDP through torchrun with 2 CPU processes (gloo): coverage, losses, resume with 1 process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import yaml
from helpers.tiny_runs import (
    IMG_SIZE,
    REPO,
    STUDENT,
    STUDENT_OVERRIDES,
    copy_photos,
    free_port,
    read_metrics,
    tiny_cache_config,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader
from pipeline.config import PretrainConfig
from pipeline.data.sample_log import read_sample_log
from pipeline.data.training import split_validation
from pipeline.distributed import TORCHRUN_VARIABLES, DistInfo, read_torchrun_env, resolve_device
from pipeline.engine import MaskDistillModel, NonFiniteLossError, StepSettings, train_step
from pipeline.errors import UsageError
from pipeline.heads import build_head
from pipeline.students import build_student
from stages.cache_targets import run_cache_targets
from stages.pretrain import run_pretrain

NUM_IMAGES = 13  # 1 held out for validation, 12 train: 3 global batches of 4 per epoch
STEPS = 6
TORCHRUN_TIMEOUT_S = 420

# every setting that the 2-process and the 1-process runs share
RUN_SETTINGS = {
    "student": STUDENT,
    "student_overrides": STUDENT_OVERRIDES,
    "img_size": IMG_SIZE,
    "steps": STEPS,
    "lr": 1e-3,
    "warmup_steps": 1,
    "drop_path": 0.0,
    "val_fraction": 0.1,
    "log_every": 1,
    "checkpoint_every": 2,
    "device": "cpu",
    "seed": 0,
}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir) if "loss" in record}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-cache")
    photos = copy_photos(root / "photos", NUM_IMAGES)
    run_cache_targets(tiny_cache_config(photos, root / "cache", write_teacher_checkpoint(root)))
    return root / "cache"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir: Path) -> dict:
    """Run `pretrain` under torchrun with 2 processes of batch 2; return its folder and output."""
    root = tmp_path_factory.mktemp("ddp-run")
    preset = root / "two-processes.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {**RUN_SETTINGS, "batch_size": 2, "workers": 2, "log_samples": True}}))
    run_dir = root / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "cli", "pretrain", "--config", str(preset), "--cache", str(cache_dir), "--out", str(run_dir),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"run_dir": run_dir, "stdout": result.stdout, "stderr": result.stderr}


def train_images(cache_dir: Path) -> set[int]:
    """Image indices of the training samples: all but the validation split."""
    reader = CacheReader(cache_dir)
    images = np.concatenate([reader.read_shard(record.shard_id, 0).image_index for record in reader.shards])
    train_ids, _ = split_validation(len(images), RUN_SETTINGS["val_fraction"], RUN_SETTINGS["seed"])
    return {int(i) for i in images[train_ids]}


def test_ranks_see_each_sample_once(two_process_run: dict, cache_dir: Path):
    records = read_sample_log(two_process_run["run_dir"])
    expected = train_images(cache_dir)

    for rank in (0, 1):
        mine = [record for record in records if record["rank"] == rank]
        assert [record["step"] for record in mine] == list(range(1, STEPS + 1))
        assert all(len(record["image_index"]) == 2 for record in mine)
    for step in range(1, STEPS + 1):
        first, second = [set(record["image_index"]) for record in records if record["step"] == step]
        assert not first & second
    for epoch in (0, 1):
        seen = [i for record in records if record["epoch"] == epoch for i in record["image_index"]]
        assert len(seen) == len(expected)
        assert set(seen) == expected
        assert {record["view"] for record in records if record["epoch"] == epoch} == {epoch}


def test_only_rank_zero_logs_and_writes(two_process_run: dict):
    run_dir = two_process_run["run_dir"]
    stderr = two_process_run["stderr"]
    checkpoint = torch.load(run_dir / "checkpoint-last.pt", weights_only=True)
    assert len(losses_by_step(run_dir)) == STEPS
    assert len([record for record in read_metrics(run_dir) if "loss" in record]) == STEPS
    assert stderr.count(f"step {STEPS}/{STEPS}") == 1
    assert "[rank 1] INFO" not in stderr
    assert two_process_run["stdout"].count(f"finished {STEPS} steps") == 1
    assert checkpoint["world_size"] == 2
    assert sorted(checkpoint["rng"]) == [0, 1]
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]


def test_two_processes_match_one(two_process_run: dict, cache_dir: Path, tmp_path: Path):
    # the same worker count, so the same batch order
    single = PretrainConfig(out=str(tmp_path / "single"), cache=str(cache_dir), batch_size=4, workers=2, **RUN_SETTINGS)
    summary = run_pretrain(single)

    distributed = losses_by_step(two_process_run["run_dir"])
    alone = losses_by_step(tmp_path / "single")
    val_distributed = [r["val_loss"] for r in read_metrics(two_process_run["run_dir"]) if "val_loss" in r]
    val_alone = [r["val_loss"] for r in read_metrics(tmp_path / "single") if "val_loss" in r]
    assert sorted(distributed) == sorted(alone) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([distributed[s] for s in alone], list(alone.values()), rtol=1e-4)
    np.testing.assert_allclose(val_distributed, val_alone, rtol=1e-4)
    assert len(val_alone) == 2
    assert summary["loss"] == pytest.approx(alone[STEPS])


def test_two_process_checkpoint_resumes_alone(two_process_run: dict, cache_dir: Path, tmp_path: Path, caplog):
    # step 2 is inside the first epoch (3 steps); the resumed run has no loader workers
    source = two_process_run["run_dir"]
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copyfile(source / "config.yaml", resumed_dir / "config.yaml")
    shutil.copyfile(source / "checkpoint-00000002.pt", resumed_dir / "checkpoint-last.pt")

    config = PretrainConfig(
        out=str(resumed_dir), cache=str(cache_dir), batch_size=4, workers=0, resume=True, **RUN_SETTINGS
    )
    with caplog.at_level(logging.WARNING, logger="stages.pretrain"):
        summary = run_pretrain(config)

    distributed = losses_by_step(source)
    resumed = losses_by_step(resumed_dir)
    checkpoint = torch.load(resumed_dir / "checkpoint-last.pt", weights_only=True)
    assert sorted(resumed) == [3, 4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (3, 4, 5, 6)], [distributed[s] for s in (3, 4, 5, 6)], rtol=1e-4)
    assert summary["steps"] == STEPS
    assert checkpoint["step"] == STEPS
    assert checkpoint["world_size"] == 1
    assert checkpoint["order_streams"] == 2
    assert "has 2 streams" in caplog.text


def _non_finite_worker(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo ranks taking 3 DDP steps; rank 0's targets are NaN in the second step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    student = build_student(STUDENT, 32, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    model = torch.nn.parallel.DistributedDataParallel(MaskDistillModel(student, build_head("fc", student, 8)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = StepSettings("smooth_l1", 1.0, "layernorm", 3.0, None)

    raised_at = None
    for step in range(3):
        images = torch.randn(2, 3, 32, 32)
        targets = torch.randn(2, 4, 8)
        if rank == 0 and step == 1:
            targets.fill_(float("nan"))
        mask = torch.tensor([[[True, False], [False, True]]]).expand(2, 2, 2)
        try:
            train_step(model, optimizer, images, targets, mask, settings, step)
        except NonFiniteLossError:
            raised_at = step
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"raised_at": raised_at}))
    dist.destroy_process_group()


def test_non_finite_step_stops_every_rank(tmp_path: Path):
    context = torch.multiprocessing.start_processes(
        _non_finite_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    for process in context.processes:
        process.join(timeout=180)
    alive = [process.pid for process in context.processes if process.is_alive()]
    for process in context.processes:
        if process.is_alive():
            process.kill()
    assert alive == []
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"raised_at": 1}
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"raised_at": 1}


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend that CUDA is available with 2 GPUs, for the device choice only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_follows_local_rank(two_gpus):
    info = DistInfo(rank=3, local_rank=1, world_size=4)
    assert resolve_device("cuda", info) == torch.device("cuda", 1)
    assert resolve_device("auto", info) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", DistInfo()) == torch.device("cuda", 1)


def test_device_rejects_one_gpu_for_all_ranks(two_gpus):
    with pytest.raises(UsageError, match="--device cuda so that each process"):
        resolve_device("cuda:0", DistInfo(rank=1, local_rank=1, world_size=2))


def test_device_rejects_rank_without_gpu(two_gpus):
    with pytest.raises(UsageError, match="LOCAL_RANK 2 has no GPU"):
        resolve_device("cuda", DistInfo(rank=2, local_rank=2, world_size=3))


def test_device_rejects_invisible_index(two_gpus):
    with pytest.raises(UsageError) as error:
        resolve_device("cuda:2", DistInfo())
    assert "--device cuda:2" in str(error.value)
    assert "cuda:0 to cuda:1" in str(error.value)


def test_device_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", DistInfo(rank=1, local_rank=1, world_size=2)) == torch.device("cpu")
    assert resolve_device("cpu", DistInfo()) == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_device_cuda_without_cuda(monkeypatch, requested: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as error:
        resolve_device(requested, DistInfo())
    message = str(error.value)
    assert f"--device {requested}" in message
    assert "CUDA is not available" in message
    assert "--device cpu" in message
    assert "--device auto" in message


@pytest.mark.parametrize("requested", ["gpu", "CPU", "cuda:x", "cuda:-1", "cpu:0", "mps", " cuda", ""])
def test_device_invalid_string(requested: str):
    with pytest.raises(UsageError) as error:
        resolve_device(requested, DistInfo())
    message = str(error.value)
    assert f"invalid --device {requested!r}" in message
    assert "auto, cpu, cuda or cuda:N" in message


def test_torchrun_env_incomplete_is_rejected(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert read_torchrun_env() == DistInfo()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        read_torchrun_env()
