"""Messy inputs through stage one and the online teacher: every file is a correct view or a named skip."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.bad_images import HTML_PAGE, BadImageFolder, encode, gradient_image, write_bad_image_folder
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import (
    TEACHER,
    tiny_cache_config,
    tiny_pretrain_config,
    write_tar_shard,
    write_teacher_checkpoint,
)
from PIL import Image

from pipeline.cache import CacheReader
from pipeline.config import CacheConfig
from pipeline.data.online import OnlineViews
from pipeline.data.teacher_views import TeacherViews
from pipeline.errors import UsageError
from pipeline.masking import MaskConfig
from pipeline.sources import is_bad_input, open_source, printable_source
from pipeline.views import AugmentConfig
from stages.cache_targets import run_cache_targets
from stages.pretrain import SKIPPED_NAME, run_pretrain

IMG_SIZE = 64
VIEWS = 2
# no color jitter, so a view of a one-color image keeps that color
NO_JITTER = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)
CACHE_SETTINGS = {
    "img_size": IMG_SIZE, "views": VIEWS, "shard_size": 8, "max_bad_fraction": 0.3, "augment": NO_JITTER,
}

INDEX_SKIPS = {
    ".DS_Store": "os junk file",
    "Thumbs.db": "os junk file",
    "desktop.ini": "os junk file",
    "._plain.jpg": "os junk file",
    "empty.jpg": "empty file",
    "notes.txt": "not an image file extension",
    "dangling.jpg": "dangling symlink",
    "nested/loop": "symlink loop",
}
DECODE_SKIPS = {
    "truncated.jpg": "truncated",
    "html.jpg": "HTML",
    "bomb.png": "decompression bomb",
    "garbage.png": "not an image",
}
BAD_AT_INDEX = ("dangling.jpg", "empty.jpg")  # the index-time skips that count as bad inputs


def animated_webp() -> bytes:
    """8x8 animated WebP: a red frame, then a blue one."""
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)


def write_messy_folder(directory: Path) -> BadImageFolder:
    """The helper's folder of good, odd and broken files plus an animated WebP (a good input)."""
    folder = write_bad_image_folder(directory)
    (folder.path / "animated.webp").write_bytes(animated_webp())
    return BadImageFolder(folder.path, folder.good + 1, folder.skipped_at_index, folder.skipped_at_decode)


def cache_config(data: Path, out: Path, teacher_file: Path, **changes) -> CacheConfig:
    return tiny_cache_config(data, out, teacher_file, **{**CACHE_SETTINGS, **changes})


def small_jpeg(seed: int) -> bytes:
    return encode(gradient_image(24 + seed, 20), "JPEG", quality=90)


