import io
import json
import multiprocessing
import os
import re
import subprocess
import sys

import numcodecs
import numpy as np
import pytest
import webdataset
import zarr
from cache_helpers import (
    NUM_VIEWS,
    PARTS,
    SETTINGS,
    make_shard,
    open_writer,
    write_cache,
    write_shards_worker,
)
from PIL import Image

from pipeline.atomic import host_name
from pipeline.cache import CacheReader, CacheWriter, ShardData
from pipeline.cache import zarr_store
from pipeline.errors import CacheMismatchError, CorruptCacheError, UsageError

FORMATS = ["zarr", "wds"]


def assert_same_samples(actual: ShardData, expected: ShardData) -> None:
    np.testing.assert_array_equal(actual.image_index, expected.image_index)
    np.testing.assert_array_equal(actual.view_index, expected.view_index)
    assert actual.source == expected.source
    np.testing.assert_array_equal(actual.label, expected.label)
    np.testing.assert_array_equal(actual.params, expected.params)
    assert actual.jpeg == expected.jpeg
    assert sorted(actual.targets) == sorted(expected.targets)
    for name in expected.targets:
        assert actual.targets[name].dtype == expected.targets[name].dtype
        np.testing.assert_array_equal(actual.targets[name], expected.targets[name])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_round_trip_whole_shard(tmp_path, fmt, compressor):
    _, shards = write_cache(tmp_path / "cache", fmt, [[0, 1, 2], [3, 5]], compressor)
    reader = CacheReader(tmp_path / "cache")

    for shard_id, expected in enumerate(shards):
        actual = reader.read_shard(shard_id)
        assert_same_samples(actual, expected)
        assert actual.params.dtype == np.float64
        assert actual.image_index.dtype == np.int64
        assert actual.view_index.dtype == np.int32
        assert actual.label.dtype == np.int64


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_jpegs_decode(tmp_path, fmt):
    _, shards = write_cache(tmp_path / "cache", fmt, [[0, 1, 2]])
    actual = CacheReader(tmp_path / "cache").read_shard(0, view=1)

    for got, sent in zip(actual.jpeg, shards[0].jpeg[3:]):
        pixels = np.asarray(Image.open(io.BytesIO(got)).convert("RGB"))
        reference = np.asarray(Image.open(io.BytesIO(sent)).convert("RGB"))
        assert pixels.shape == (16, 16, 3)
        np.testing.assert_array_equal(pixels, reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_view_slice_only_that_view(tmp_path, fmt):
    _, shards = write_cache(tmp_path / "cache", fmt, [[0, 1, 2], [3, 4]])
    reader = CacheReader(tmp_path / "cache")

    for view in range(NUM_VIEWS):
        actual = reader.read_shard(1, view=view)
        expected = shards[1].select(shards[1].view_index == view)
        assert len(actual) == 2
        assert set(actual.view_index.tolist()) == {view}
        assert_same_samples(actual, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_counts(tmp_path, fmt):
    write_cache(tmp_path / "cache", fmt, [[0, 1, 2], [3, 5]])
    reader = CacheReader(tmp_path / "cache")

    assert reader.num_samples() == 5 * NUM_VIEWS
    assert reader.num_samples(view=0) == 5
    assert [record.num_images for record in reader.shards] == [3, 2]
    with pytest.raises(ValueError, match="view 2 is out of range"):
        reader.num_samples(view=2)


def test_zarr_one_chunk_per_view_slice(tmp_path):
    write_cache(tmp_path / "cache", "zarr", [[0, 1, 2], [3, 5]], "zstd")

    for name, n in [("shard_000000", 3), ("shard_000001", 2)]:
        group = zarr.open_group(str(tmp_path / "cache" / "shards" / name), mode="r")
        for array_name in ["image_index", "view_index", "label", "crc32", "source", "params"]:
            assert group[array_name].shape[0] == n * NUM_VIEWS
            assert group[array_name].chunks[0] == n, array_name
        assert group["params"].chunks == (n, 5)
        assert group["targets/codes"].chunks == (n, 4, 8)
        assert group["targets/scale"].chunks == (n, 4)
        assert group["jpeg_offsets"].chunks == (1, n + 1)
        for view in range(NUM_VIEWS):
            flat = group[f"jpeg_v{view:03d}"]
            assert flat.chunks == flat.shape


def test_zarr_targets_use_compressor(tmp_path):
    write_cache(tmp_path / "plain", "zarr", [[0, 1, 2]], None)
    write_cache(tmp_path / "zstd", "zarr", [[0, 1, 2]], "zstd:5")

    plain = zarr.open_array(str(tmp_path / "plain" / "shards" / "shard_000000" / "targets" / "codes"), mode="r")
    packed = zarr.open_array(str(tmp_path / "zstd" / "shards" / "shard_000000" / "targets" / "codes"), mode="r")
    assert plain.compressors == ()
    assert [type(c).__name__ for c in packed.compressors] == ["ZstdCodec"]
    assert packed.compressors[0].level == 5


def test_zarr_manifest_mirrored_in_root(tmp_path):
    writer, _ = write_cache(tmp_path / "cache", "zarr", [[0, 1]])

    mirrored = zarr.open_group(str(tmp_path / "cache"), mode="r").attrs["maskdistill"]
    assert mirrored == writer.manifest


def test_wds_tar_members_and_webdataset_reads(tmp_path):
    _, shards = write_cache(tmp_path / "cache", "wds", [[0, 1, 2]], "zstd")
    url = str(tmp_path / "cache" / "shards" / "shard_000000-v1.tar")

    samples = list(webdataset.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000000_v001", "000000001_v001", "000000002_v001"]
    assert set(samples[0]) >= {"jpg", "params.npy", "meta.json", "codes.npy.zst", "scale.npy.zst"}
    assert samples[1]["jpg"] == shards[0].jpeg[4]
    meta = json.loads(samples[1]["meta.json"])
    assert meta["image_index"] == 1
    assert meta["view_index"] == 1
    assert meta["source"] == shards[0].source[4]


def test_wds_rewrite_same_bytes(tmp_path):
    first, _ = write_cache(tmp_path / "a", "wds", [[0, 1, 2]])
    second, _ = write_cache(tmp_path / "b", "wds", [[0, 1, 2]])

    assert first.manifest["shards"][0]["files"] == second.manifest["shards"][0]["files"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_shard_round_trip(tmp_path, fmt):
    writer = open_writer(tmp_path / "cache", fmt)
    writer.write_shard(0, make_shard([0, 1]), (0, 3), 2)
    writer.write_shard(1, make_shard([]), (3, 6), 0)
    writer.finalize({})
    reader = CacheReader(tmp_path / "cache")

    assert len(reader.read_shard(1)) == 0
    assert len(reader.read_shard(1, view=1)) == 0
    assert reader.read_shard(1).targets["codes"].shape == (0, 4, 8)
    assert reader.num_samples() == 2 * NUM_VIEWS


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"settings": {**SETTINGS, "teacher": "ViT-L-14"}}, "settings.teacher"),
        ({"settings": {**SETTINGS, "views": {"size": 64, "num_views": NUM_VIEWS}}}, "settings.views.size"),
        ({"compressor": "zstd"}, "compressor"),
        ({"fmt": "wds"}, "format"),
    ],
)
def test_reopen_other_settings_raises(tmp_path, change, setting):
    open_writer(tmp_path / "cache", "zarr").write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)
    args = {"fmt": "zarr", "compressor": None, "settings": SETTINGS} | change

    with pytest.raises(CacheMismatchError) as raised:
        open_writer(tmp_path / "cache", args["fmt"], args["compressor"], args["settings"])
    assert f"{setting} = " in str(raised.value)


