"""The cache manifest (``manifest.json``) and the per-shard records it gathers.

While stage one runs, each finished shard gets its own record ``shards/<name>.done.json``, so
that processes writing different shards never write the same file. ``CacheWriter.finalize`` then
gathers the records into ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json
from pipeline.errors import CacheMismatchError, CorruptCacheError, UsageError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CODEC_RECORD_NAME = "codec.done.json"
FORMATS = ("zarr", "wds")
_MISSING = "<missing>"


@dataclass
class ShardRecord:
    """Manifest entry of one finished shard.

    ``image_range`` is the [start, stop) range of source indices the shard covers (skipped inputs
    leave ``num_images`` below its length), and ``files`` maps every file of the shard, relative
    to the cache root, to its sha256.
    """

    shard_id: int
    name: str
    num_images: int
    num_samples: int
    image_range: tuple[int, int]
    files: dict[str, str]
    nbytes: int

    def to_json(self) -> dict:
        """Return the JSON form of this record."""
        record = asdict(self)
        record["image_range"] = list(self.image_range)
        return record

    @classmethod
    def from_json(cls, record: dict) -> ShardRecord:
        """Build a record from its JSON form."""
        start, stop = record["image_range"]
        return cls(
            shard_id=int(record["shard_id"]),
            name=str(record["name"]),
            num_images=int(record["num_images"]),
            num_samples=int(record["num_samples"]),
            image_range=(int(start), int(stop)),
            files={str(path): str(digest) for path, digest in record["files"].items()},
            nbytes=int(record["nbytes"]),
        )


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST_NAME


def done_record_path(root: Path, name: str) -> Path:
    """Return the path of a shard's finished record, e.g. ``shards/shard_000003.done.json``."""
    return Path(root) / "shards" / f"{name}.done.json"


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` in ``root`` atomically."""
    atomic_write_json(manifest_path(root), manifest)


def read_json(path: Path) -> Any:
    """Read a JSON file of the cache, raising CorruptCacheError with the file name if it does not parse."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorruptCacheError(f"{path} is not UTF-8 text ({error}). Write the cache again") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptCacheError(f"{path} is not valid JSON ({error}). Write the cache again") from error


def load_manifest(root: Path) -> dict:
    """Read and check ``manifest.json`` of the cache folder ``root``.

    Raises UsageError when ``root`` is not a cache, CacheMismatchError for a schema version this
    code does not read, and CorruptCacheError when the file does not parse.
    """
    path = manifest_path(root)
    if not Path(root).is_dir():
        raise UsageError(f"cache folder {root} not found: pass the folder that cache-targets wrote")
    if not path.is_file():
        raise UsageError(f"{path} not found: {root} is not a maskdistill cache (run cache-targets to write one)")

    manifest = read_json(path)
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise CorruptCacheError(f"{path} has no schema_version: it is not a maskdistill manifest")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CacheMismatchError(
            f"{path} has schema_version {manifest['schema_version']!r}, but this maskdistill reads "
            f"version {SCHEMA_VERSION}: write the cache again with this version"
        )
    if manifest.get("format") not in FORMATS:
        raise CorruptCacheError(f"{path} has format {manifest.get('format')!r}, expected one of {list(FORMATS)}")
    return manifest


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys: {"a": {"b": 1}} -> {"a.b": 1}. Lists stay values."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def first_difference(stored: dict, requested: dict) -> tuple[str, Any, Any] | None:
    """Return (dotted key, stored value, requested value) of the first differing entry, else None.

    Keys are compared in the requested order, then the stored-only keys. A key absent on one side
    shows as "<missing>".
    """
    stored_flat = flatten(stored)
    requested_flat = flatten(requested)
    keys = list(requested_flat) + [key for key in stored_flat if key not in requested_flat]
    for key in keys:
        old = stored_flat.get(key, _MISSING)
        new = requested_flat.get(key, _MISSING)
        if old != new:
            return key, old, new
    return None


def check_same_content(path: Path, stored: dict, requested: dict) -> None:
    """Raise CacheMismatchError naming the first entry where an existing cache differs from a request."""
    difference = first_difference(stored, requested)
    if difference is None:
        return
    key, old, new = difference
    raise CacheMismatchError(
        f"the cache at {path} was written with {key} = {json.dumps(old)}, but this run has "
        f"{key} = {json.dumps(new)}: use another cache folder, or rerun with the cache's settings to resume it"
    )


def to_json_value(value: Any) -> Any:
    """Return ``value`` as it reads back from JSON (tuples become lists), or raise ValueError."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as error:
        raise ValueError(f"cache settings and manifest entries must be JSON-serializable: {error}") from error
