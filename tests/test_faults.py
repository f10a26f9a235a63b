"""Faults during a run: kills, failed and full-disk writes, damaged caches, diverging training.

The kill and disk-full cases run the real command line in a subprocess, through a small harness
written to the test's folder. The harness makes one chosen file write fail after half of its
bytes, by SIGKILL or by an OSError. The runs then resume in-process and must give the losses of
an uninterrupted run, step for step.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
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

from pipeline import atomic
from pipeline.cache import CacheReader
from pipeline.checkpoint import LAST_NAME, check_finite, save_checkpoint
from pipeline.config import PretrainConfig, load_preset, resolve_config
from pipeline.data.training import TrainingData
from pipeline.engine import NonFiniteLossError, TrainingDivergedError
from pipeline.errors import CorruptCacheError
from stages.cache_targets import run_cache_targets
from stages.pretrain import run_pretrain

STEPS = 12
CHECKPOINT_EVERY = 4

PRETRAIN_PRESET = {
    "student": STUDENT,
    "student_overrides": STUDENT_OVERRIDES,
    "img_size": IMG_SIZE,
    "steps": STEPS,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "drop_path": 0.1,
    "val_fraction": 0.1,
    "log_every": 1,
    "checkpoint_every": CHECKPOINT_EVERY,
    "workers": 0,
    "device": "cpu",
}

# The harness runs `cli.main()` with the arguments after the first. The first, KIND:NAME:NTH,
# makes the NTH atomic write of a file whose name contains NAME fail. KIND is kill-write (write
# half, then SIGKILL), kill-rename (SIGKILL once the temp file is complete, before the rename),
# enospc or eio (write half, then raise OSError with that errno). enospc-zarr fails the NTH chunk
# or metadata write of zarr whose path contains NAME.
HARNESS = textwrap.dedent(
    """
    import builtins, errno, os, signal, sys

    sys.path.insert(0, os.getcwd())
    import torch
    torch.set_num_threads(2)
    import pipeline.atomic as atomic
    import zarr.storage._local as zarr_local

    kind, name, nth = sys.argv[1].split(":")
    seen = 0
    real_open, real_replace, real_put = builtins.open, os.replace, zarr_local._put


    class FailingFile:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            os.fsync(self.file.fileno())
            if kind == "kill-write":
                os.kill(os.getpid(), signal.SIGKILL)
            code = errno.ENOSPC if kind == "enospc" else errno.EIO
            raise OSError(code, os.strerror(code))

        def __getattr__(self, attribute):
            return getattr(self.file, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()


    def chosen(path):
        global seen
        if name not in (str(path) if kind == "enospc-zarr" else os.path.basename(path)):
            return False
        seen += 1
        return seen == int(nth)


    def hooked_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        if kind not in ("kill-rename", "enospc-zarr") and chosen(path):
            return FailingFile(file)
        return file


    def hooked_replace(source, destination):
        if kind == "kill-rename" and chosen(destination):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, destination)


    def hooked_put(path, value, exclusive=False):
        if kind == "enospc-zarr" and chosen(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(path, value, exclusive=exclusive)


    atomic.open = hooked_open
    zarr_local._put = hooked_put
    os.replace = hooked_replace
    sys.argv = ["maskdistill", *sys.argv[2:]]
    import cli
    cli.main()
    """
)


def read_losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir)
    steps = [record["step"] for record in records if "loss" in record]
    assert len(steps) == len(set(steps)), "a step was recorded twice"
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def temp_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(atomic.TEMP_PREFIX))


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def all_finite(path: Path) -> bool:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [value for value in payload["model"].values() if value.is_floating_point()]
    for state in payload["optimizer"]["state"].values():
        tensors += [value for value in state.values() if torch.is_tensor(value) and value.is_floating_point()]
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def run_harness(hook: str, arguments: list[str], folder: Path) -> subprocess.CompletedProcess:
    script = folder / "harness.py"
    script.write_text(HARNESS)
    return subprocess.run(
        [sys.executable, str(script), hook, *arguments],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def teacher_file(work: Path) -> Path:
    return write_teacher_checkpoint(work)


@pytest.fixture(scope="module")
def photos(work: Path) -> Path:
    return copy_photos(work / "photos", 12)


@pytest.fixture(scope="module")
def cache(work: Path, photos: Path, teacher_file: Path) -> Path:
    out = work / "cache"
    run_cache_targets(tiny_cache_config(photos, out, teacher_file))
    return out


@pytest.fixture(scope="module")
def preset(work: Path) -> Path:
    path = work / "preset.yaml"
    path.write_text(yaml.safe_dump({"pretrain": PRETRAIN_PRESET}))
    return path


def pretrain_config(preset: Path, **options) -> PretrainConfig:
    """The config that `maskdistill pretrain --config PRESET` with these options resolves to."""
    return resolve_config(PretrainConfig, load_preset(preset, "pretrain"), options, source=str(preset))


def pretrain_arguments(preset: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(run_dir), *extra]


@pytest.fixture(scope="module")
def straight_losses(work: Path, preset: Path, cache: Path) -> dict[int, float]:
    run_dir = work / "straight"
    run_pretrain(pretrain_config(preset, cache=str(cache), out=str(run_dir)))
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def resume(preset: Path, cache: Path, run_dir: Path) -> None:
    run_pretrain(pretrain_config(preset, cache=str(cache), out=str(run_dir), resume=True))


# Killed and failed checkpoint writes


@pytest.mark.parametrize(
    ("hook", "saved_step"),
    [
        ("kill-rename:checkpoint-last.pt:2", CHECKPOINT_EVERY),  # temp file complete, not renamed
        ("kill-write:checkpoint-last.pt:2", CHECKPOINT_EVERY),  # temp file half written
        ("kill-write:checkpoint-00000004.pt:1", CHECKPOINT_EVERY),  # numbered copy half written
        ("kill-write:checkpoint-last.pt:1", None),  # before the first checkpoint exists
    ],
)
def test_kill_during_checkpoint_resumes_same(
    tmp_path: Path, preset: Path, cache: Path, straight_losses: dict, hook: str, saved_step: int | None
):
    run_dir = tmp_path / "run"
    killed = run_harness(hook, pretrain_arguments(preset, cache, run_dir), tmp_path)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert temp_files(run_dir), "the kill should leave the temp file of the interrupted write"
    if saved_step is None:
        assert not (run_dir / LAST_NAME).exists()
    else:
        assert checkpoint_step(run_dir / LAST_NAME) == saved_step
    if "00000004" in hook:
        assert not (run_dir / "checkpoint-00000004.pt").exists()

    resume(preset, cache, run_dir)

    assert read_losses(run_dir) == straight_losses
    assert temp_files(run_dir) == []
    assert checkpoint_step(run_dir / LAST_NAME) == STEPS


def test_kill_at_random_step_resumes_same(tmp_path: Path, preset: Path, cache: Path, straight_losses: dict):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *pretrain_arguments(preset, cache, run_dir)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= CHECKPOINT_EVERY + 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)

    assert process.returncode == -signal.SIGKILL
    assert checkpoint_step(run_dir / LAST_NAME) < STEPS
    with metrics.open("a") as stream:  # a record cut off by the kill
        stream.write('{"step": 7, "epoch": 3, "lo')

    resume(preset, cache, run_dir)

    # NOTE: the straight run is in the pytest process and the killed one in a subprocess. On a
    # loaded machine their losses once differed in the 7th significant digit, so this compares
    # to 1e-6. In-process resume is checked bit for bit in test_end_to_end.py.
    resumed = read_losses(run_dir)
    assert sorted(resumed) == sorted(straight_losses)
    for step, loss in straight_losses.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=0)


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """Return the steps of scalar `tag` in the run's TensorBoard events, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_kill_after_checkpoint_keeps_steps_increasing(tmp_path: Path, preset: Path, cache: Path):
    run_dir = tmp_path / "run"
    # killed while writing the checkpoint of step 8, after the records of steps 5 to 8
    killed = run_harness("kill-write:checkpoint-last.pt:2", pretrain_arguments(preset, cache, run_dir), tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_step(run_dir / LAST_NAME) == CHECKPOINT_EVERY
    assert max(record["step"] for record in read_metrics(run_dir)) == 2 * CHECKPOINT_EVERY
    assert tensorboard_steps(run_dir, "loss") == list(range(1, 2 * CHECKPOINT_EVERY + 1))

    # TensorBoard reads event files in name order, and names start with the creation time in whole
    # seconds. A real resume comes seconds later, but this tiny run can be killed within its first second.
    time.sleep(1.0)
    resume(preset, cache, run_dir)

    metrics_steps = [record["step"] for record in read_metrics(run_dir)]
    assert metrics_steps == sorted(metrics_steps)
    assert [record["step"] for record in read_metrics(run_dir) if "loss" in record] == list(range(1, STEPS + 1))
    assert tensorboard_steps(run_dir, "loss") == list(range(1, STEPS + 1))
    validation_steps = tensorboard_steps(run_dir, "val_loss")
    assert validation_steps == sorted(set(validation_steps))
    assert validation_steps[-1] == STEPS
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_checkpoint_with_nan_not_written(tmp_path: Path):
    path = tmp_path / LAST_NAME
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "optimizer": {"state": {}}, "step": 1})
    before = path.read_bytes()
    poisoned = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "optimizer": {"state": {}}, "step": 2}

    with pytest.raises(TrainingDivergedError) as error:
        save_checkpoint(path, poisoned, copies=(tmp_path / "checkpoint-00000002.pt",))

    assert "model.w" in str(error.value)
    assert "step 2" in str(error.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "checkpoint-00000002.pt").exists()


