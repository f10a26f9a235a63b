"""The CUDA training settings, run on CPU: fused AdamW, bf16 autocast and torch.compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_runs import (
    IMG_SIZE,
    STUDENT,
    STUDENT_OVERRIDES,
    copy_photos,
    read_metrics,
    tiny_cache_config,
    tiny_pretrain_config,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader
from pipeline.engine import MaskDistillModel, StepSettings, autocast_dtype_for, train_step
from pipeline.errors import UsageError
from pipeline.heads import build_head
from pipeline.optim import build_optimizer, fused_adamw_available
from pipeline.students import build_student
from stages.cache_targets import run_cache_targets
from stages.pretrain import run_pretrain

TARGET_DIM = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    photos = copy_photos(root / "photos", 8)
    teacher = write_teacher_checkpoint(root)
    run_cache_targets(tiny_cache_config(photos, root / "cache", teacher))
    return root / "cache"


def tiny_model() -> MaskDistillModel:
    torch.manual_seed(0)
    student = build_student(STUDENT, IMG_SIZE, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    return MaskDistillModel(student, build_head("fc", student, TARGET_DIM))


def tiny_batch(model: MaskDistillModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return images [2, 3, S, S], targets [2, L, TARGET_DIM] and a mask [2, Gh, Gw] with a quarter masked."""
    generator = torch.Generator().manual_seed(1)
    grid = model.student.grid_size
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=generator)
    targets = torch.randn(2, grid[0] * grid[1], TARGET_DIM, generator=generator)
    mask = torch.rand(2, *grid, generator=generator) < 0.25
    mask[:, 0, 0] = True
    return images, targets, mask


def settings(autocast_dtype: torch.dtype | None) -> StepSettings:
    return StepSettings("smooth_l1", 1.0, "none", 3.0, autocast_dtype)


def test_precision_auto_follows_device():
    assert autocast_dtype_for("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype_for("auto", torch.device("cpu")) is None
    assert autocast_dtype_for("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype_for("fp32", torch.device("cuda")) is None
    with pytest.raises(UsageError, match="invalid --precision 'fp8': use one of auto, bf16, fp32"):
        autocast_dtype_for("fp8", torch.device("cpu"))


def test_fused_adamw_matches_loop():
    assert fused_adamw_available(torch.device("cpu"))
    assert fused_adamw_available(torch.device("cuda"))
    assert not fused_adamw_available(torch.device("meta"))

    updated = {}
    for fused in (False, True):
        model = tiny_model()
        optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.98), set(), fused=fused)
        for step in range(3):
            train_step(model, optimizer, *tiny_batch(model), settings(None), step)
        assert bool(optimizer.defaults["fused"]) is fused
        updated[fused] = model.state_dict()

    for name, value in updated[False].items():
        torch.testing.assert_close(updated[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_keeps_float32_weights():
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.98), set(), fused=True)
    block_outputs = []
    model.student.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, output: block_outputs.append(output.dtype))
    before = {name: value.clone() for name, value in model.state_dict().items()}

    loss, grad_norm = train_step(model, optimizer, *tiny_batch(model), settings(torch.bfloat16), 0)

    assert block_outputs == [torch.bfloat16]
    assert torch.isfinite(torch.tensor([loss, grad_norm])).all()
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert "student.blocks.0.mlp.fc1.weight" in changed


def test_bf16_loss_close_to_float32():
    losses = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model()
        optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.98), set(), fused=True)
        losses[dtype] = train_step(model, optimizer, *tiny_batch(model), settings(dtype), 0)[0]

    # bf16 keeps 8 significant bits, so the first loss agrees to about 1%
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.02)
    assert losses[torch.bfloat16] != losses[None]


def test_pretrain_bf16_on_cpu(tmp_path: Path, cache: Path):
    losses = {}
    for precision in ("fp32", "bf16"):
        summary = run_pretrain(tiny_pretrain_config(tmp_path / precision, cache=str(cache), precision=precision))
        losses[precision] = [record["loss"] for record in read_metrics(tmp_path / precision) if "loss" in record]
        checkpoint = torch.load(tmp_path / precision / "checkpoint-last.pt", map_location="cpu", weights_only=False)
        assert summary["steps"] == 3
        assert checkpoint["optimizer"]["param_groups"][0]["fused"] is True

    assert len(losses["bf16"]) == 3
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert losses["bf16"] != losses["fp32"]


def test_compiled_pretrain_matches_eager(tmp_path: Path, cache: Path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        run_pretrain(tiny_pretrain_config(out, cache=str(cache), steps=2, compile=compiled))
        checkpoint = torch.load(out / "checkpoint-last.pt", map_location="cpu", weights_only=False)
        runs[compiled] = ([record["loss"] for record in read_metrics(out) if "loss" in record], checkpoint)

    eager_losses, eager_checkpoint = runs[False]
    compiled_losses, compiled_checkpoint = runs[True]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    # the checkpoint contains the plain module's names, so resume and extract-student read it unchanged
    assert list(compiled_checkpoint["model"]) == list(eager_checkpoint["model"])
    assert not any("_orig_mod" in name for name in compiled_checkpoint["model"])


def test_cache_targets_bf16_teacher(tmp_path: Path):
    photos = copy_photos(tmp_path / "photos", 8)
    teacher = write_teacher_checkpoint(tmp_path)
    targets = {}
    for precision in ("fp32", "bf16"):
        run_cache_targets(tiny_cache_config(photos, tmp_path / precision, teacher, codec="fp32", precision=precision))
        reader = CacheReader(tmp_path / precision)
        targets[precision] = reader.read_shard(reader.shards[0].shard_id).targets["values"]

    assert targets["bf16"].shape == targets["fp32"].shape
    assert not np.array_equal(targets["bf16"], targets["fp32"])
    # bf16 matmuls keep about 3 significant digits, so the features agree to a few percent of their scale
    assert np.abs(targets["bf16"] - targets["fp32"]).max() < 0.05 * np.abs(targets["fp32"]).max()