def decode_view(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.mode == "RGB"
    assert image.size == (IMG_SIZE, IMG_SIZE)
    return np.asarray(image).astype(np.float64)


def stored_samples(cache: Path) -> list[dict]:
    """Every stored sample of a cache: shard id, image range, view, image index, source, label, JPEG."""
    reader = CacheReader(cache)
    samples = []
    for record in reader.shards:
        for view in range(reader.num_views):
            data = reader.read_shard(record.shard_id, view)
            for i in range(len(data)):
                samples.append(
                    {
                        "shard": record.shard_id,
                        "range": record.image_range,
                        "view": int(data.view_index[i]),
                        "image_index": int(data.image_index[i]),
                        "source": data.source[i],
                        "label": int(data.label[i]),
                        "jpeg": data.jpeg[i],
                    }
                )
    return samples


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return write_teacher_checkpoint(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> BadImageFolder:
    return write_messy_folder(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def messy_cache(tmp_path_factory, messy: BadImageFolder, teacher_file: Path) -> Path:
    out = tmp_path_factory.mktemp("caches") / "messy"
    run_cache_targets(cache_config(messy.path, out, teacher_file))
    return out


# Stage one over a messy folder


def test_cache_counts_good_and_skipped(messy: BadImageFolder, messy_cache: Path):
    manifest = json.loads((messy_cache / "manifest.json").read_text())

    assert manifest["complete"] is True
    assert manifest["num_images"] == messy.good
    assert manifest["num_samples"] == messy.good * VIEWS
    assert manifest["num_skipped"] == messy.skipped
    assert manifest["num_inputs"] == messy.indexed + messy.skipped_at_index
    assert len(manifest["skipped"]) == messy.skipped


def test_cache_names_each_skipped_input(messy_cache: Path):
    manifest = json.loads((messy_cache / "manifest.json").read_text())
    reasons = {item["source"]: item["reason"] for item in manifest["skipped"]}

    assert set(reasons) == set(INDEX_SKIPS) | set(DECODE_SKIPS)
    for source, expected in {**INDEX_SKIPS, **DECODE_SKIPS}.items():
        assert expected in reasons[source], source


def test_cache_keys_match_source_index(messy_cache: Path, messy: BadImageFolder, teacher_file: Path):
    source = open_source(messy.path)
    samples = stored_samples(messy_cache)
    dataset = TeacherViews(
        source, list(range(len(source))), VIEWS, IMG_SIZE, IMG_SIZE, NO_JITTER, seed=0, jpeg_quality=95
    )

    assert len(samples) == messy.good * VIEWS
    for sample in samples:
        record = source.records[sample["image_index"]]
        start, stop = sample["range"]
        assert start <= sample["image_index"] < stop
        assert sample["source"] == printable_source(record.source)
        assert sample["jpeg"] == dataset[record.index].jpeg[sample["view"]], record.source


def test_cache_shards_cover_every_index(messy_cache: Path, messy: BadImageFolder):
    reader = CacheReader(messy_cache)
    ranges = sorted(record.image_range for record in reader.shards)
    stored = {sample["image_index"] for sample in stored_samples(messy_cache)}
    decode_failed = {
        record.index for record in open_source(messy.path).records if record.source in DECODE_SKIPS
    }

    assert ranges[0][0] == 0
    assert all(previous[1] == following[0] for previous, following in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == messy.indexed
    assert stored | decode_failed == set(range(messy.indexed))
    assert not stored & decode_failed


def test_cache_stores_undecodable_name_as_text(messy_cache: Path):
    sources = {sample["source"] for sample in stored_samples(messy_cache)}

    assert "raw\\xff\\xfe.png" in sources
    assert "ünïcödé.png" in sources
    assert "linked/inside.jpg" in sources


@pytest.mark.parametrize(
    ("name", "color"),
    [
        ("rgba.png", (255, 127, 127)),  # red at alpha 128 over white
        ("gray_alpha.png", (255, 255, 255)),  # fully transparent
        ("cmyk.jpg", (255, 0, 0)),
        ("animated.gif", (255, 0, 0)),  # first frame
        ("animated.webp", (255, 0, 0)),  # first frame
        ("gray.png", (77, 77, 77)),
    ],
)
def test_cache_views_have_source_colors(messy_cache: Path, name: str, color: tuple[int, int, int]):
    views = [sample for sample in stored_samples(messy_cache) if sample["source"] == name]

    assert len(views) == VIEWS
    for sample in views:
        pixels = decode_view(sample["jpeg"])
        np.testing.assert_allclose(pixels.mean(axis=(0, 1)), color, atol=4)


def test_cache_logs_skip_summary(tmp_path: Path, messy: BadImageFolder, teacher_file: Path, caplog):
    with caplog.at_level(logging.INFO):
        run_cache_targets(cache_config(messy.path, tmp_path / "cache", teacher_file, views=1))

    summary = caplog.records[-1].getMessage()
    assert f"skipped {messy.skipped} of {messy.indexed + messy.skipped_at_index} inputs" in summary
    assert "manifest.json" in summary
    assert "os junk file: 4" in summary


def test_max_bad_fraction_stops_run(tmp_path: Path, messy: BadImageFolder, teacher_file: Path):
    out = tmp_path / "cache"
    with pytest.raises(UsageError) as error:
        run_cache_targets(cache_config(messy.path, out, teacher_file, max_bad_fraction=0.1))

    message = str(error.value)
    assert "--max-bad-fraction 0.1" in message
    assert "could not be used" in message
    assert json.loads((out / "manifest.json").read_text())["complete"] is False


def test_bad_fraction_counts_bad_inputs_only(messy: BadImageFolder):
    bad = [source for source, reason in open_source(messy.path).skipped if is_bad_input(reason)]

    assert sorted(bad) == sorted(BAD_AT_INDEX)


def test_strict_names_first_bad_input(tmp_path: Path, messy: BadImageFolder, teacher_file: Path):
    with pytest.raises(UsageError) as error:
        run_cache_targets(cache_config(messy.path, tmp_path / "cache", teacher_file, strict=True))

    message = str(error.value)
    assert "dangling.jpg" in message
    assert "dangling symlink" in message
    assert "--strict" in message


def test_strict_stops_at_undecodable_file(tmp_path: Path, teacher_file: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.jpg").write_bytes(small_jpeg(i))
    (folder / "page.jpg").write_bytes(HTML_PAGE)

    with pytest.raises(UsageError) as error:
        run_cache_targets(cache_config(folder, tmp_path / "cache", teacher_file, strict=True))

    message = str(error.value)
    assert "page.jpg" in message
    assert "HTML" in message
    assert "--strict" in message


def test_strict_accepts_non_image_entries(tmp_path: Path, teacher_file: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:03d}.jpg").write_bytes(small_jpeg(i))
        (folder / f"{i:03d}.txt").write_text(f"caption {i}\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    manifest = run_cache_targets(
        cache_config(folder, tmp_path / "cache", teacher_file, strict=True, max_bad_fraction=0.0)
    )

    assert manifest["num_images"] == 3
    assert manifest["num_skipped"] == 4
    assert {item["reason"] for item in manifest["skipped"]} == {"os junk file", "not an image file extension"}


# Stage one over damaged webdataset shards


@pytest.fixture
def damaged_shards(tmp_path: Path) -> Path:
    """Shards with a sample without image, an HTML page as .jpg, an empty shard and a truncated one."""
    root = tmp_path / "shards"
    root.mkdir()
    write_tar_shard(
        root / "s-000.tar",
        [
            ("train.v2/a0.jpg", small_jpeg(0)),
            ("train.v2/a0.cls", b"3"),
            ("train.v2/a1.jpg", small_jpeg(1)),
            ("train.v2/a1.cls", b"5"),
            ("train.v2/a2.cls", b"7"),
            ("train.v2/a3.jpg", HTML_PAGE),
            ("train.v2/a3.cls", b"1"),
        ],
    )
    (root / "s-001.tar").write_bytes(b"")
    write_tar_shard(root / "s-002.tar", [(f"b{i}.jpg", small_jpeg(10 + i)) for i in range(3)])
    whole = (root / "s-002.tar").read_bytes()
    first_member_end = 512 + math.ceil(len(small_jpeg(10)) / 512) * 512
    (root / "s-002.tar").write_bytes(whole[: first_member_end + 512 + 300])  # inside the second member's data
    write_tar_shard(root / "s-003.tar", [("c0.jpg", small_jpeg(20)), ("c0.cls", b"9")])
    return root


def test_tar_input_skips_damaged_samples(tmp_path: Path, damaged_shards: Path, teacher_file: Path):
    manifest = run_cache_targets(
        cache_config(damaged_shards, tmp_path / "cache", teacher_file, max_bad_fraction=1.0, shard_size=2)
    )
    reasons = {item["source"]: item["reason"] for item in manifest["skipped"]}

    assert manifest["num_images"] == 4
    assert manifest["num_inputs"] == 9
    assert set(reasons) == {
        "s-000.tar::train.v2/a2",
        "s-000.tar::train.v2/a3.jpg",
        "s-001.tar",
        "s-002.tar::b1.jpg",
        "s-002.tar",
    }
    assert "no image field" in reasons["s-000.tar::train.v2/a2"]
    assert "HTML" in reasons["s-000.tar::train.v2/a3.jpg"]
    assert "empty shard" in reasons["s-001.tar"]
    assert "truncated shard" in reasons["s-002.tar"]


def test_tar_input_keys_and_labels_align(tmp_path: Path, damaged_shards: Path, teacher_file: Path):
    out = tmp_path / "cache"
    run_cache_targets(cache_config(damaged_shards, out, teacher_file, max_bad_fraction=1.0, shard_size=2))
    source = open_source(damaged_shards)
    view0 = [sample for sample in stored_samples(out) if sample["view"] == 0]

    assert [sample["image_index"] for sample in view0] == [0, 1, 3, 4]
    assert [sample["label"] for sample in view0] == [3, 5, -1, 9]
    for sample in view0:
        assert sample["source"] == source.records[sample["image_index"]].source


# Online teacher


def test_online_views_replace_bad_image(messy: BadImageFolder):
    dataset = OnlineViews(messy.path, IMG_SIZE, IMG_SIZE, NO_JITTER, MaskConfig(4, 4, min_block=2), 0, 0)
    names = [record.source for record in dataset.source.records]
    html, bomb = names.index("html.jpg"), names.index("bomb.png")

    batch = dataset.__getitems__([(0, 0, html), (0, 0, bomb), (0, 0, 0)])

    assert batch["images"].shape == (3, 3, IMG_SIZE, IMG_SIZE)
    assert batch["teacher_images"].shape == (3, 3, IMG_SIZE, IMG_SIZE)
    assert batch["mask"].shape == (3, 4, 4)
    assert batch["image_index"].tolist() == [html + 1, bomb + 1, 0]
    assert [source for source, _ in batch["skipped"]] == ["html.jpg", "bomb.png"]
    assert "HTML" in batch["skipped"][0][1]


def test_online_pretrain_skips_bad_images(tmp_path: Path, messy: BadImageFolder, teacher_file: Path):
    run_dir = tmp_path / "run"
    config = tiny_pretrain_config(
        run_dir,
        student_overrides={"embed_dim": 64, "depth": 1, "num_heads": 2},
        teacher=TEACHER,
        teacher_weights=str(teacher_file),
        teacher_overrides=tiny_overrides(),
        data=str(messy.path),
        img_size=IMG_SIZE,
        min_mask_block=2,
        steps=None,
        epochs=1,
        batch_size=2,
        drop_path=None,  # the student's registry default
        val_fraction=0.0,
        shard_size=8,
        augment=NO_JITTER,
    )

    summary = run_pretrain(config)
    listed = {item["source"]: item["reason"] for item in json.loads((run_dir / SKIPPED_NAME).read_text())}

    assert summary["steps"] == messy.indexed // 2
    assert math.isfinite(summary["loss"])
    assert summary["skipped"] == messy.skipped
    assert set(listed) == set(INDEX_SKIPS) | set(DECODE_SKIPS)
    for source, expected in DECODE_SKIPS.items():
        assert expected in listed[source], source
    assert os.path.isfile(run_dir / "checkpoint-last.pt")
