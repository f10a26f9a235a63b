"""The whole chain on real photos with tiny real models: cache, pretrain, resume, extract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import (
    IMG_SIZE,
    STUDENT,
    STUDENT_OVERRIDES,
    TEACHER,
    read_metrics,
    run_cli,
    tiny_cache_config,
    tiny_pretrain_config,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader
from pipeline.codecs import build_codec
from pipeline.config import PretrainConfig
from pipeline.data.teacher_views import TeacherViews
from pipeline.errors import CacheMismatchError
from pipeline.extract import build_timm_model, extract_student
from pipeline.sources import open_source
from pipeline.students import build_student
from pipeline.teachers import build_teacher
from pipeline.views import AugmentConfig
from stages.cache_targets import run_cache_targets
from stages.pretrain import run_pretrain

# shard_size and views match the cache, so that the online run orders images and views as the cached run does.
PRETRAIN_SETTINGS = {"steps": 4, "checkpoint_every": 2, "shard_size": 4, "views": 2}


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    return write_teacher_checkpoint(tmp_path)


def pretrain_config(out: Path, **changes) -> PretrainConfig:
    return tiny_pretrain_config(out, **{**PRETRAIN_SETTINGS, **changes})


def read_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from the run's metrics file (a resumed run appends to it)."""
    return {record["step"]: record["loss"] for record in read_metrics(run_dir) if "loss" in record}


@pytest.fixture
def cache_dir(tmp_path: Path, photo_folder: Path, teacher_file: Path) -> Path:
    out = tmp_path / "cache"
    run_cache_targets(tiny_cache_config(photo_folder, out, teacher_file, fidelity_views=8))
    return out


def test_cache_manifest_describes_run(cache_dir: Path):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    settings = manifest["settings"]
    assert manifest["complete"] is True
    assert manifest["num_images"] == 13
    assert manifest["num_samples"] == 26
    assert settings["views"] == 2
    assert settings["targets"]["grid"] == [6, 6]
    assert settings["targets"]["dim"] == 64
    assert settings["teacher"]["input_size"] == 96
    assert len(settings["teacher"]["weights_sha256"]) == 64
    assert settings["teacher"]["activation"] == "quick_gelu"
    assert settings["codec"]["name"] == "fp16"
    assert manifest["fidelity"]["cosine_mean"] > 0.999
    assert manifest["num_skipped"] == 0


def test_cached_targets_equal_online_teacher(cache_dir: Path, photo_folder: Path, teacher_file: Path):
    reader = CacheReader(cache_dir)
    teacher = build_teacher(
        TEACHER, str(teacher_file), student_img_size=IMG_SIZE, student_patch_size=16, overrides=tiny_overrides()
    )
    source = open_source(photo_folder)
    codec = build_codec("fp16")

    for view in (0, 1):
        data = reader.read_shard(reader.shards[0].shard_id, view)
        dataset = TeacherViews(
            source, [int(i) for i in data.image_index], 2, IMG_SIZE, teacher.input_size,
            AugmentConfig(), seed=0, jpeg_quality=95, view_indices=[view],
        )
        teacher_images = torch.cat([dataset[i].teacher_images for i in range(len(dataset))])
        with torch.no_grad():
            exact = teacher(teacher_images).numpy()
        stored = codec.decode(data.targets)
        assert stored.shape == exact.shape
        np.testing.assert_allclose(stored, exact, rtol=2e-3, atol=2e-3)
        assert np.all(data.view_index == view)


def test_views_differ_between_view_indices(cache_dir: Path):
    reader = CacheReader(cache_dir)
    first = reader.read_shard(reader.shards[0].shard_id, 0)
    second = reader.read_shard(reader.shards[0].shard_id, 1)
    assert np.array_equal(first.image_index, second.image_index)
    assert not np.array_equal(first.params, second.params)
    assert first.jpeg[0] != second.jpeg[0]


