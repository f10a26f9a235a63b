import os
import tarfile

import numpy as np
import pytest
import zarr
from cache_helpers import write_cache

from pipeline.cache import CacheReader, verify_cache
from pipeline.errors import CorruptCacheError, UsageError


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def jpeg_offset(cache, view, position):
    """Return the byte offset of the middle of a sample's JPEG inside its view's flat zarr chunk."""
    offsets = zarr.open_array(str(cache / "shards" / "shard_000000" / "jpeg_offsets"), mode="r")[view]
    return int(offsets[position] + offsets[position + 1]) // 2


def tar_member_offset(path, member_name):
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
        return member.offset_data + member.size // 2


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_intact_cache_ok(tmp_path, fmt):
    write_cache(tmp_path / "cache", fmt, [[0, 1, 2], [3, 4]], "zstd")

    report = verify_cache(tmp_path / "cache")

    assert report.ok
    assert report.bad_shards == []
    assert report.num_shards == 2
    assert report.num_samples == 10
    assert "is intact" in report.summary()


def test_zarr_flipped_target_byte_names_sample(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "zarr", [[0, 1, 2], [3, 4]])
    # raw int8 chunk of view 1: sample i of the slice is bytes [32 i, 32 i + 32)
    flip_byte(cache / "shards" / "shard_000000" / "targets" / "codes" / "c" / "1" / "0" / "0", 2 * 32 + 5)

    report = verify_cache(cache)

    assert not report.ok
    assert [problem.name for problem in report.bad_shards] == ["shard_000000"]
    problem = report.bad_shards[0]
    assert problem.bad_samples == [(2, 1)]
    assert problem.errors == ["file shards/shard_000000/targets/codes/c/1/0/0 does not match its sha256"]
    assert "(2, 1)" in report.summary()


def test_zarr_flipped_jpeg_byte_names_sample(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "zarr", [[0, 1, 2]])
    flip_byte(cache / "shards" / "shard_000000" / "jpeg_v000" / "c" / "0", jpeg_offset(cache, 0, 1))

    report = verify_cache(cache)

    assert report.bad_shards[0].bad_samples == [(1, 0)]


def test_zarr_flipped_byte_read_shard_raises(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "zarr", [[0, 1, 2]])
    flip_byte(cache / "shards" / "shard_000000" / "targets" / "codes" / "c" / "1" / "0" / "0", 2 * 32 + 5)
    reader = CacheReader(cache)

    with pytest.raises(CorruptCacheError) as raised:
        reader.read_shard(0, view=1)
    assert "shard_000000" in str(raised.value)
    assert "(2, 1)" in str(raised.value)
    assert len(reader.read_shard(0, view=0)) == 3


def test_zarr_damaged_zstd_chunk_reported(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "zarr", [[0, 1, 2]], "zstd")
    chunk = cache / "shards" / "shard_000000" / "targets" / "codes" / "c" / "0" / "0" / "0"
    flip_byte(chunk, 0)  # the zstd frame magic number

    report = verify_cache(cache)

    problem = report.bad_shards[0]
    assert problem.errors[0] == "file shards/shard_000000/targets/codes/c/0/0/0 does not match its sha256"
    assert problem.errors[1].startswith("view 0 does not decode")
    assert len(problem.errors) == 2
    assert problem.bad_samples == []


def test_zarr_deleted_chunk_reported(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "zarr", [[0, 1, 2]])
    (cache / "shards" / "shard_000000" / "label" / "c" / "1").unlink()

    report = verify_cache(cache)

    problem = report.bad_shards[0]
    assert "file shards/shard_000000/label/c/1 is missing" in problem.errors
    assert any(error.startswith("view 1 does not decode") for error in problem.errors)
    assert not any(error.startswith("view 0") for error in problem.errors)


def test_wds_flipped_jpeg_byte_names_sample(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2]])
    tar = cache / "shards" / "shard_000000-v0.tar"
    flip_byte(tar, tar_member_offset(tar, "000000001_v000.jpg"))

    report = verify_cache(cache)

    problem = report.bad_shards[0]
    assert problem.bad_samples == [(1, 0)]
    assert problem.errors == ["file shards/shard_000000-v0.tar does not match its sha256"]


def test_wds_truncated_tar_reported(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2], [3]])
    tar = cache / "shards" / "shard_000000-v1.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])

    report = verify_cache(cache)

    assert [problem.name for problem in report.bad_shards] == ["shard_000000"]
    problem = report.bad_shards[0]
    assert problem.errors[0] == "file shards/shard_000000-v1.tar does not match its sha256"
    assert problem.errors[1].startswith("view 1 does not decode")


def test_wds_deleted_tar_reported(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2]])
    (cache / "shards" / "shard_000000-v0.tar").unlink()

    report = verify_cache(cache)

    problem = report.bad_shards[0]
    assert problem.errors[0] == "file shards/shard_000000-v0.tar is missing"
    assert problem.errors[1].startswith("view 0 does not decode")
    assert len(problem.errors) == 2


@pytest.mark.parametrize("check", [False, True])
def test_wds_truncated_tar_read_raises(tmp_path, check):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2]])
    tar = cache / "shards" / "shard_000000-v1.tar"
    tar.write_bytes(tar.read_bytes()[:2048])

    with pytest.raises(CorruptCacheError, match="shard_000000"):
        CacheReader(cache).read_shard(0, view=1, check=check)


def test_codec_state_damage_reported(tmp_path):
    cache = tmp_path / "cache"
    writer, _ = write_cache(cache, "zarr", [[0]])
    writer.write_codec_state({"basis": np.arange(8, dtype=np.float32)})
    writer.finalize({})
    flip_byte(cache / "codec" / "basis" / "c" / "0", 3)

    report = verify_cache(cache)

    assert report.codec_errors == ["file codec/basis/c/0 does not match its sha256"]
    assert not report.ok
    with pytest.raises(CorruptCacheError, match="codec state"):
        CacheReader(cache).codec_state()


def test_reader_verify_flag_raises(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2], [3]])
    flip_byte(cache / "shards" / "shard_000001-v1.tar", 700)

    CacheReader(cache)
    with pytest.raises(CorruptCacheError, match=r"1 damaged shards: \['shard_000001"):
        CacheReader(cache, verify=True)


def test_changed_file_hashed_again(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, "wds", [[0, 1, 2]])
    reader = CacheReader(cache)
    reader.read_shard(0, view=0)
    tar = cache / "shards" / "shard_000000-v0.tar"
    stat = tar.stat()
    flip_byte(tar, tar_member_offset(tar, "000000002_v000.jpg"))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    with pytest.raises(CorruptCacheError, match=r"\(2, 0\)"):
        reader.read_shard(0, view=0)


def test_verify_missing_manifest(tmp_path):
    with pytest.raises(UsageError, match="manifest.json"):
        verify_cache(tmp_path)