def test_reopen_mismatch_names_both_values(tmp_path):
    open_writer(tmp_path / "cache", "zarr").write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)

    with pytest.raises(CacheMismatchError) as raised:
        open_writer(tmp_path / "cache", "zarr", settings={**SETTINGS, "teacher": "ViT-L-14"})
    assert '"ViT-B-16"' in str(raised.value)
    assert '"ViT-L-14"' in str(raised.value)


def test_reopen_other_codec_parts_raises(tmp_path):
    open_writer(tmp_path / "cache", "wds").write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)
    parts = {"codes": ((4, 16), np.dtype(np.int8)), "scale": PARTS["scale"]}

    with pytest.raises(CacheMismatchError, match=r"codec_parts\.codes\.shape"):
        CacheWriter(tmp_path / "cache", "wds", SETTINGS, parts, None, NUM_VIEWS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reopen_without_data_starts_over(tmp_path, fmt):
    open_writer(tmp_path / "cache", "zarr")
    (tmp_path / "cache" / "shards" / "shard_000000").mkdir()  # an unrecorded shard of a killed run
    settings = {**SETTINGS, "teacher": "ViT-L-14"}

    writer = open_writer(tmp_path / "cache", fmt, settings=settings)

    assert writer.manifest["format"] == fmt
    assert writer.manifest["settings"]["teacher"] == "ViT-L-14"
    assert not (tmp_path / "cache" / "shards" / "shard_000000").exists()
    assert (tmp_path / "cache" / "zarr.json").exists() == (fmt == "zarr")
    writer.write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)
    writer.finalize({"skipped": []})
    assert CacheReader(tmp_path / "cache", verify=True).manifest["settings"]["teacher"] == "ViT-L-14"


