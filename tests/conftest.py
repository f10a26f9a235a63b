"""Shared fixtures: real photos from the bundled sample, tiny real models, and quiet threads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "imagenet-sample-64"
CIFAR_SHARD = REPO / "data" / "cifar10-test-1k" / "cifar10-test-000000.tar"

torch.set_num_threads(2)


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Ten real ImageNet JPEGs plus a PNG, a gray and a palette image made from them."""
    folder = tmp_path / "photos"
    nested = folder / "nested dir"
    nested.mkdir(parents=True)
    names = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.suffix == ".JPEG")[:10]
    for name in names:
        shutil.copy(SAMPLE_DIR / name, folder / name)

    source = Image.open(SAMPLE_DIR / names[0]).convert("RGB")
    source.save(nested / "as png.png")
    source.convert("L").save(nested / "gray.jpg")
    source.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(nested / "palette.png")
    return folder
