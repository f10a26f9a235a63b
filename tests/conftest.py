"""Shared fixtures: real photos from the bundled sample, tiny real models, and quiet threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_runs import REPO, copy_photos, sample_photos
from PIL import Image

CIFAR_SHARD = REPO / "data" / "cifar10-test-1k" / "cifar10-test-000000.tar"

torch.set_num_threads(2)


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Ten real ImageNet JPEGs plus a PNG, a gray and a palette image made from them."""
    folder = copy_photos(tmp_path / "photos", 10)
    nested = folder / "nested dir"
    nested.mkdir()

    source = Image.open(sample_photos(1)[0]).convert("RGB")
    source.save(nested / "as png.png")
    source.convert("L").save(nested / "gray.jpg")
    source.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(nested / "palette.png")
    return folder
