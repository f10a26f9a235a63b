"""Command-line details found by using the tool: option precedence, overwrite guards, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.tiny_runs import run_cli

from pipeline.config import PretrainConfig
from pipeline.errors import UsageError
from stages.extract_student import ExtractStudentConfig, check_output_path
from stages.pretrain import _check_config


def test_steps_replace_preset_epochs(tmp_path: Path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {"epochs": 3}}))
    result = run_cli(["pretrain", "--config", str(preset), "--steps", "2", "--out", str(tmp_path / "run")])
    # the run stops later, at the missing cache, not at "exactly one of --epochs and --steps"
    assert result.returncode == 2
    assert "exactly one of" not in result.stderr
    assert "--cache" in result.stderr


def test_help_shows_defaults():
    result = run_cli(["cache-targets", "--help"])
    assert result.returncode == 0
    assert "(default: 224)" in result.stdout


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"target_norm": "batch"}, "--target-norm"),
        ({"lr": -1.0}, "--lr"),
        ({"workers": -1}, "--workers"),
        ({"precision": "fp8"}, "--precision"),
    ],
)
def test_pretrain_rejects_invalid_values(changes, option):
    config = PretrainConfig(out="run", cache="cache", steps=1, **changes)
    with pytest.raises(UsageError, match=option):
        _check_config(config)


def test_extract_rejects_overwriting_input(tmp_path: Path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(UsageError, match="input checkpoint"):
        check_output_path(ExtractStudentConfig(checkpoint=checkpoint, output=checkpoint, overwrite=True))
    assert checkpoint.read_bytes() == b"weights"


def test_extract_rejects_existing_output(tmp_path: Path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    output = tmp_path / "student.safetensors"
    output.write_bytes(b"old")
    with pytest.raises(UsageError, match="--overwrite"):
        check_output_path(ExtractStudentConfig(checkpoint=checkpoint, output=output))
    check_output_path(ExtractStudentConfig(checkpoint=checkpoint, output=output, overwrite=True))
    with pytest.raises(UsageError, match="folder"):
        check_output_path(ExtractStudentConfig(checkpoint=checkpoint, output=tmp_path))


def test_extract_verify_swin_student(tmp_path: Path):
    import torch

    from pipeline.students import build_student
    from stages.extract_student import run_extract_student

    overrides = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}
    student = build_student("swin_tiny_patch4", 224, drop_path_rate=0.0, overrides=overrides)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": {f"student.{key}": value for key, value in student.state_dict().items()},
            "config": {"student": "swin_tiny_patch4", "img_size": 224, "student_overrides": overrides},
        },
        checkpoint,
    )
    output = tmp_path / "student.safetensors"
    text = run_extract_student(ExtractStudentConfig(checkpoint=checkpoint, output=output), verify=True)
    assert "SwinTransformer" in text
    assert "# verified" in text


def test_pretrain_checks_cache_files_before_training(tmp_path: Path):
    import json

    from helpers.tiny_runs import copy_photos, tiny_cache_config, tiny_pretrain_config, write_teacher_checkpoint

    from pipeline.errors import CorruptCacheError
    from stages.cache_targets import run_cache_targets
    from stages.pretrain import run_pretrain

    photos = copy_photos(tmp_path / "photos", 8)
    cache = tmp_path / "cache"
    run_cache_targets(tiny_cache_config(photos, cache, write_teacher_checkpoint(tmp_path), views=1))
    manifest = json.loads((cache / "manifest.json").read_text())
    last_shard = manifest["shards"][-1]
    chunk = next(name for name in last_shard["files"] if "/c/" in name)
    (cache / chunk).unlink()

    run_dir = tmp_path / "run"
    with pytest.raises(CorruptCacheError, match="missing"):
        run_pretrain(tiny_pretrain_config(run_dir, cache=str(cache), steps=2))
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("compile", "no"), ("epochs", 1.7), ("epochs", "three"), ("betas", 0.9), ("lr", "fast"), ("student", 3)],
)
def test_preset_value_of_wrong_type(key, value):
    from pipeline.config import resolve_config

    with pytest.raises(UsageError, match=key):
        resolve_config(PretrainConfig, {key: value}, {}, source="preset.yaml")


def test_preset_values_of_right_type():
    from pipeline.config import resolve_config

    preset = {"epochs": 3, "lr": 1, "betas": [0.9, 0.95], "compile": True, "drop_path": None, "student": "vit_tiny_patch16"}
    config = resolve_config(PretrainConfig, preset, {}, source="preset.yaml")
    assert config.betas == (0.9, 0.95)
    assert config.lr == 1
    assert config.compile is True


def test_resume_without_checkpoint_warns(tmp_path: Path):
    from helpers.tiny_runs import (
        IMG_SIZE,
        STUDENT,
        STUDENT_OVERRIDES,
        copy_photos,
        subprocess_env,
        tiny_cache_config,
        write_teacher_checkpoint,
    )

    from stages.cache_targets import run_cache_targets

    photos = copy_photos(tmp_path / "photos", 8)
    cache = tmp_path / "cache"
    run_cache_targets(tiny_cache_config(photos, cache, write_teacher_checkpoint(tmp_path), views=1))
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {
        "student": STUDENT, "student_overrides": STUDENT_OVERRIDES, "img_size": IMG_SIZE, "steps": 2,
        "batch_size": 2, "workers": 0, "device": "cpu",
    }}))
    run_dir = tmp_path / "run"

    result = run_cli(
        ["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(run_dir), "--resume"],
        env=subprocess_env(),
    )

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line and "--resume" in line]
    assert len(warnings) == 1
    assert str(run_dir) in warnings[0]
    assert "training starts from step 0" in warnings[0]
    assert "finished 2 steps" in result.stdout


@pytest.mark.parametrize(("changes", "source"), [
    ({"batch_size": 8}, "--blr 0.0001875 x global batch 8 / 256"),
    ({"batch_size": 8, "lr": 2e-6}, "--lr"),
])
def test_peak_lr_below_min_lr_warns(changes, source, caplog):
    import logging

    from pipeline.distributed import DistInfo
    from stages.pretrain import RunState, _build_schedule

    config = PretrainConfig(out="unused", cache="unused", **changes)
    state = RunState(step=0, total_steps=10, steps_per_epoch=5, order_streams=1)
    with caplog.at_level(logging.WARNING, logger="stages.pretrain"):
        schedule = _build_schedule(config, state, DistInfo(rank=0, local_rank=0, world_size=1))

    assert schedule.min_lr == schedule.peak_lr
    assert "is below --min-lr 1e-05" in caplog.text
    assert source in caplog.text


def test_peak_lr_above_min_lr_is_quiet(caplog):
    import logging

    from pipeline.distributed import DistInfo
    from stages.pretrain import RunState, _build_schedule

    config = PretrainConfig(out="unused", cache="unused", batch_size=256)
    state = RunState(step=0, total_steps=10, steps_per_epoch=5, order_streams=1)
    with caplog.at_level(logging.WARNING, logger="stages.pretrain"):
        _build_schedule(config, state, DistInfo(rank=0, local_rank=0, world_size=1))

    assert "min-lr" not in caplog.text


def test_gpu_decode_with_online_teacher_warns(tmp_path: Path, caplog):
    import logging

    import torch
    from helpers.tiny_runs import IMG_SIZE, STUDENT, STUDENT_OVERRIDES, copy_photos

    from pipeline.data.training import build_training_data
    from pipeline.masking import MaskConfig
    from pipeline.students import build_student

    config = PretrainConfig(
        out="unused", data=str(copy_photos(tmp_path / "photos", 4)), teacher="pixel", student=STUDENT,
        student_overrides=STUDENT_OVERRIDES, img_size=IMG_SIZE, batch_size=2, workers=0, device="cpu",
        gpu_decode=True,
    )
    student = build_student(STUDENT, IMG_SIZE, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    mask_config = MaskConfig(*student.grid_size, ratio=config.mask_ratio, min_block=config.min_mask_block)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.training"):
        data = build_training_data(config, student, mask_config, torch.device("cpu"))

    assert data.teacher is not None
    assert "--gpu-decode applies to cached views only" in caplog.text
