"""Stage one on real photos with a tiny real teacher: views, formats, inputs, settings, fidelity."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_runs import (
    IMG_SIZE,
    STUDENT_OVERRIDES,
    TEACHER,
    copy_photos,
    read_metrics,
    sample_photos,
    tiny_cache_config,
    tiny_pretrain_config,
    write_teacher_checkpoint,
)
from PIL import Image

from pipeline.cache import CacheReader
from pipeline.cache_build import ShardJob
from pipeline.codecs import build_codec
from pipeline.config import CacheConfig
from pipeline.data.training import build_training_data
from pipeline.errors import CacheMismatchError, UsageError
from pipeline.masking import MaskConfig
from pipeline.students import build_student
from stages.cache_targets import run_cache_targets
from stages.inspect_cache import describe_cache
from stages.pretrain import run_pretrain

CACHE_SETTINGS = {"calibration_images": 4, "fidelity_views": 8}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage-one")


@pytest.fixture(scope="module")
def photos(workspace: Path) -> Path:
    """Ten real JPEGs of the bundled sample plus a PNG and a gray JPEG made from the first."""
    folder = copy_photos(workspace / "photos", 10)
    first = Image.open(sample_photos(1)[0]).convert("RGB")
    first.save(folder / "converted.png")
    first.convert("L").save(folder / "gray.jpg")
    return folder


@pytest.fixture(scope="module")
def teacher_file(workspace: Path) -> Path:
    return write_teacher_checkpoint(workspace)


def cache_config(data: Path, out: Path, teacher_file: Path, **changes) -> CacheConfig:
    return tiny_cache_config(data, out, teacher_file, **{**CACHE_SETTINGS, **changes})


@pytest.fixture(scope="module")
def caches(workspace: Path, photos: Path, teacher_file: Path) -> dict[str, Path]:
    """A zarr and a wds cache of the same photos, seed and settings."""
    paths = {}
    for fmt in ("zarr", "wds"):
        paths[fmt] = workspace / f"cache-{fmt}"
        run_cache_targets(cache_config(photos, paths[fmt], teacher_file, format=fmt))
    return paths


def read_losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir) if "loss" in record]


def decoded_by_image(reader: CacheReader, view: int) -> dict[int, np.ndarray]:
    """Map image index to the decoded targets [L, D] of `view`, over the whole cache."""
    codec = build_codec(reader.manifest["settings"]["codec"]["name"])
    targets = {}
    for record in reader.shards:
        data = reader.read_shard(record.shard_id, view)
        for index, values in zip(data.image_index, codec.decode(data.targets)):
            targets[int(index)] = values
    return targets


def test_pretrain_log_names_view_per_epoch(tmp_path: Path, caches: dict[str, Path], caplog):
    caplog.set_level(logging.INFO, logger="pipeline.data.training")
    config = tiny_pretrain_config(tmp_path / "run", cache=str(caches["zarr"]), steps=None, epochs=3)
    run_pretrain(config)

    messages = [record.getMessage() for record in caplog.records if record.name == "pipeline.data.training"]
    epoch_lines = [message for message in messages if " reads view " in message]
    assert len(epoch_lines) == 3
    assert epoch_lines[0].startswith("epoch 0 reads view 0 of 2 ")
    assert epoch_lines[1].startswith("epoch 1 reads view 1 of 2 ")
    assert epoch_lines[2].startswith("epoch 2 reads view 0 of 2 ")


def test_training_loader_reads_view_of_epoch(tmp_path: Path, caches: dict[str, Path]):
    config = tiny_pretrain_config(tmp_path / "run", cache=str(caches["zarr"]))
    student = build_student(config.student, IMG_SIZE, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    mask_config = MaskConfig(*student.grid_size)
    data = build_training_data(config, student, mask_config, torch.device("cpu"))
    reader = CacheReader(caches["zarr"])
    stored = {view: decoded_by_image(reader, view) for view in (0, 1)}

    for epoch in range(3):
        batch = next(iter(data.loader(epoch)))
        expected = np.stack([stored[epoch % 2][int(i)] for i in batch["image_index"]])
        other = np.stack([stored[(epoch + 1) % 2][int(i)] for i in batch["image_index"]])
        targets = data.dataset.finish_targets(batch["target_parts"]).numpy()
        np.testing.assert_array_equal(targets, expected)
        assert not np.allclose(targets, other)


def test_wds_cache_equals_zarr_cache(caches: dict[str, Path]):
    zarr_reader = CacheReader(caches["zarr"])
    wds_reader = CacheReader(caches["wds"])
    assert zarr_reader.manifest["format"] == "zarr"
    assert wds_reader.manifest["format"] == "wds"
    assert wds_reader.manifest["settings"] == zarr_reader.manifest["settings"]
    assert wds_reader.manifest["num_samples"] == zarr_reader.manifest["num_samples"] == 24
    assert [r.shard_id for r in wds_reader.shards] == [r.shard_id for r in zarr_reader.shards]

    codec = build_codec("fp16")
    for record in zarr_reader.shards:
        expected = zarr_reader.read_shard(record.shard_id)
        actual = wds_reader.read_shard(record.shard_id)
        np.testing.assert_array_equal(actual.image_index, expected.image_index)
        np.testing.assert_array_equal(actual.view_index, expected.view_index)
        np.testing.assert_array_equal(actual.label, expected.label)
        np.testing.assert_array_equal(actual.params, expected.params)
        assert actual.source == expected.source
        assert actual.jpeg == expected.jpeg
        assert actual.targets.keys() == expected.targets.keys()
        for name in expected.targets:
            np.testing.assert_array_equal(actual.targets[name], expected.targets[name])
        np.testing.assert_array_equal(codec.decode(actual.targets), codec.decode(expected.targets))


def test_pretrain_losses_equal_for_both_formats(tmp_path: Path, caches: dict[str, Path]):
    for fmt, cache in caches.items():
        run_pretrain(tiny_pretrain_config(tmp_path / fmt, cache=str(cache)))
    zarr_losses = read_losses(tmp_path / "zarr")
    wds_losses = read_losses(tmp_path / "wds")
    assert len(zarr_losses) == 3
    assert wds_losses == zarr_losses


def write_webdataset_shards(folder: Path) -> dict[str, int]:
    """Write two tar shards of real JPEGs whose keys contain dots; return {member name: label}.

    Every sample but the last has a `.cls` label, so the last one is stored with label -1.
    """
    folder.mkdir(parents=True)
    photos = sample_photos(6)
    labels = {}
    for shard in range(2):
        with tarfile.open(folder / f"val-{shard:06d}.tar", "w") as tar:
            for position, photo in enumerate(photos[shard * 3 : shard * 3 + 3]):
                key = f"imagenet.val.v2/{photo.stem}_{shard}"
                image_member = f"{key}.jpg"
                _add_member(tar, image_member, photo.read_bytes())
                if (shard, position) != (1, 2):
                    labels[image_member] = 100 * shard + position
                    _add_member(tar, f"{key}.cls", str(labels[image_member]).encode())
                else:
                    labels[image_member] = -1
    return labels


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_input_labels_reach_cache(tmp_path: Path, teacher_file: Path):
    labels = write_webdataset_shards(tmp_path / "shards")
    out = tmp_path / "cache"
    manifest = run_cache_targets(cache_config(tmp_path / "shards", out, teacher_file, views=1))
    reader = CacheReader(out)
    data = [reader.read_shard(record.shard_id, 0) for record in reader.shards]
    sources = [source for piece in data for source in piece.source]
    stored_labels = [int(label) for piece in data for label in piece.label]

    assert manifest["num_images"] == 6
    assert manifest["num_skipped"] == 0
    assert all("." in member.split("/")[0] for member in labels)
    assert [source.partition("::")[2] for source in sources] == list(labels)
    assert sources[0].startswith("val-000000.tar::")
    assert stored_labels == list(labels.values())
    assert stored_labels[-1] == -1


@pytest.mark.parametrize(
    ("change", "setting", "stored", "requested"),
    [
        ({"seed": 7}, "seed", "0", "7"),
        ({"codec": "int8-channel"}, "codec.name", '"fp16"', '"int8-channel"'),
        ({"teacher": "pixel", "teacher_weights": None, "teacher_overrides": None}, "teacher.name",
         f'"{TEACHER}"', '"pixel"'),
        ({"format": "wds"}, "format", '"zarr"', '"wds"'),
    ],
)
def test_rerun_with_other_setting_rejected(
    caches: dict[str, Path], photos: Path, teacher_file: Path, change, setting, stored, requested
):
    manifest_before = (caches["zarr"] / "manifest.json").read_bytes()
    with pytest.raises(CacheMismatchError) as error:
        run_cache_targets(cache_config(photos, caches["zarr"], teacher_file, **change))
    message = str(error.value)
    assert f"written with {setting} = {stored}" in message
    assert f"this run has {setting} = {requested}" in message
    assert str(caches["zarr"]) in message
    assert (caches["zarr"] / "manifest.json").read_bytes() == manifest_before


def test_rerun_of_complete_cache_writes_nothing(caches: dict[str, Path], photos: Path, teacher_file: Path):
    cache = caches["wds"]
    stamps = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}
    manifest = run_cache_targets(cache_config(photos, cache, teacher_file, format="wds"))
    assert manifest == json.loads((cache / "manifest.json").read_text())
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()} == stamps


def test_deleted_shard_record_rewrites_shard(tmp_path: Path, caches: dict[str, Path], photos: Path, teacher_file: Path):
    cache = tmp_path / "cache"
    shutil.copytree(caches["zarr"], cache)
    expected = CacheReader(cache).read_shard(1)
    other_stamp = (cache / "shards" / "shard_000000.done.json").stat().st_mtime_ns
    (cache / "shards" / "shard_000001.done.json").unlink()

    manifest = run_cache_targets(cache_config(photos, cache, teacher_file))
    actual = CacheReader(cache).read_shard(1)
    assert manifest["num_shards"] == 3
    assert (cache / "shards" / "shard_000001.done.json").is_file()
    assert (cache / "shards" / "shard_000000.done.json").stat().st_mtime_ns == other_stamp
    assert actual.jpeg == expected.jpeg
    for name in expected.targets:
        np.testing.assert_array_equal(actual.targets[name], expected.targets[name])


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_failed_codec_fit_leaves_folder_reusable(tmp_path: Path, photos: Path, teacher_file: Path, fmt: str):
    # 1 calibration image of the 6x6 grid has 36 patches, too few to fit 40 PCA components
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="pca-40 needs at least 40 calibration patches, got 36") as error:
        run_cache_targets(cache_config(photos, cache, teacher_file, codec="pca-40", calibration_images=1))
    assert "--calibration-images" in str(error.value)
    assert not list((cache / "shards").glob("*.done.json"))

    manifest = run_cache_targets(cache_config(photos, cache, teacher_file, format=fmt, codec="pca-8"))

    assert manifest["complete"]
    assert manifest["format"] == fmt
    assert manifest["settings"]["codec"]["name"] == "pca-8"
    assert CacheReader(cache, verify=True).manifest == manifest


def test_settings_change_kept_after_codec_fit(tmp_path: Path, photos: Path, teacher_file: Path, monkeypatch):
    # a fitted codec state is work done under the stored settings, so changing them stays an error
    cache = tmp_path / "cache"

    def fail_write(*args, **kwargs):
        raise RuntimeError("stop after the codec fit")

    monkeypatch.setattr("pipeline.cache.writer.CacheWriter.write_shard", fail_write)
    with pytest.raises(RuntimeError, match="stop after the codec fit"):
        run_cache_targets(cache_config(photos, cache, teacher_file, codec="pca-8"))
    monkeypatch.undo()
    assert (cache / "codec.done.json").is_file()

    with pytest.raises(CacheMismatchError, match="codec.name"):
        run_cache_targets(cache_config(photos, cache, teacher_file, codec="pca-4"))


@pytest.fixture(scope="module")
def codec_caches(workspace: Path, photos: Path, teacher_file: Path) -> dict[str, dict]:
    """Manifests of one-view caches of the same photos, one per codec."""
    manifests = {}
    for codec in ("fp32", "fp16", "int8-channel", "pca-8"):
        out = workspace / f"codec-{codec}"
        manifests[codec] = run_cache_targets(cache_config(photos, out, teacher_file, views=1, codec=codec))
        manifests[codec]["path"] = out
    return manifests


def test_pca_fidelity_below_fp16(codec_caches: dict[str, dict]):
    fp16 = codec_caches["fp16"]["fidelity"]
    pca = codec_caches["pca-8"]["fidelity"]
    assert pca["num_views"] == fp16["num_views"] == 8
    assert fp16["cosine_mean"] > 0.999
    assert pca["cosine_mean"] < fp16["cosine_mean"]
    assert pca["cosine_p1"] < fp16["cosine_p1"]
    assert pca["relative_mse"] > fp16["relative_mse"]


def test_bytes_per_view_rank_by_codec(codec_caches: dict[str, dict]):
    targets = {codec: manifest["bytes_per_view"]["targets"] for codec, manifest in codec_caches.items()}
    total = {codec: manifest["bytes_per_view"]["total"] for codec, manifest in codec_caches.items()}
    patches, dim = 36, 64
    assert targets["fp32"] == patches * dim * 4
    assert targets["fp16"] == patches * dim * 2
    assert targets["int8-channel"] == patches * dim
    assert targets["pca-8"] == patches * (8 + 2)  # int8 coefficients and a float16 scale per patch
    assert total["pca-8"] < total["int8-channel"] < total["fp16"] < total["fp32"]


def test_inspect_prints_fidelity_and_bytes(codec_caches: dict[str, dict]):
    manifest = codec_caches["pca-8"]
    fidelity = manifest["fidelity"]
    text = describe_cache(manifest["path"])
    assert "pca-8" in text
    assert f"{fidelity['cosine_mean']:.5f}" in text
    assert f"{fidelity['cosine_p1']:.5f}" in text
    assert f"{fidelity['relative_mse']:.2e}" in text
    assert f"{manifest['bytes_per_view']['total'] / 1024:.1f} KiB" in text


def test_random_teacher_caches_identical(tmp_path: Path, photos: Path, teacher_file: Path):
    """Two runs with --teacher-weights random write the same targets, so such a cache can resume."""
    manifests = []
    for name in ("first", "second"):
        config = cache_config(photos, tmp_path / name, teacher_file, teacher_weights="random", views=1)
        manifests.append(run_cache_targets(config))
    first, second = manifests
    assert first["settings"]["teacher"]["random_weights"] is True
    assert [shard["files"] for shard in second["shards"]] == [shard["files"] for shard in first["shards"]]


def test_shard_loop_single_loader(tmp_path: Path, photos: Path, teacher_file: Path, monkeypatch):
    loaders = []
    original = ShardJob.loader

    def counted(self, dataset, batch_sampler=None):
        loaders.append(batch_sampler)
        return original(self, dataset, batch_sampler)

    monkeypatch.setattr(ShardJob, "loader", counted)
    # 3 images per shard and 2 images (4 views) per batch: each shard ends on a batch of 1 image
    config = tiny_cache_config(photos, tmp_path / "cache", teacher_file, shard_size=3, batch_size=4, workers=1)
    manifest = run_cache_targets(config)
    reader = CacheReader(tmp_path / "cache")

    shard_loop = [sampler for sampler in loaders if sampler is not None]
    assert len(shard_loop) == 1
    assert [len(batch) for batch in shard_loop[0]] == [2, 1] * 4
    assert manifest["num_images"] == 12
    for record in sorted(reader.shards, key=lambda record: record.shard_id):
        data = reader.read_shard(record.shard_id)
        start = 3 * record.shard_id
        assert data.image_index.tolist() == list(range(start, start + 3)) * 2
        assert data.view_index.tolist() == [0, 0, 0, 1, 1, 1]