def test_cached_and_online_first_losses_match(tmp_path: Path, cache_dir: Path, photo_folder: Path, teacher_file: Path):
    cached = run_pretrain(pretrain_config(tmp_path / "cached", cache=str(cache_dir), steps=3))
    online = run_pretrain(
        pretrain_config(
            tmp_path / "online", teacher=TEACHER, teacher_weights=str(teacher_file),
            teacher_overrides=tiny_overrides(), data=str(photo_folder), steps=3,
        )
    )
    cached_losses = list(read_losses(tmp_path / "cached").values())
    online_losses = list(read_losses(tmp_path / "online").values())
    assert len(cached_losses) == 3
    # the cached student views went through JPEG (quality 95), the online ones did not
    np.testing.assert_allclose(cached_losses, online_losses, rtol=2e-2)
    assert cached["steps"] == online["steps"] == 3


def test_resume_continues_with_identical_losses(tmp_path: Path, cache_dir: Path, monkeypatch):
    settings = dict(cache=str(cache_dir), steps=6, drop_path=0.1, checkpoint_every=2)
    run_pretrain(pretrain_config(tmp_path / "straight", **settings))

    # interrupt the second run inside step 5, after the checkpoint of step 4
    import pipeline.engine as engine
    import stages.pretrain as pretrain_stage

    original = engine.train_step

    def interrupted(*args, **kwargs):
        if args[-1] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain_stage, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(pretrain_config(tmp_path / "split", **settings))
    monkeypatch.setattr(pretrain_stage, "train_step", original)
    run_pretrain(pretrain_config(tmp_path / "split", resume=True, **settings))

    straight = read_losses(tmp_path / "straight")
    split = read_losses(tmp_path / "split")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert split == straight


def test_pretrain_rejects_student_with_other_grid(tmp_path: Path, cache_dir: Path):
    with pytest.raises(CacheMismatchError) as error:
        run_pretrain(pretrain_config(tmp_path / "run", cache=str(cache_dir), img_size=128))
    message = str(error.value)
    assert "6x6" in message
    assert "8x8" in message
    assert "96 px" in message
    assert "--img-size 128" in message
    assert not (tmp_path / "run" / "checkpoint-last.pt").exists()


def test_extracted_student_matches_in_timm(tmp_path: Path, cache_dir: Path):
    run_pretrain(pretrain_config(tmp_path / "run", cache=str(cache_dir), steps=2))
    weights = tmp_path / "student.safetensors"
    call = extract_student(tmp_path / "run" / "checkpoint-last.pt", weights)
    model = build_timm_model(call)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(weights), strict=True)
    model.eval()

    checkpoint = torch.load(tmp_path / "run" / "checkpoint-last.pt", weights_only=True)
    student = build_student(STUDENT, IMG_SIZE, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    student.load_state_dict({k[len("student."):]: v for k, v in checkpoint["model"].items() if k.startswith("student.")})
    student.eval()

    images = torch.rand(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        ours = student(images, None)
        theirs = model.forward_features(images)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_command_line_chain(tmp_path: Path, photo_folder: Path, teacher_file: Path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "cache_targets": {"teacher_overrides": tiny_overrides(), "img_size": IMG_SIZE, "shard_size": 8,
                          "workers": 0, "device": "cpu", "batch_size": 8, "fidelity_views": 4},
        "pretrain": {"student_overrides": STUDENT_OVERRIDES, "img_size": IMG_SIZE, "steps": 2, "batch_size": 4,
                     "workers": 0, "device": "cpu", "log_every": 1},
    }))
    cache = tmp_path / "cli-cache"
    stage_one = run_cli(
        ["cache-targets", "--config", str(preset), "--data", str(photo_folder), "--out", str(cache),
         "--teacher", TEACHER, "--teacher-weights", str(teacher_file)]
    )
    assert stage_one.returncode == 0, stage_one.stderr
    pretrain_arguments = ["pretrain", "--config", str(preset), "--cache", str(cache), "--student", STUDENT,
                          "--out", str(tmp_path / "cli-run")]
    result = run_cli(pretrain_arguments)
    assert result.returncode == 0, result.stderr
    assert "finished 2 steps" in result.stdout
    failure = run_cli(pretrain_arguments)
    assert failure.returncode == 2
    assert "--resume" in failure.stderr
    assert "Traceback" not in failure.stderr
