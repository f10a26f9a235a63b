"""The stage-two loader on a real cache: coverage, batch content, masks, memory and JPEG paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers.tiny_runs import (
    IMG_SIZE,
    STUDENT,
    STUDENT_OVERRIDES,
    copy_photos,
    tiny_cache_config,
    write_teacher_checkpoint,
)

from pipeline.cache import CacheReader
from pipeline.codecs import build_codec
from pipeline.config import PretrainConfig
from pipeline.data.cached import CachedViews
from pipeline.data.order import SHARD_WINDOW, batches_per_epoch, interleave_streams, plan_epoch
from pipeline.data.training import BatchList, TrainingData, build_training_data, passthrough
from pipeline.engine import StepSettings
from pipeline.masking import MaskConfig, block_mask, mask_rng
from pipeline.students import build_student
from stages.cache_targets import run_cache_targets

NUM_IMAGES = 14
SHARD_SIZE = 3
SEED = 3
SETTINGS = StepSettings("smooth_l1", 1.0, "none", None, None)


def build_cache(root: Path, cache_format: str) -> Path:
    """Cache NUM_IMAGES real photos with a tiny CLIP teacher: 2 views, shards of SHARD_SIZE images."""
    photos = copy_photos(root / "photos", NUM_IMAGES)
    teacher = write_teacher_checkpoint(root)
    run_cache_targets(tiny_cache_config(photos, root / "cache", teacher, format=cache_format, shard_size=SHARD_SIZE))
    return root / "cache"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("zarr"), "zarr")


@pytest.fixture(scope="module")
def wds_cache_dir(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("wds"), "wds")


def training_data(cache_dir: Path, batch_size: int = 4, workers: int = 2, rank: int = 0, world_size: int = 1,
                  device: str = "cpu", gpu_decode: bool = False) -> TrainingData:
    """The trainer's data for a tiny student, as rank `rank` of `world_size` processes."""
    config = PretrainConfig(
        out="unused",
        cache=str(cache_dir),
        student=STUDENT,
        student_overrides=STUDENT_OVERRIDES,
        img_size=IMG_SIZE,
        steps=1,
        batch_size=batch_size,
        val_fraction=0.1,
        workers=workers,
        device="cpu",
        seed=SEED,
        gpu_decode=gpu_decode,
    )
    student = build_student(config.student, IMG_SIZE, drop_path_rate=0.0, overrides=STUDENT_OVERRIDES)
    mask_config = MaskConfig(*student.grid_size, ratio=config.mask_ratio, min_block=config.min_mask_block)
    data = build_training_data(config, student, mask_config, torch.device(device))
    data.rank, data.world_size = rank, world_size
    return data


def stored_view(cache_dir: Path, view: int) -> dict[str, list]:
    """Image index, JPEG bytes and decoded targets of every sample id of one view, in sample id order."""
    reader = CacheReader(cache_dir)
    codec = build_codec(reader.manifest["settings"]["codec"]["name"])
    if codec.needs_fit:
        codec.load_state(reader.codec_state())
    stored = {"image_index": [], "jpeg": [], "targets": []}
    for record in sorted(reader.shards, key=lambda record: record.shard_id):
        data = reader.read_shard(record.shard_id, view)
        stored["image_index"].extend(int(i) for i in data.image_index)
        stored["jpeg"].extend(data.jpeg)
        stored["targets"].extend(codec.decode(data.targets))
    return stored


def collect(loader) -> list[dict]:
    return [batch for batch in loader]


def test_loader_sees_each_sample_once(cache_dir: Path):
    data = training_data(cache_dir)
    loader = data.loader(epoch=1)
    batches = collect(loader)

    stored = stored_view(cache_dir, view=1)
    expected_images = sorted(stored["image_index"][i] for i in data.train_ids)
    seen_images = sorted(int(i) for batch in batches for i in batch["image_index"])
    seen_ids = sorted(int(i) for batch in batches for i in batch["sample_id"])
    plan = plan_epoch(data.train_groups, SEED, 1, 4)
    assert seen_images == expected_images
    assert seen_ids == sorted(data.train_ids.tolist())
    assert len(batches) == len(loader)
    assert len(batches) == batches_per_epoch(len(data.train_ids), 4, 1)
    assert [len(batch["image_index"]) for batch in batches] == [len(ids) for ids in plan.batches]
    assert all(len(batch["image_index"]) > 0 for batch in batches)