def test_reopen_with_codec_state_raises(tmp_path):
    open_writer(tmp_path / "cache", "zarr").write_codec_state({"offset": np.zeros(8, dtype=np.float32)})

    with pytest.raises(CacheMismatchError, match="settings.teacher"):
        open_writer(tmp_path / "cache", "zarr", settings={**SETTINGS, "teacher": "ViT-L-14"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_skips_finished_shards(tmp_path, fmt):
    first = open_writer(tmp_path / "cache", fmt)
    first.write_shard(0, make_shard([0, 1, 2], seed=0), (0, 3), 3)

    resumed = open_writer(tmp_path / "cache", fmt)
    assert resumed.finished_shards() == {0}
    with pytest.raises(ValueError, match="already finished"):
        resumed.write_shard(0, make_shard([0, 1, 2], seed=0), (0, 3), 3)

    resumed.write_shard(1, make_shard([3, 4], seed=1), (3, 6), 2)
    manifest = resumed.finalize({}, expected_shards=2)
    assert [shard["shard_id"] for shard in manifest["shards"]] == [0, 1]
    assert manifest["num_samples"] == 5 * NUM_VIEWS


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_rewrites_unrecorded_shard(tmp_path, fmt):
    writer = open_writer(tmp_path / "cache", fmt)
    writer.write_shard(0, make_shard([0, 1, 2], seed=0), (0, 3), 3)
    (tmp_path / "cache" / "shards" / "shard_000000.done.json").unlink()

    resumed = open_writer(tmp_path / "cache", fmt)
    assert resumed.finished_shards() == set()
    expected = make_shard([0, 2], seed=7)
    resumed.write_shard(0, expected, (0, 3), 2)
    resumed.finalize({})

    assert_same_samples(CacheReader(tmp_path / "cache").read_shard(0), expected)


def test_recorded_shard_missing_file_rewritten(tmp_path):
    writer = open_writer(tmp_path / "cache", "wds")
    writer.write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)
    (tmp_path / "cache" / "shards" / "shard_000000-v1.tar").unlink()

    resumed = open_writer(tmp_path / "cache", "wds")
    assert resumed.finished_shards() == set()
    resumed.write_shard(0, make_shard([0, 1, 2]), (0, 3), 3)
    assert resumed.finished_shards() == {0}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("fmt", FORMATS)
def test_leftover_temp_dirs_removed(tmp_path, fmt):
    writer = open_writer(tmp_path / "cache", fmt)
    writer.write_shard(0, make_shard([0, 1]), (0, 3), 2)
    shards = tmp_path / "cache" / "shards"
    killed = shards / f".tmp-shard_000001-{dead_pid()}-0123abcd@{host_name()}"
    live = shards / f".tmp-shard_000002-{os.getpid()}-0123abcd@{host_name()}"
    remote = shards / f".tmp-shard_000003-{dead_pid()}-0123abcd@other-host"
    for folder in (killed, live, remote):
        (folder / "params").mkdir(parents=True)
        (folder / "zarr.json").write_text("{}")

    resumed = open_writer(tmp_path / "cache", fmt)

    assert not killed.exists()
    assert live.exists()
    assert remote.exists()
    assert resumed.finished_shards() == {0}


@pytest.mark.parametrize("fmt", FORMATS)
def test_concurrent_writers_then_finalize(tmp_path, fmt):
    root = tmp_path / "cache"
    open_writer(root, fmt)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=write_shards_worker, args=(str(root), fmt, ids)) for ids in ([0, 2], [1, 3])
    ]

    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]

    manifest = open_writer(root, fmt).finalize({"world_size": 2}, expected_shards=4)
    assert [shard["shard_id"] for shard in manifest["shards"]] == [0, 1, 2, 3]
    assert manifest["world_size"] == 2
    reader = CacheReader(root)
    for shard_id in range(4):
        expected = make_shard([3 * shard_id, 3 * shard_id + 2], seed=shard_id)
        assert_same_samples(reader.read_shard(shard_id), expected)
    assert not [p for p in (root / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_finalize_missing_shards_raises(tmp_path):
    writer = open_writer(tmp_path / "cache", "zarr")
    writer.write_shard(1, make_shard([3, 4]), (3, 6), 2)

    with pytest.raises(UsageError, match=r"is missing shards \[0, 2\]"):
        writer.finalize({}, expected_shards=3)


def test_write_shard_rejects_bad_layout(tmp_path):
    writer = open_writer(tmp_path / "cache", "zarr")
    data = make_shard([0, 1, 2])
    image_major = data.select(np.argsort(data.image_index, kind="stable"))
    wrong_dtype = make_shard([0, 1, 2])
    wrong_dtype.targets["codes"] = wrong_dtype.targets["codes"].astype(np.int16)

    with pytest.raises(ValueError, match="view-major"):
        writer.write_shard(0, image_major, (0, 3), 3)
    with pytest.raises(ValueError, match="outside image_range"):
        writer.write_shard(0, data, (1, 3), 3)
    with pytest.raises(ValueError, match="expected num_images"):
        writer.write_shard(0, data, (0, 3), 2)
    with pytest.raises(ValueError, match="target part 'codes' is int16"):
        writer.write_shard(0, wrong_dtype, (0, 3), 3)
    assert writer.finished_shards() == set()
    assert not [p for p in (tmp_path / "cache" / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_writer_rejects_non_cache_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")

    with pytest.raises(UsageError, match="is not empty and has no manifest.json"):
        open_writer(tmp_path / "photos", "zarr")


def test_writer_rejects_unknown_format(tmp_path):
    with pytest.raises(UsageError, match="format 'lmdb' is invalid"):
        open_writer(tmp_path / "cache", "lmdb")


@pytest.mark.parametrize("fmt", FORMATS)
def test_codec_state_round_trip(tmp_path, fmt):
    writer = open_writer(tmp_path / "cache", fmt)
    state = {"basis": np.arange(12, dtype=np.float32).reshape(3, 4), "mean": np.ones(4), "rank": np.array(3)}

    assert writer.read_codec_state() is None
    writer.write_codec_state(state)
    writer.write_codec_state(state)
    with pytest.raises(ValueError, match="different codec state"):
        writer.write_codec_state({**state, "rank": np.array(4)})
    writer.finalize({})

    loaded = CacheReader(tmp_path / "cache").codec_state()
    assert sorted(loaded) == ["basis", "mean", "rank"]
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)


def test_codec_state_absent_is_empty(tmp_path):
    write_cache(tmp_path / "cache", "zarr", [[0]])

    assert CacheReader(tmp_path / "cache").codec_state() == {}


def test_zarr_deleted_chunk_raises(tmp_path):
    write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]])
    (tmp_path / "cache" / "shards" / "shard_000000" / "targets" / "codes" / "c" / "1" / "0" / "0").unlink()
    reader = CacheReader(tmp_path / "cache")

    for check in (False, True):
        with pytest.raises(CorruptCacheError, match="shard_000000") as raised:
            reader.read_shard(0, view=1, check=check)
        assert "targets/codes/c/1/0/0" in str(raised.value)
        with pytest.raises(CorruptCacheError, match="shard_000000"):
            reader.read_shard(0, check=check)
    assert len(reader.read_shard(0, view=0, check=False)) == 3