def test_check_finite_finds_optimizer_moment(tmp_path: Path):
    payload = {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg_sq": torch.tensor([1.0, float("inf")])}}},
        "step": 5,
    }

    with pytest.raises(TrainingDivergedError, match="optimizer.state.0.exp_avg_sq"):
        check_finite(payload, tmp_path / LAST_NAME)


# Full disk


def test_disk_full_checkpoint_then_resume(tmp_path: Path, preset: Path, cache: Path, straight_losses: dict):
    run_dir = tmp_path / "run"
    full = run_harness("enospc:checkpoint-last.pt:2", pretrain_arguments(preset, cache, run_dir), tmp_path)
    lines = full.stderr.strip().splitlines()

    assert full.returncode == 2
    assert lines[-1].startswith("error: no space left on device while writing ")
    assert str(run_dir / LAST_NAME) in lines[-1]
    assert "--resume" in lines[-1]
    assert "Traceback" not in full.stderr
    assert checkpoint_step(run_dir / LAST_NAME) == CHECKPOINT_EVERY
    assert temp_files(run_dir) == []

    resume(preset, cache, run_dir)

    assert read_losses(run_dir) == straight_losses


@pytest.mark.parametrize(
    "hook", ["enospc:manifest.json:2", "enospc:shard_000001.done.json:1", "enospc-zarr:shard_000001:3"]
)
def test_disk_full_cache_then_rerun(tmp_path: Path, photos: Path, teacher_file: Path, cache: Path, hook: str):
    out = tmp_path / "cache"
    preset = tmp_path / "cache.yaml"
    settings = {"teacher_overrides": tiny_overrides(), "img_size": IMG_SIZE, "views": 2, "batch_size": 8,
                "workers": 0, "device": "cpu", "shard_size": 4, "fidelity_views": 4}
    preset.write_text(yaml.safe_dump({"cache_targets": settings}))
    arguments = ["cache-targets", "--config", str(preset), "--data", str(photos), "--out", str(out),
                 "--teacher", TEACHER, "--teacher-weights", str(teacher_file)]

    full = run_harness(hook, arguments, tmp_path)
    lines = full.stderr.strip().splitlines()

    assert full.returncode == 2
    assert lines[-1].startswith("error: no space left on device while writing ")
    assert hook.split(":")[1] in lines[-1]
    assert "Traceback" not in full.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    run_cache_targets(tiny_cache_config(photos, out, teacher_file))
    rerun, reference = CacheReader(out), CacheReader(cache)

    assert rerun.manifest["complete"] is True
    assert rerun.num_samples() == reference.num_samples()
    for record in reference.shards:
        expected, actual = reference.read_shard(record.shard_id), rerun.read_shard(record.shard_id)
        assert actual.jpeg == expected.jpeg
        for part in expected.targets:
            np.testing.assert_array_equal(actual.targets[part], expected.targets[part])


