"""Checksums of the cache: sha256 per file (in the manifest) and crc32 per sample (in the shard).

The sha256 list catches any changed, truncated or missing file. The per-sample crc32 then
locates which samples of a damaged shard changed.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from pipeline.cache.shard import ShardData


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_tree(folder: Path, prefix: str) -> dict[str, str]:
    """Return ``{prefix/relative path: sha256}`` for every file under ``folder``, sorted by path."""
    folder = Path(folder)
    files = {}
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            path = Path(dirpath) / filename
            relative = path.relative_to(folder).as_posix()
            files[f"{prefix}/{relative}"] = sha256_file(path)
    return dict(sorted(files.items()))


def sample_crc32(jpeg: bytes, params: np.ndarray, target_rows: list[np.ndarray]) -> int:
    """Return the crc32 of one sample: its JPEG bytes, then its params, then each target part.

    ``target_rows`` are the sample's codec parts in sorted part-name order.
    """
    crc = zlib.crc32(jpeg)
    crc = zlib.crc32(np.ascontiguousarray(params, dtype=np.float64).tobytes(), crc)
    for row in target_rows:
        crc = zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)
    return crc


def shard_crc32(data: ShardData) -> np.ndarray:
    """Return the per-sample crc32, uint32 [N], of a shard's JPEG, params and target bytes."""
    names = sorted(data.targets)
    crcs = np.empty(len(data), dtype=np.uint32)
    for i in range(len(data)):
        rows = [data.targets[name][i] for name in names]
        crcs[i] = sample_crc32(data.jpeg[i], data.params[i], rows)
    return crcs


def mismatched_samples(data: ShardData, stored_crc32: np.ndarray) -> list[tuple[int, int]]:
    """Return (image_index, view_index) of each sample whose bytes no longer match its stored crc32."""
    bad = np.flatnonzero(shard_crc32(data) != np.asarray(stored_crc32, dtype=np.uint32))
    return [(int(data.image_index[i]), int(data.view_index[i])) for i in bad]