@pytest.mark.parametrize("compressor", [None, "zstd"])
@pytest.mark.parametrize("keep_bytes", [0, 7])
def test_zarr_truncated_chunk_raises(tmp_path, compressor, keep_bytes):
    write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]], compressor)
    chunk = tmp_path / "cache" / "shards" / "shard_000000" / "targets" / "codes" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:keep_bytes])
    reader = CacheReader(tmp_path / "cache")

    with pytest.raises(CorruptCacheError, match="shard_000000"):
        reader.read_shard(0, view=1, check=False)
    assert len(reader.read_shard(0, view=0, check=False)) == 3


def test_zarr_short_zstd_chunk_raises(tmp_path):
    write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]], "zstd")
    chunk = tmp_path / "cache" / "shards" / "shard_000000" / "targets" / "codes" / "c" / "1" / "0" / "0"
    full = numcodecs.Zstd().decode(chunk.read_bytes())
    chunk.write_bytes(numcodecs.Zstd().encode(full[: len(full) // 2]))

    with pytest.raises(CorruptCacheError, match="shard_000000") as raised:
        CacheReader(tmp_path / "cache").read_shard(0, view=1, check=False)
    assert f"decompresses to {len(full) // 2} bytes, expected {len(full)}" in str(raised.value)


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_zarr_target_chunks_skip_zarr(tmp_path, compressor, monkeypatch):
    _, shards = write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]], compressor)
    read_rows = zarr_store._read_rows

    def no_targets(folder, name, group, array_path, *args):
        assert not array_path.startswith("targets/"), array_path
        return read_rows(folder, name, group, array_path, *args)

    monkeypatch.setattr(zarr_store, "_read_rows", no_targets)
    reader = CacheReader(tmp_path / "cache")
    assert_same_samples(reader.read_shard(0), shards[0])
    assert_same_samples(reader.read_shard(0, view=1), shards[0].select(shards[0].view_index == 1))