# Damaged caches


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def target_chunk(cache: Path, shard: str, view: int) -> Path:
    """Return the chunk file of view `view` of the fp16 target array of a zarr shard."""
    return cache / "shards" / shard / "targets" / "values" / "c" / str(view) / "0" / "0"


def damage(cache: Path, kind: str) -> None:
    if kind == "flipped byte":
        chunk = target_chunk(cache, "shard_000001", 0)
        flip_byte(chunk, chunk.stat().st_size // 2)
    elif kind == "truncated chunk":
        chunk = target_chunk(cache, "shard_000001", 0)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif kind == "missing chunk":
        target_chunk(cache, "shard_000001", 0).unlink()
    elif kind == "truncated tar":
        tar = cache / "shards" / "shard_000001-v0.tar"
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])


@pytest.fixture(scope="module")
def wds_cache(work: Path, photos: Path, teacher_file: Path) -> Path:
    out = work / "wds-cache"
    run_cache_targets(tiny_cache_config(photos, out, teacher_file, format="wds"))
    return out


DAMAGES = [
    ("zarr", "flipped byte", "does not match its sha256"),
    ("zarr", "truncated chunk", "does not match its sha256"),
    ("zarr", "missing chunk", "is missing"),
    ("wds", "truncated tar", "does not match its sha256"),
]


