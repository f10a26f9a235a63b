"""Stage-two side of the cache: read the manifest, then whole shards or one view slice of a shard.

With ``check=True`` (the default) every file a read needs is compared with its sha256 in the
manifest the first time this process reads it. Each DataLoader worker is its own process, so
each worker hashes the files it reads once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.cache.checksum import mismatched_samples, sha256_file
from pipeline.cache.manifest import ShardRecord, done_record_path, load_manifest
from pipeline.cache.shard import ShardData, ShardLayout, concat_shard_data
from pipeline.cache.wds_store import read_wds_view, tar_name
from pipeline.cache.zarr_store import jpeg_array_name, read_codec_group, read_zarr_shard
from pipeline.errors import CorruptCacheError, UsageError

logger = logging.getLogger(__name__)

# Files whose sha256 matched in this process, keyed by (path, sha256, size, mtime_ns) so that a
# file replaced on disk is hashed again.
_VERIFIED: set[tuple[str, str, int, int]] = set()


class CacheReader:
    """Read a finished cache written by ``CacheWriter``.

    Raises UsageError naming the path when ``root`` is not a finished cache, and
    CacheMismatchError for a manifest schema version this code does not read. With
    ``verify=True`` the sha256 of every shard file is checked up front.
    """

    def __init__(self, root: Path, *, verify: bool = False) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if not self.manifest.get("complete"):
            raise UsageError(
                f"cache {self.root} is incomplete because stage one did not finish: "
                "rerun cache-targets with the same settings to resume it"
            )
        try:
            self.fmt: str = self.manifest["format"]
            self.layout = ShardLayout.from_description(self.manifest)
            self.shards = [ShardRecord.from_json(record) for record in self.manifest["shards"]]
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCacheError(f"{self.root / 'manifest.json'} is malformed ({error!r}): write the cache again") from error

        self.num_views = self.layout.num_views
        self._by_id = {record.shard_id: record for record in self.shards}
        if verify:
            self.verify_files()

    def num_samples(self, view: int | None = None) -> int:
        """Return the sample count of the whole cache, or of one view (one sample per image)."""
        if view is None:
            return sum(record.num_samples for record in self.shards)
        self._check_view(view)
        return sum(record.num_images for record in self.shards)

    def record(self, shard_id: int) -> ShardRecord:
        """Return the manifest record of ``shard_id``."""
        if shard_id not in self._by_id:
            raise ValueError(f"cache {self.root} has no shard {shard_id}: pass a shard_id from reader.shards")
        return self._by_id[shard_id]

    def read_shard(self, shard_id: int, view: int | None = None, *, check: bool = True) -> ShardData:
        """Read a whole shard [K * n samples, view-major] or one view slice of it [n samples].

        Each array is read chunk by chunk, never item by item. With ``check`` the files are
        compared with their sha256 first. Raises CorruptCacheError naming the shard, and the
        damaged samples when their crc32 locates them.
        """
        record = self.record(shard_id)
        if view is not None:
            self._check_view(view)
        files = self.shard_files(record, view)

        missing = [path for path in files if not (self.root / path).is_file()]
        if missing:
            raise CorruptCacheError(self._damage_message(record, f"file {missing[0]} is missing"))
        if check:
            self._check_files(record, files)

        data, _ = self.decode_shard(record, view)
        return data

    def decode_shard(self, record: ShardRecord, view: int | None) -> tuple[ShardData, np.ndarray]:
        """Read a shard or one view without comparing sha256, and return the samples and their stored crc32 [N]."""
        if self.fmt == "zarr":
            folder = self.root / "shards" / record.name
            return read_zarr_shard(folder, record.name, view, record.num_images, self.layout)

        views = range(self.num_views) if view is None else [view]
        pieces = []
        for v in views:
            path = self.root / "shards" / tar_name(record.name, v)
            try:
                tar_bytes = path.read_bytes()
            except OSError as error:
                raise CorruptCacheError(f"cache shard {record.name} view {v}: cannot read {path} ({error})") from error
            pieces.append(read_wds_view(tar_bytes, record.name, v, record.num_images, self.layout))
        data = concat_shard_data([piece for piece, _ in pieces])
        return data, np.concatenate([crc for _, crc in pieces])

    def shard_files(self, record: ShardRecord, view: int | None = None) -> list[str]:
        """Return the recorded files (relative to the cache root) that reading ``view`` needs."""
        if view is None:
            return list(record.files)
        if self.fmt == "wds":
            return [f"shards/{tar_name(record.name, view)}"]

        prefix = f"shards/{record.name}/"
        needed = []
        for path in record.files:
            inner = path.removeprefix(prefix)
            if inner.endswith("zarr.json"):
                needed.append(path)
                continue
            array, _, coords = inner.partition("/c/")
            if array.startswith("jpeg_v"):
                if array == jpeg_array_name(view):
                    needed.append(path)
            elif coords.split("/")[0] == str(view):
                needed.append(path)
        return needed

    def _check_files(self, record: ShardRecord, files: list[str]) -> None:
        for path in files:
            if not _sha256_matches(self.root / path, record.files[path]):
                raise CorruptCacheError(self._damage_message(record, f"file {path} does not match its sha256"))

    def _damage_message(self, record: ShardRecord, problem: str) -> str:
        """Describe a damaged shard, listing the damaged samples when the per-sample crc32 finds them."""
        located = ""
        try:
            data, crc32 = self.decode_shard(record, None)
            bad = mismatched_samples(data, crc32)
            if bad:
                located = f"; damaged samples (image_index, view): {bad[:5]}" + (" ..." if len(bad) > 5 else "")
        except (CorruptCacheError, OSError):
            pass

        done = done_record_path(self.root, record.name).relative_to(self.root)
        return (
            f"cache shard {record.name} in {self.root} is damaged: {problem}{located}. "
            f"Delete {done} and rerun cache-targets with the same settings to write it again"
        )

    def verify_files(self) -> None:
        """Check the sha256 of every shard file and raise CorruptCacheError listing the damaged shards."""
        damaged = []
        for record in self.shards:
            for path, digest in record.files.items():
                if not (self.root / path).is_file() or not _sha256_matches(self.root / path, digest):
                    damaged.append(f"{record.name} ({path})")
                    break
        if damaged:
            raise CorruptCacheError(
                f"cache {self.root} has {len(damaged)} damaged shards: {damaged[:10]}. "
                "Run verify_cache on it to list the damaged samples"
            )

    def codec_state(self) -> dict[str, np.ndarray]:
        """Return the fitted codec state arrays, or {} when the codec needs no state."""
        codec_record = self.manifest.get("codec_state")
        if not codec_record:
            return {}
        for path, digest in codec_record["files"].items():
            if not (self.root / path).is_file() or not _sha256_matches(self.root / path, digest):
                raise CorruptCacheError(
                    f"cache codec state file {self.root / path} is missing or does not match its sha256: "
                    "the cache cannot be decoded, write it again"
                )
        return read_codec_group(self.root / "codec")

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.num_views:
            raise ValueError(f"view {view} is out of range: cache {self.root} has {self.num_views} views")


def _sha256_matches(path: Path, digest: str) -> bool:
    """Compare a file with its recorded sha256.

    A match is remembered for this process, so the file is hashed again only after its size or
    mtime changes.
    """
    stat = path.stat()
    key = (str(path.resolve()), digest, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    if sha256_file(path) != digest:
        return False
    _VERIFIED.add(key)
    return True