def test_zarr_big_endian_targets_read(tmp_path):
    writer, shards = write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]])
    group = zarr.open_group(str(tmp_path / "cache" / "shards" / "shard_000000" / "targets"), mode="a")
    values = shards[0].targets["scale"]
    del group["scale"]
    array = group.create_array(
        "scale",
        shape=values.shape,
        chunks=(3, 4),
        dtype=values.dtype,
        serializer=zarr.codecs.BytesCodec(endian="big"),
        compressors=None,
        chunk_key_encoding={"name": "default", "separator": "/"},
    )
    array[...] = values

    actual = CacheReader(tmp_path / "cache").read_shard(0, check=False)
    assert actual.targets["scale"].dtype == np.float16
    np.testing.assert_array_equal(actual.targets["scale"], values)


def test_zarr_unrecorded_missing_chunk_raises(tmp_path):
    """A chunk missing from disk and from the record must not read back as fill values."""
    write_cache(tmp_path / "cache", "zarr", [[0, 1, 2]])
    manifest_file = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    chunk = "shards/shard_000000/label/c/0"
    del manifest["shards"][0]["files"][chunk]
    manifest_file.write_text(json.dumps(manifest))
    (tmp_path / "cache" / chunk).unlink()

    with pytest.raises(CorruptCacheError, match="missing chunk file label/c/0"):
        CacheReader(tmp_path / "cache").read_shard(0, view=0, check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_deleted_tar_or_chunk_named(tmp_path, fmt):
    write_cache(tmp_path / "cache", fmt, [[0, 1, 2]])
    victim = "shards/shard_000000-v0.tar" if fmt == "wds" else "shards/shard_000000/params/c/0/0"
    (tmp_path / "cache" / victim).unlink()

    with pytest.raises(CorruptCacheError) as raised:
        CacheReader(tmp_path / "cache").read_shard(0, view=0, check=False)
    assert f"file {victim} is missing" in str(raised.value)
    assert "shard_000000.done.json" in str(raised.value)


def test_reader_missing_manifest_names_path(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(UsageError) as raised:
        CacheReader(tmp_path / "empty")
    assert str(tmp_path / "empty" / "manifest.json") in str(raised.value)


def test_reader_missing_folder_names_path(tmp_path):
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / "nowhere"))):
        CacheReader(tmp_path / "nowhere")


def test_reader_rejects_unfinished_cache(tmp_path):
    writer = open_writer(tmp_path / "cache", "zarr")
    writer.write_shard(0, make_shard([0]), (0, 3), 1)

    with pytest.raises(UsageError, match="incomplete"):
        CacheReader(tmp_path / "cache")


def test_reader_unknown_shard_raises(tmp_path):
    write_cache(tmp_path / "cache", "wds", [[0]])

    with pytest.raises(ValueError, match="no shard 5"):
        CacheReader(tmp_path / "cache").read_shard(5)