def damaged_copy(tmp_path: Path, cache: Path, wds_cache: Path, fmt: str, kind: str) -> Path:
    damaged = tmp_path / "cache"
    shutil.copytree(cache if fmt == "zarr" else wds_cache, damaged)
    damage(damaged, kind)
    return damaged


@pytest.mark.parametrize(("fmt", "kind", "problem"), DAMAGES)
def test_verify_cli_names_damaged_shard(tmp_path: Path, cache: Path, wds_cache: Path, fmt: str, kind: str, problem: str):
    damaged = damaged_copy(tmp_path, cache, wds_cache, fmt, kind)

    verify = run_cli(["verify", str(damaged)], env=subprocess_env())

    assert verify.returncode == 1
    assert "is damaged: 1 of 3 shards" in verify.stdout
    assert "shard_000001" in verify.stdout
    assert problem in verify.stdout
    if kind == "flipped byte":
        assert "damaged samples (image_index, view): [(" in verify.stdout


@pytest.mark.parametrize(("fmt", "kind", "problem"), [DAMAGES[0], DAMAGES[3]])
def test_pretrain_cli_rejects_damaged_cache(
    tmp_path: Path, cache: Path, wds_cache: Path, preset: Path, fmt: str, kind: str, problem: str
):
    damaged = damaged_copy(tmp_path, cache, wds_cache, fmt, kind)

    pretrain = run_cli(pretrain_arguments(preset, damaged, tmp_path / "run", "--workers", "2"), env=subprocess_env())
    lines = pretrain.stderr.strip().splitlines()

    assert pretrain.returncode == 2
    assert lines[-1].startswith("error: cache shard shard_000001 in ")
    assert problem in lines[-1]
    assert "Traceback" not in pretrain.stderr


