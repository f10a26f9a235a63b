import json
import re

import numpy as np
import pytest
from cache_helpers import NUM_VIEWS, SETTINGS, make_shard, open_writer, write_cache

from pipeline.cache import SCHEMA_VERSION, CacheReader, ShardRecord, load_manifest, write_manifest
from pipeline.cache.manifest import first_difference, flatten, to_json_value
from pipeline.errors import CacheMismatchError, CorruptCacheError, UsageError


def test_write_load_round_trip(tmp_path):
    manifest = {"schema_version": SCHEMA_VERSION, "format": "zarr", "settings": {"seed": 3, "sizes": [224, 112]}}

    write_manifest(tmp_path, manifest)

    assert load_manifest(tmp_path) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name != "manifest.json"]


def test_load_missing_manifest_names_path(tmp_path):
    with pytest.raises(UsageError) as raised:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(raised.value)
    assert "not a maskdistill cache" in str(raised.value)


def test_load_missing_folder_names_path(tmp_path):
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / "absent"))):
        load_manifest(tmp_path / "absent")


def test_load_invalid_json_is_corrupt(tmp_path):
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "format": ')

    with pytest.raises(CorruptCacheError, match="is not valid JSON"):
        load_manifest(tmp_path)


def test_load_unknown_schema_version(tmp_path):
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION + 1, "format": "zarr"})

    with pytest.raises(CacheMismatchError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        load_manifest(tmp_path)


def test_load_unknown_format_is_corrupt(tmp_path):
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "format": "hdf5"})

    with pytest.raises(CorruptCacheError, match="'hdf5'"):
        load_manifest(tmp_path)


def test_reader_unknown_schema_version(tmp_path):
    write_cache(tmp_path / "cache", "zarr", [[0]])
    manifest = load_manifest(tmp_path / "cache")
    write_manifest(tmp_path / "cache", {**manifest, "schema_version": 99})

    with pytest.raises(CacheMismatchError, match="schema_version 99"):
        CacheReader(tmp_path / "cache")


def test_shard_record_json_round_trip():
    record = ShardRecord(
        shard_id=4,
        name="shard_000004",
        num_images=3,
        num_samples=6,
        image_range=(12, 15),
        files={"shards/shard_000004-v0.tar": "ab" * 32},
        nbytes=2048,
    )

    restored = ShardRecord.from_json(json.loads(json.dumps(record.to_json())))

    assert restored == record
    assert restored.image_range == (12, 15)


def test_flatten_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_first_difference_nested_value():
    stored = {"settings": {"teacher": "ViT-B-16", "seed": 0}}
    requested = {"settings": {"teacher": "ViT-B-16", "seed": 1}}

    assert first_difference(stored, requested) == ("settings.seed", 0, 1)
    assert first_difference(stored, stored) is None


def test_first_difference_missing_key():
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == ("b", "<missing>", 2)
    assert first_difference({"a": 1, "b": 2}, {"a": 1}) == ("b", 2, "<missing>")


def test_to_json_value_tuples_and_errors():
    assert to_json_value({"size": (224, 224)}) == {"size": [224, 224]}
    with pytest.raises(ValueError, match="JSON-serializable"):
        to_json_value({"mean": np.zeros(3)})


def test_writer_tuple_settings_resume(tmp_path):
    settings = {**SETTINGS, "crop_scale": (0.4, 1.0)}
    open_writer(tmp_path / "cache", "zarr", settings=settings)

    assert open_writer(tmp_path / "cache", "zarr", settings=settings).finished_shards() == set()


def test_initial_manifest_contents(tmp_path):
    open_writer(tmp_path / "cache", "wds", "zstd")
    manifest = load_manifest(tmp_path / "cache")

    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["format"] == "wds"
    assert manifest["complete"] is False
    assert manifest["compressor"] == "zstd"
    assert manifest["num_views"] == NUM_VIEWS
    assert manifest["codec_parts"]["codes"] == {"shape": [4, 8], "dtype": "int8"}
    assert manifest["settings"] == SETTINGS
    assert "created" in manifest


def test_final_manifest_contents(tmp_path):
    writer = open_writer(tmp_path / "cache", "zarr")
    created = load_manifest(tmp_path / "cache")["created"]
    shards = [([0, 1, 2], (0, 3)), ([4], (3, 6))]

    for shard_id, (images, image_range) in enumerate(shards):
        writer.write_shard(shard_id, make_shard(images, seed=shard_id), image_range, len(images))
    extra = {"skipped": [{"path": "bad.jpg", "reason": "truncated"}], "fidelity": {"cos_mean": 0.998}}
    returned = writer.finalize(extra)
    manifest = load_manifest(tmp_path / "cache")

    assert returned == manifest
    assert manifest["complete"] is True
    assert manifest["created"] == created
    assert manifest["num_shards"] == 2
    assert manifest["num_images"] == 4
    assert manifest["num_samples"] == 4 * NUM_VIEWS
    assert manifest["skipped"] == extra["skipped"]
    assert manifest["fidelity"] == extra["fidelity"]
    assert manifest["codec_state"] is None
    assert manifest["shards"][1]["image_range"] == [3, 6]
    assert all(len(digest) == 64 for digest in manifest["shards"][0]["files"].values())
    assert manifest["shards"][0]["nbytes"] == sum(
        (tmp_path / "cache" / path).stat().st_size for path in manifest["shards"][0]["files"]
    )


def test_finalize_rejects_reserved_keys(tmp_path):
    writer = open_writer(tmp_path / "cache", "zarr")

    with pytest.raises(ValueError, match=r"\['num_samples', 'settings'\]"):
        writer.finalize({"settings": {}, "num_samples": 3, "fidelity": {}})
