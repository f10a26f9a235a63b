"""The two sides of the stage-two benchmarks: the real trainer, and its step on tensors in memory.

`run_trainer` runs `maskdistill pretrain` in a subprocess and reads img/s from the metrics.jsonl
it writes, so it measures the real command (loader, device copy, step, logging) in a fresh
process, as a user runs it. Trainer runs inside one long process slowed down run after run
(2.4, then 2.3, then 1.7 img/s for ViT-B/16 on CPU as its memory grew), which the subprocess
keeps out of the figures. `BareStep` builds
the same student, head and optimizer, and times `pipeline.engine.train_step` on one batch that
is already on the device. `TeacherForward` times the frozen teacher on such a batch.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from benchmarks.harness import run_python_module, seconds
from pipeline.config import PretrainConfig, config_to_dict
from pipeline.engine import (
    MaskDistillModel,
    StepSettings,
    autocast_context,
    autocast_dtype_for,
    normalize_images,
    prepare_targets,
    train_step,
)
from pipeline.heads import build_head
from pipeline.masking import MaskConfig, sample_masks
from pipeline.optim import build_optimizer, fused_adamw_available, set_lr
from pipeline.students import build_student
from pipeline.teachers import build_teacher

LEARNING_RATE = 1e-4
"""Constant learning rate of both sides: the schedule does not change the cost of a step."""


@dataclass(frozen=True)
class TrainerRate:
    """Throughput of one trainer run over its steps after the warm-up steps."""

    img_per_s: float
    data_wait_share: float
    steps: int


def trainer_config(base: PretrainConfig, out: Path) -> PretrainConfig:
    """Return `base` set up for timing: output in `out`, every step logged, no checkpoints, no validation."""
    return dataclasses.replace(
        base,
        out=str(out),
        log_every=1,
        checkpoint_every=10**9,
        val_fraction=0.0,
        lr=LEARNING_RATE,
        warmup_steps=0,
    )


def run_trainer(base: PretrainConfig, out: Path, warmup_steps: int) -> TrainerRate:
    """Run `maskdistill pretrain` in a fresh `out` folder and return its img/s after `warmup_steps` steps.

    The settings go to the command as a preset file, and the subprocess uses as many threads
    as this process. The rate is total images over total time of the timed steps, from the
    per-step img/s and data time that the trainer writes to metrics.jsonl. The folder is
    removed afterwards.
    """
    if out.exists():
        shutil.rmtree(out)
    config = trainer_config(base, out)
    preset = out.with_name(f"{out.name}.yaml")
    preset.write_text(yaml.safe_dump({"pretrain": config_to_dict(config)}))
    run_python_module(["cli", "pretrain", "--config", str(preset)])

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [record for record in records if "img_per_s" in record and record["step"] > warmup_steps]
    if not timed:
        raise RuntimeError(f"trainer run in {out} logged no step after the {warmup_steps} warm-up steps")

    total_seconds = sum(config.batch_size / record["img_per_s"] for record in timed)
    data_seconds = sum(record["data_time"] for record in timed)
    shutil.rmtree(out)
    preset.unlink()
    return TrainerRate(
        img_per_s=config.batch_size * len(timed) / total_seconds,
        data_wait_share=data_seconds / total_seconds,
        steps=len(timed),
    )


class BareStep:
    """The trainer's model, optimizer and step settings, stepping on one batch held on the device.

    Images are normalized and targets prepared once, as `TrainingData.to_device` would, so a
    timed step is only `train_step`.
    """

    def __init__(self, config: PretrainConfig, target_dim: int, device: torch.device) -> None:
        self.device = device
        student = build_student(
            config.student, config.img_size, drop_path_rate=config.drop_path, overrides=config.student_overrides
        )
        head = build_head(config.head, student, target_dim, depth=config.head_depth, width=config.head_width)
        self.model = MaskDistillModel(student, head).to(device)
        self.model.train()

        no_decay = {f"student.{name}" for name in student.no_weight_decay()}
        no_decay |= {f"head.{name}" for name in getattr(head, "no_weight_decay", lambda: set())()}
        self.optimizer = build_optimizer(
            self.model, LEARNING_RATE, config.weight_decay, tuple(config.betas), no_decay,
            fused=fused_adamw_available(device),
        )
        set_lr(self.optimizer, LEARNING_RATE)
        self.settings = StepSettings(
            loss=config.loss,
            smooth_l1_beta=config.smooth_l1_beta,
            target_norm=config.target_norm,
            clip_grad=config.clip_grad,
            autocast_dtype=autocast_dtype_for(config.precision, device),
        )

        batch = config.batch_size
        mask_config = MaskConfig(*student.grid_size, ratio=config.mask_ratio, min_block=config.min_mask_block)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, config.img_size, config.img_size), dtype=torch.uint8, generator=generator)
        targets = torch.randn(batch, mask_config.grid_h * mask_config.grid_w, target_dim, generator=generator)
        mask = sample_masks(mask_config, 0, 0, range(batch))
        self.images = normalize_images(images.to(device))
        self.targets = prepare_targets(targets.to(device), config.target_norm)
        self.mask = torch.from_numpy(mask).to(device)
        self.batch_size = batch
        self.steps_taken = 0

    def step(self) -> None:
        train_step(self.model, self.optimizer, self.images, self.targets, self.mask, self.settings, self.steps_taken)
        self.steps_taken += 1

    def img_per_s(self, steps: int, warmup_steps: int) -> float:
        """Run `warmup_steps` untimed steps, then return the img/s of `steps` timed steps."""
        for _ in range(warmup_steps):
            self.step()
        elapsed = seconds(lambda: [self.step() for _ in range(steps)], self.device)
        return self.batch_size * steps / elapsed


class TeacherForward:
    """A frozen teacher and one batch of random [0, 1] views [B, 3, S, S] on the device.

    A timed forward runs as stage one and the online trainer run it: no gradients, bfloat16
    autocast on CUDA, targets cast to float32.
    """

    def __init__(
        self,
        name: str,
        batch_size: int,
        img_size: int,
        patch_size: int,
        device: torch.device,
        overrides: dict | None = None,
    ) -> None:
        self.device = device
        self.teacher = build_teacher(
            name, "random", student_img_size=img_size, student_patch_size=patch_size, device=device, overrides=overrides
        )
        size = self.teacher.input_size
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(batch_size, 3, size, size, generator=generator).to(device)
        self.batch_size = batch_size
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        with autocast_context(self.device, self.autocast_dtype):
            return self.teacher(self.images).float()

    def img_per_s(self, batches: int, warmup_batches: int) -> float:
        """Run `warmup_batches` untimed forwards, then return the img/s of `batches` timed ones."""
        for _ in range(warmup_batches):
            self.forward()
        elapsed = seconds(lambda: [self.forward() for _ in range(batches)], self.device)
        return self.batch_size * batches / elapsed