@pytest.mark.parametrize(("fmt", "kind", "problem"), DAMAGES[1:3])
def test_pretrain_rejects_damaged_cache(
    tmp_path: Path, cache: Path, wds_cache: Path, preset: Path, fmt: str, kind: str, problem: str
):
    damaged = damaged_copy(tmp_path, cache, wds_cache, fmt, kind)

    with pytest.raises(CorruptCacheError) as error:
        run_pretrain(pretrain_config(preset, cache=str(damaged), out=str(tmp_path / "run")))

    assert "cache shard shard_000001" in str(error.value)
    assert problem in str(error.value)


# Diverging training


def test_huge_lr_stops_with_step(tmp_path: Path, preset: Path, cache: Path):
    run_dir = tmp_path / "run"
    config = pretrain_config(preset, cache=str(cache), out=str(run_dir), lr=1e30, warmup_steps=0, checkpoint_every=1)

    with pytest.raises(NonFiniteLossError) as error:
        run_pretrain(config)

    message = str(error.value)
    step = error.value.step
    assert step > 1
    assert f"non-finite loss at step {step} " in message
    assert f"{run_dir / LAST_NAME} keeps the last good weights (step {step - 1})" in message
    assert "--lr" in message
    assert checkpoint_step(run_dir / LAST_NAME) == step - 1
    assert all_finite(run_dir / LAST_NAME)


def test_nan_targets_keep_last_checkpoint(tmp_path: Path, preset: Path, cache: Path, monkeypatch):
    original = TrainingData.to_device
    calls = []

    def poisoned(self, batch, device, settings):
        images, targets, mask = original(self, batch, device, settings)
        calls.append(1)
        if len(calls) == CHECKPOINT_EVERY + 2:
            targets = torch.full_like(targets, float("nan"))
        return images, targets, mask

    monkeypatch.setattr(TrainingData, "to_device", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        run_pretrain(pretrain_config(preset, cache=str(cache), out=str(run_dir), val_fraction=0.0))

    assert error.value.step == CHECKPOINT_EVERY + 2
    assert f"step {CHECKPOINT_EVERY})" in str(error.value)
    assert checkpoint_step(run_dir / LAST_NAME) == CHECKPOINT_EVERY
    assert all_finite(run_dir / LAST_NAME)
    assert sorted(read_losses(run_dir)) == list(range(1, CHECKPOINT_EVERY + 2))


def test_nan_weights_not_checkpointed(tmp_path: Path, preset: Path, cache: Path, monkeypatch):
    import stages.pretrain as pretrain_stage

    original = pretrain_stage.train_step

    def poisoning(model, optimizer, *args):
        result = original(model, optimizer, *args)
        if args[-1] == CHECKPOINT_EVERY + 1:  # step 6, which ends with a checkpoint
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return result

    monkeypatch.setattr(pretrain_stage, "train_step", poisoning)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as error:
        run_pretrain(pretrain_config(preset, cache=str(cache), out=str(run_dir), checkpoint_every=CHECKPOINT_EVERY // 2))

    assert "NaN or infinite values at step" in str(error.value)
    assert checkpoint_step(run_dir / LAST_NAME) == CHECKPOINT_EVERY
    assert all_finite(run_dir / LAST_NAME)
    assert not (run_dir / f"checkpoint-{CHECKPOINT_EVERY + 2:08d}.pt").exists()


def test_huge_lr_cli_one_line_exit_1(tmp_path: Path, preset: Path, cache: Path):
    arguments = pretrain_arguments(preset, cache, tmp_path / "run", "--lr", "1e30", "--warmup-steps", "0")
    result = run_cli(arguments, env=subprocess_env())
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 1
    assert lines[-1].startswith("error: non-finite loss at step ")
    assert "Traceback" not in result.stderr
