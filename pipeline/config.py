"""Typed run configurations, YAML presets and their merge with command-line options.

A preset is a YAML file with one section per command (`cache_targets:` and `pretrain:`), each a
mapping of option names (the dataclass field names below, which are the command-line option
names with dashes turned into underscores). Values resolve in this order, later wins: the
dataclass default, the preset, then the options given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UsageError
from pipeline.views import AugmentConfig

SECTIONS = ("cache_targets", "pretrain")


@dataclass
class CacheConfig:
    """Settings of `cache-targets`: which teacher runs over which views, and how targets are stored."""

    data: str = ""
    out: str = ""
    teacher: str = "clip_vit_large_patch14"
    teacher_weights: str | None = None
    img_size: int = 224
    student_patch_size: int = 16
    views: int = 1
    seed: int = 0
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    codec: str = "fp16"
    format: str = "zarr"
    # A shard's view slice is one zarr chunk that a loader worker keeps whole: 256 views of
    # CLIP ViT-L/14 targets in fp16 are about 100 MB.
    shard_size: int = 256
    jpeg_quality: int = 95
    calibration_images: int = 256
    fidelity_views: int = 64
    max_bad_fraction: float = 0.01
    strict: bool = False
    teacher_overrides: dict[str, Any] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class PretrainConfig:
    """Settings of `pretrain`, from a cache or with the teacher online."""

    out: str = ""
    student: str = "vit_base_patch16"
    cache: str | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    data: str | None = None
    img_size: int = 224
    student_patch_size: int = 16
    views: int = 1
    shard_size: int = 256
    head: str = "fc"
    head_depth: int = 2
    head_width: int = 384
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None
    blr: float = 1.5e-3 * 256 / 2048
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    clip_grad: float | None = 3.0
    mask_ratio: float = 0.4
    min_mask_block: int = 16
    loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0
    target_norm: str = "layernorm"
    drop_path: float | None = None
    val_fraction: float = 0.01
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 0
    workers: int = 4
    device: str = "auto"
    compile: bool = False
    precision: str = "auto"
    gpu_decode: bool = False
    resume: bool = False
    log_samples: bool = False
    student_overrides: dict[str, Any] | None = None
    teacher_overrides: dict[str, Any] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def load_preset(path: str | Path, section: str) -> dict[str, Any]:
    """Read one command's section of a YAML preset, rejecting unknown sections by name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")

    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"config file {path} is not valid YAML: {error}") from error

    if not isinstance(document, dict):
        raise UsageError(f"config file {path} must be a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise UsageError(
            f"unknown section {unknown[0]!r} in config file {path}; valid sections: {', '.join(SECTIONS)}"
        )
    values = document.get(section) or {}
    if not isinstance(values, dict):
        raise UsageError(f"section {section!r} of {path} must be a mapping of option names to values")
    return values


def resolve_config(cls: type, preset: dict[str, Any], options: dict[str, Any], source: str = "config"):
    """Build a `cls` dataclass from defaults, then `preset`, then the non-None `options`.

    Unknown keys in the preset raise UsageError naming the key and `source` (the file).
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(preset) - set(names))
    if unknown:
        valid = ", ".join(sorted(names))
        raise UsageError(f"unknown key {unknown[0]!r} in {source}; valid keys: {valid}")

    values: dict[str, Any] = {}
    for name, value in preset.items():
        values[name] = _coerce(names[name], value, source)
    for name, value in options.items():
        if value is not None:
            values[name] = value

    return cls(**values)


def _coerce(spec: dataclasses.Field, value: Any, source: str) -> Any:
    if spec.name == "augment":
        if not isinstance(value, dict):
            raise UsageError(f"key 'augment' in {source} must be a mapping")
        valid = {f.name for f in dataclasses.fields(AugmentConfig)}
        unknown = sorted(set(value) - valid)
        if unknown:
            raise UsageError(
                f"unknown key 'augment.{unknown[0]}' in {source}; valid keys: {', '.join(sorted(valid))}"
            )
        return AugmentConfig.from_dict(value)
    if not _matches_annotation(value, str(spec.type)):
        raise UsageError(f"key {spec.name!r} in {source} must be {spec.type}, got {value!r}")
    if isinstance(value, list):
        return tuple(value)
    return value


def _matches_annotation(value: Any, annotation: str) -> bool:
    """Check a YAML value against a field annotation such as "int", "float | None" or "tuple[float, float]"."""
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option.startswith("tuple") and isinstance(value, (list, tuple)):
            return True
        if option.startswith("dict") and isinstance(value, dict):
            return True
    return False


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON- and YAML-ready dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