def test_loader_ranks_split_epoch(cache_dir: Path):
    single = collect(training_data(cache_dir, batch_size=4).loader(epoch=0))
    ranks = [collect(training_data(cache_dir, batch_size=2, rank=r, world_size=2).loader(epoch=0)) for r in (0, 1)]

    first = {int(i) for batch in ranks[0] for i in batch["sample_id"]}
    second = {int(i) for batch in ranks[1] for i in batch["sample_id"]}
    everything = {int(i) for batch in single for i in batch["sample_id"]}
    assert not first & second
    assert first | second == everything
    assert len(ranks[0]) == len(ranks[1]) == batches_per_epoch(len(everything), 2, 2)
    assert all(len(batch["sample_id"]) > 0 for rank in ranks for batch in rank)


@pytest.mark.parametrize("fixture", ["cache_dir", "wds_cache_dir"])
def test_batches_equal_stored_samples(fixture: str, request):
    cache = request.getfixturevalue(fixture)
    data = training_data(cache, workers=2 if fixture == "cache_dir" else 0)
    stored = stored_view(cache, view=1)

    for batch in data.loader(epoch=1):
        assert batch["images"].dtype == torch.uint8
        assert batch["images"].shape[1:] == (3, IMG_SIZE, IMG_SIZE)
        # fp16 targets stay fp16 in the loader; the trainer converts them on its device
        targets = data.dataset.finish_targets(batch["target_parts"])
        assert batch["target_parts"]["values"].dtype == torch.float16
        assert targets.shape[1:] == (36, 64)
        for i, sample_id in enumerate(batch["sample_id"].tolist()):
            encoded = torch.frombuffer(bytearray(stored["jpeg"][sample_id]), dtype=torch.uint8)
            decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
            assert int(batch["image_index"][i]) == stored["image_index"][sample_id]
            assert torch.equal(batch["images"][i], decoded)
            np.testing.assert_array_equal(targets[i].float().numpy(), stored["targets"][sample_id])


def test_masks_depend_on_seed_epoch_image(cache_dir: Path):
    data = training_data(cache_dir, batch_size=4, workers=2)
    other = training_data(cache_dir, batch_size=3, workers=0)
    config = data.dataset.mask_config

    masks = {}
    for batch in data.loader(epoch=2):
        for index, mask in zip(batch["image_index"].tolist(), batch["mask"]):
            masks[index] = mask.numpy()
    regrouped = {}
    for batch in other.loader(epoch=2):
        for index, mask in zip(batch["image_index"].tolist(), batch["mask"]):
            regrouped[index] = mask.numpy()
    next_epoch = {}
    for batch in data.loader(epoch=3):
        for index, mask in zip(batch["image_index"].tolist(), batch["mask"]):
            next_epoch[index] = mask.numpy()

    assert masks.keys() == regrouped.keys() == next_epoch.keys()
    for index, mask in masks.items():
        assert mask.dtype == np.bool_
        assert int(mask.sum()) == config.num_masked
        np.testing.assert_array_equal(mask, regrouped[index])
        np.testing.assert_array_equal(mask, block_mask(config, mask_rng(SEED, 2, index)))
    assert any(not np.array_equal(masks[index], next_epoch[index]) for index in masks)


@pytest.mark.parametrize("window", [1, 2, SHARD_WINDOW])
def test_slices_in_memory_stay_within_window(cache_dir: Path, window: int):
    data = training_data(cache_dir, workers=0)
    dataset = CachedViews(cache_dir, data.dataset.mask_config, SEED, shards_in_memory=window)
    num_shards = len(dataset.layout.shard_ids)
    assert num_shards > window

    reads, held_at_read, held_after_batch = [], [], []
    read_shard = dataset.reader.read_shard

    def counted_read(shard_id, view=None, **options):
        reads.append((shard_id, view))
        held_at_read.append(dataset.slices_in_memory)
        return read_shard(shard_id, view, **options)

    dataset.reader.read_shard = counted_read
    for epoch in (0, 1):
        plan = plan_epoch(data.train_groups, SEED, epoch, batch_size=4, window=window)
        batches = BatchList(epoch, epoch % 2, plan.batches)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=passthrough)
        for _ in loader:
            held_after_batch.append(dataset.slices_in_memory)

    assert max(held_at_read) < window
    assert max(held_after_batch) <= window
    assert sorted(reads) == sorted((shard, view) for view in (0, 1) for shard in range(num_shards))


