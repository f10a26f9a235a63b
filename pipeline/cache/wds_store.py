"""Webdataset shards: one tar per (shard, view), ``shards/shard_000000-v0.tar``.

Each sample of a tar has the key ``f"{image_index:09d}_v{view:03d}"``. Webdataset splits a
member name at the first dot of its base name, so keys contain no dot and the rest is the field:

    <key>.jpg             student view, JPEG bytes
    <key>.params.npy      float64 [P] view parameters
    <key>.meta.json       {"image_index", "view_index", "label", "source", "crc32"}
    <key>.<part>.npy      one per codec part, [*shape] (``.npy.zst`` when the cache uses zstd)

Tars are written with a fixed member mtime, so rewriting a shard with the same content gives
the same bytes and the same sha256.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import NamedTuple

import numcodecs
import numpy as np
import webdataset

from pipeline.cache.shard import ShardData, ShardLayout, check_read
from pipeline.errors import CorruptCacheError

_MTIME = 0.0
_META_KEYS = ("image_index", "view_index", "label", "source", "crc32")


def tar_name(name: str, view: int) -> str:
    """Return the file name of a shard's view tar, e.g. ``shard_000003-v1.tar``."""
    return f"{name}-v{view}.tar"


def sample_key(image_index: int, view: int) -> str:
    return f"{image_index:09d}_v{view:03d}"


def _npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()


def _part_suffix(layout: ShardLayout) -> str:
    return "npy" if layout.zstd_level() is None else "npy.zst"


def write_wds_shard(
    folder: Path, name: str, data: ShardData, crc32: np.ndarray, num_images: int, layout: ShardLayout
) -> list[Path]:
    """Write one tar per view of a whole shard into ``folder`` and return their paths in view order."""
    level = layout.zstd_level()
    zstd = None if level is None else numcodecs.Zstd(level=level)
    suffix = _part_suffix(layout)

    paths = []
    for view in range(layout.num_views):
        path = Path(folder) / tar_name(name, view)
        with open(path, "wb") as stream:
            writer = webdataset.TarWriter(stream, encoder=False, mtime=_MTIME)
            for i in range(view * num_images, (view + 1) * num_images):
                writer.write(_sample(data, crc32, i, suffix, zstd))
            writer.close()
        paths.append(path)
    return paths


def _sample(data: ShardData, crc32: np.ndarray, i: int, suffix: str, zstd) -> dict:
    meta = {
        "image_index": int(data.image_index[i]),
        "view_index": int(data.view_index[i]),
        "label": int(data.label[i]),
        "source": data.source[i],
        "crc32": int(crc32[i]),
    }
    sample = {
        "__key__": sample_key(meta["image_index"], meta["view_index"]),
        "jpg": bytes(data.jpeg[i]),
        "params.npy": _npy_bytes(np.asarray(data.params[i], dtype=np.float64)),
        "meta.json": json.dumps(meta).encode("utf-8"),
    }
    for part, values in data.targets.items():
        encoded = _npy_bytes(values[i])
        sample[f"{part}.{suffix}"] = encoded if zstd is None else zstd.encode(encoded)
    return sample


def read_wds_view(
    tar_bytes: bytes, name: str, view: int, num_images: int, layout: ShardLayout
) -> tuple[ShardData, np.ndarray]:
    """Decode one view tar of a shard into its samples and their stored crc32, uint32 [N].

    Raises CorruptCacheError naming the shard (and the sample key when known) for a truncated or
    damaged tar, a missing field or a sample count that differs from the manifest.
    """
    label = f"cache shard {name} view {view}"
    try:
        members = _group_members(tar_bytes)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise CorruptCacheError(f"{label}: tar file is damaged or truncated ({error})") from error

    if len(members) != num_images:
        raise CorruptCacheError(f"{label}: tar has {len(members)} samples where the manifest records {num_images}")

    samples = [_decode_sample(key, fields, label, layout) for key, fields in members]
    try:
        data = _stack(samples, layout)
    except ValueError as error:
        raise CorruptCacheError(f"{label}: samples disagree in shape ({error})") from error
    check_read(data, name, [view], num_images, layout)
    return data, np.array([sample.meta["crc32"] for sample in samples], dtype=np.uint32)


def _group_members(tar_bytes: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Return the tar's samples in order as (key, {field: bytes})."""
    members: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field = member.name.rpartition("/")[2].partition(".")
            if not members or members[-1][0] != key:
                members.append((key, {}))
            members[-1][1][field] = tar.extractfile(member).read()
    return members


class _Sample(NamedTuple):
    meta: dict
    params: np.ndarray
    jpeg: bytes
    parts: dict[str, np.ndarray]


def _decode_sample(key: str, fields: dict[str, bytes], label: str, layout: ShardLayout) -> _Sample:
    suffix = _part_suffix(layout)
    needed = ["jpg", "params.npy", "meta.json"] + [f"{part}.{suffix}" for part in layout.parts]
    missing = [field for field in needed if field not in fields]
    if missing:
        raise CorruptCacheError(f"{label}: sample {key} lacks {missing}")

    try:
        meta = _decode_meta(key, fields["meta.json"])
        params = np.load(io.BytesIO(fields["params.npy"]), allow_pickle=False)
        parts = {}
        for part in layout.parts:
            encoded = fields[f"{part}.{suffix}"]
            if layout.zstd_level() is not None:
                encoded = numcodecs.Zstd().decode(encoded)
            parts[part] = np.load(io.BytesIO(bytes(encoded)), allow_pickle=False)
    except (ValueError, KeyError, OSError, RuntimeError, EOFError) as error:
        raise CorruptCacheError(f"{label}: sample {key} does not decode ({error})") from error
    return _Sample(meta, params, fields["jpg"], parts)


def _decode_meta(key: str, raw: bytes) -> dict:
    """Parse a sample's meta.json, raising ValueError unless it is complete and belongs to ``key``."""
    meta = json.loads(raw)
    if not isinstance(meta, dict) or any(field not in meta for field in _META_KEYS):
        raise ValueError(f"meta.json lacks some of {list(_META_KEYS)}")
    if not all(isinstance(meta[field], int) for field in ("image_index", "view_index", "label", "crc32")):
        raise ValueError("meta.json has a non-integer index, label or crc32")
    if key != sample_key(meta["image_index"], meta["view_index"]):
        raise ValueError(f"meta.json describes sample {sample_key(meta['image_index'], meta['view_index'])}")
    return meta


def _stack(samples: list[_Sample], layout: ShardLayout) -> ShardData:
    """Stack decoded samples into arrays, raising ValueError when their shapes disagree."""
    metas = [sample.meta for sample in samples]
    if samples:
        params = np.stack([sample.params for sample in samples])
        targets = {part: np.stack([sample.parts[part] for sample in samples]) for part in layout.parts}
    else:
        params = np.zeros((0, 0), dtype=np.float64)
        targets = {part: np.zeros((0, *shape), dtype=dtype) for part, (shape, dtype) in layout.parts.items()}

    return ShardData(
        image_index=np.array([meta["image_index"] for meta in metas], dtype=np.int64),
        view_index=np.array([meta["view_index"] for meta in metas], dtype=np.int32),
        source=[str(meta["source"]) for meta in metas],
        label=np.array([meta["label"] for meta in metas], dtype=np.int64),
        params=params,
        jpeg=[sample.jpeg for sample in samples],
        targets=targets,
    )
