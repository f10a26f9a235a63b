"""Full integrity check of a cache: files present, sha256, decodable shards, per-sample crc32."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache.checksum import mismatched_samples, sha256_file
from pipeline.cache.manifest import ShardRecord
from pipeline.cache.reader import CacheReader
from pipeline.errors import CorruptCacheError

logger = logging.getLogger(__name__)

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


@dataclass
class ShardProblem:
    """A damaged shard: what is wrong, and the (image_index, view) of each damaged sample found."""

    shard_id: int
    name: str
    errors: list[str] = field(default_factory=list)
    bad_samples: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Outcome of ``verify_cache``. ``ok`` is True when no shard and no codec file is damaged."""

    root: Path
    num_shards: int
    num_samples: int
    bad_shards: list[ShardProblem]
    codec_errors: list[str]

    @property
    def ok(self) -> bool:
        return not self.bad_shards and not self.codec_errors

    def summary(self) -> str:
        """Return a human-readable multi-line summary."""
        if self.ok:
            return f"cache {self.root} is intact: {self.num_shards} shards, {self.num_samples} samples"
        lines = [f"cache {self.root} is damaged: {len(self.bad_shards)} of {self.num_shards} shards"]
        lines += [f"  codec state: {error}" for error in self.codec_errors]
        for problem in self.bad_shards:
            lines += [f"  {problem.name}: {error}" for error in problem.errors]
            if problem.bad_samples:
                lines.append(f"  {problem.name}: damaged samples (image_index, view): {problem.bad_samples}")
        return "\n".join(lines)


def verify_cache(root: Path) -> VerifyReport:
    """Check every shard and the codec state of the cache at ``root`` and report what is damaged.

    Per shard: every recorded file exists and matches its sha256, each view slice decodes into
    the recorded number of samples, each JPEG has its start and end markers, and each sample
    matches its stored crc32. Raises UsageError when ``root`` is not a finished cache.
    """
    reader = CacheReader(root)
    bad_shards = []
    for record in reader.shards:
        problem = _verify_shard(reader, record)
        if problem.errors or problem.bad_samples:
            bad_shards.append(problem)
            logger.warning("cache shard %s is damaged: %s", record.name, "; ".join(problem.errors))

    return VerifyReport(
        root=Path(root),
        num_shards=len(reader.shards),
        num_samples=reader.num_samples(),
        bad_shards=bad_shards,
        codec_errors=_verify_codec(reader),
    )


def _verify_files(root: Path, files: dict[str, str]) -> list[str]:
    errors = []
    for path, digest in files.items():
        if not (root / path).is_file():
            errors.append(f"file {path} is missing")
        elif sha256_file(root / path) != digest:
            errors.append(f"file {path} does not match its sha256")
    return errors


def _verify_shard(reader: CacheReader, record: ShardRecord) -> ShardProblem:
    problem = ShardProblem(shard_id=record.shard_id, name=record.name)
    problem.errors += _verify_files(reader.root, record.files)

    for view in range(reader.num_views):
        try:
            data, crc32 = reader.decode_shard(record, view)
        except CorruptCacheError as error:
            problem.errors.append(f"view {view} does not decode: {error}")
            continue

        problem.bad_samples += mismatched_samples(data, crc32)
        broken = [
            (int(data.image_index[i]), view)
            for i, jpeg in enumerate(data.jpeg)
            if not (jpeg.startswith(_JPEG_START) and jpeg.endswith(_JPEG_END))
        ]
        if broken:
            problem.errors.append(f"view {view} has {len(broken)} JPEGs without start/end markers: {broken[:5]}")
    return problem


def _verify_codec(reader: CacheReader) -> list[str]:
    codec_record = reader.manifest.get("codec_state")
    if not codec_record:
        return []
    errors = _verify_files(reader.root, codec_record["files"])
    if errors:
        return errors
    try:
        reader.codec_state()
    except CorruptCacheError as error:
        return [str(error)]
    return []