def test_device_decode_equals_worker_decode(cache_dir: Path):
    decoded_in_workers = training_data(cache_dir, workers=0)
    decoded_on_device = training_data(cache_dir, workers=0)
    decoded_on_device.dataset.decode_jpeg = False
    decoded_on_device.decode_on_device = True
    device = torch.device("cpu")

    for batch, encoded in zip(decoded_in_workers.loader(epoch=0), decoded_on_device.loader(epoch=0)):
        assert "images" not in encoded
        assert encoded["jpeg"].dtype == torch.uint8
        assert encoded["jpeg_offsets"].tolist()[-1] == encoded["jpeg"].numel()
        assert len(encoded["jpeg_offsets"]) == len(batch["image_index"]) + 1
        images, targets, mask = decoded_in_workers.to_device(batch, device, SETTINGS)
        images_from_bytes, targets_again, mask_again = decoded_on_device.to_device(encoded, device, SETTINGS)
        assert torch.equal(images_from_bytes, images)
        assert torch.equal(targets_again, targets)
        assert torch.equal(mask_again, mask)


@pytest.mark.parametrize("codec", ["int8-channel", "int8-token+zstd", "pca-8"])
def test_quantized_targets_finish_in_trainer(tmp_path: Path, codec: str):
    photos = copy_photos(tmp_path / "photos", 6)
    teacher = write_teacher_checkpoint(tmp_path)
    config = tiny_cache_config(photos, tmp_path / "cache", teacher, codec=codec, shard_size=SHARD_SIZE)
    run_cache_targets(config)
    data = training_data(tmp_path / "cache", workers=1)
    stored = stored_view(tmp_path / "cache", view=0)
    part_dtypes = {name: dtype for name, (_, dtype) in data.dataset.reader.layout.parts.items()}

    for batch in data.loader(epoch=0):
        # the workers send the stored int8 codes and float16 scales, not float32 targets
        assert {name: part.numpy().dtype for name, part in batch["target_parts"].items()} == part_dtypes
        _, targets, _ = data.to_device(batch, torch.device("cpu"), SETTINGS)
        expected = np.stack([stored["targets"][i] for i in batch["sample_id"].tolist()])
        assert targets.dtype == torch.float32
        np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_gpu_decode_falls_back_without_cuda(cache_dir: Path):
    data = training_data(cache_dir, workers=0, gpu_decode=True)
    assert data.decode_on_device is False
    assert data.dataset.decode_jpeg is True


def test_loader_pins_memory_only_for_cuda(cache_dir: Path):
    on_cpu = training_data(cache_dir, workers=2).loader(epoch=0)
    for_cuda = training_data(cache_dir, workers=2, device="cuda").loader(epoch=0)
    assert on_cpu.pin_memory is False
    assert for_cuda.pin_memory is True
    assert for_cuda.prefetch_factor == 4


def test_batch_rejects_two_views(cache_dir: Path):
    data = training_data(cache_dir, workers=0)
    with pytest.raises(ValueError, match="one epoch and one view"):
        data.dataset.__getitems__([(0, 0, 0), (0, 1, 1)])


def test_workers_read_their_own_shards(cache_dir: Path, tmp_path: Path, monkeypatch):
    data = training_data(cache_dir, workers=0)
    dataset = CachedViews(cache_dir, data.dataset.mask_config, SEED, shards_in_memory=1)
    num_shards = len(dataset.layout.shard_ids)
    reads_file = tmp_path / "reads.txt"
    read_shard = CacheReader.read_shard

    def logged_read(reader, shard_id, view=None, **options):
        with reads_file.open("a") as stream:
            stream.write(f"{os.getpid()} {shard_id}\n")
        return read_shard(reader, shard_id, view, **options)

    # the forked DataLoader workers inherit the patched class
    monkeypatch.setattr(CacheReader, "read_shard", logged_read)
    plan = plan_epoch(data.train_groups, SEED, 0, batch_size=2, window=1)
    batches = BatchList(0, 0, interleave_streams(plan.batches, 2))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=passthrough, num_workers=2)
    seen = sorted(int(i) for batch in loader for i in batch["sample_id"])

    reads = [line.split() for line in reads_file.read_text().splitlines()]
    by_worker: dict[str, list[str]] = {}
    for pid, shard in reads:
        by_worker.setdefault(pid, []).append(shard)
    assert seen == sorted(data.train_ids.tolist())
    assert len(by_worker) == 2
    for shards in by_worker.values():
        assert len(shards) == len(set(shards))
    # the two runs share at most the one-shard window at their boundary
    assert len(reads) <= num_shards + 1


def test_resumed_epoch_keeps_its_streams(cache_dir: Path):
    started = [batch["sample_id"] for batch in training_data(cache_dir, workers=2).loader(epoch=1)]
    resumed = [batch["sample_id"] for batch in training_data(cache_dir, workers=0).loader(epoch=1, skip_batches=2, streams=2)]
    trained = torch.cat(started[:2] + resumed)
    assert len(resumed) == len(started) - 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, started[2:]))
    assert sorted(trained.tolist()) == sorted(training_data(cache_dir, workers=0).train_ids.tolist())
