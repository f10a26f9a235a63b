"""The target cache that stage one writes and stage two reads.

A cache is a folder::

    CACHE/
      manifest.json            the JSON manifest, written atomically; zarr caches mirror it in the
                               root zarr.json attributes under "maskdistill"
      zarr.json                zarr v3 root group (format zarr)
      codec/                   zarr v3 group with the codec state arrays (fitted basis, offsets, ...)
      codec.done.json          sha256 of every codec state file, gathered into the manifest
      shards/shard_000000/     one zarr v3 group per shard (format zarr), or
      shards/shard_000000-v0.tar   one tar per shard and view (format wds)
      shards/shard_000000.done.json  the shard's record, written once the shard is in place

A shard covers a fixed, consecutive range of source images with all their views. Its samples
are ordered view-major: ``for v in range(K): for image in shard images``. Stage two uses one
view per epoch and so reads one view slice of each shard: one chunk per array for zarr, one tar
for wds. ``zarr_store`` and ``wds_store`` describe the arrays and tar members.

The manifest lists every shard file with its sha256, and each shard stores a crc32 per sample
over its JPEG, params and target bytes, so ``verify_cache`` can name the damaged samples.
"""

from pipeline.cache.manifest import SCHEMA_VERSION, ShardRecord, load_manifest, write_manifest
from pipeline.cache.reader import CacheReader
from pipeline.cache.shard import ShardData, ShardLayout, shard_name
from pipeline.cache.verify import ShardProblem, VerifyReport, verify_cache
from pipeline.cache.writer import CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "CacheReader",
    "CacheWriter",
    "ShardData",
    "ShardLayout",
    "ShardProblem",
    "ShardRecord",
    "VerifyReport",
    "load_manifest",
    "shard_name",
    "verify_cache",
    "write_manifest",
]
