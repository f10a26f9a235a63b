"""Zarr v3 shards: one group per shard, every per-sample array chunked by view slice.

Arrays of a shard group with ``n`` images and ``K`` views (N = K * n samples, view-major)::

    image_index   int64   [N]           chunks (n,)
    view_index    int32   [N]           chunks (n,)
    label         int64   [N]           chunks (n,)
    crc32         uint32  [N]           chunks (n,)      per-sample crc32 (see checksum.py)
    source        string  [N]           chunks (n,)
    params        float64 [N, P]        chunks (n, P)
    targets/<part>        [N, *shape]   chunks (n, *shape), zstd when the cache has a compressor
    jpeg_offsets  int64   [K, n + 1]    chunks (1, n + 1) byte offsets into jpeg_v<view>
    jpeg_v000 ... uint8   [bytes]       one chunk: the view's JPEGs back to back

Reading one view is therefore one chunk read per array. JPEGs are stored as flat bytes plus
offsets because zarr 3.1's ``variable_length_bytes`` data type has no Zarr v3 specification yet
(zarr warns that its encoding may change), and a flat read is as fast.

Every chunk is written even when it equals the fill value (``write_empty_chunks``), so a missing
chunk file always means damage. Zarr would read such a chunk back as fill values, so the readers
here check that each chunk file they need exists before reading it.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import numcodecs
import numpy as np
import zarr
import zarr.codecs

from pipeline.cache.shard import ShardData, ShardLayout, check_read
from pipeline.codecs.lossless import zstd_frame_content_size
from pipeline.errors import CorruptCacheError

SAMPLE_ARRAYS = {
    "image_index": np.dtype(np.int64),
    "view_index": np.dtype(np.int32),
    "label": np.dtype(np.int64),
    "crc32": np.dtype(np.uint32),
}
_ARRAY_CONFIG = {"write_empty_chunks": True}
_CHUNK_KEYS = {"name": "default", "separator": "/"}
# Zarr errors derive from ValueError; a damaged zstd chunk raises RuntimeError in numcodecs.
_READ_ERRORS = (ValueError, KeyError, IndexError, OSError, RuntimeError)


def jpeg_array_name(view: int) -> str:
    return f"jpeg_v{view:03d}"


def _create(
    group: zarr.Group,
    name: str,
    values: np.ndarray,
    chunk_rows: int,
    compressors: zarr.codecs.ZstdCodec | None = None,
) -> None:
    """Create array ``name`` from ``values`` [rows, ...] with ``chunk_rows`` rows per chunk and write it."""
    chunks = (max(chunk_rows, 1),) + tuple(max(d, 1) for d in values.shape[1:])
    dtype = str if values.dtype == object else values.dtype
    array = group.create_array(
        name,
        shape=values.shape,
        chunks=chunks,
        dtype=dtype,
        compressors=compressors,
        chunk_key_encoding=_CHUNK_KEYS,
        config=_ARRAY_CONFIG,
    )
    if values.size:
        array[...] = values


def write_zarr_shard(folder: Path, data: ShardData, crc32: np.ndarray, num_images: int, layout: ShardLayout) -> None:
    """Write a whole shard (checked by ``layout.check_shard``) as a new zarr group at ``folder``."""
    group = zarr.create_group(store=str(folder), zarr_format=3, overwrite=False)
    group.attrs.update({"num_images": num_images, "num_views": layout.num_views})

    columns = {
        "image_index": data.image_index,
        "view_index": data.view_index,
        "label": data.label,
        "crc32": crc32,
    }
    for name, dtype in SAMPLE_ARRAYS.items():
        _create(group, name, np.asarray(columns[name], dtype=dtype), num_images)
    _create(group, "source", np.array(data.source, dtype=object).reshape(-1), num_images)
    _create(group, "params", np.asarray(data.params, dtype=np.float64), num_images)

    level = layout.zstd_level()
    compressors = None if level is None else zarr.codecs.ZstdCodec(level=level)
    targets = group.create_group("targets")
    for name in sorted(layout.parts):
        _create(targets, name, np.ascontiguousarray(data.targets[name]), num_images, compressors)

    _write_jpegs(group, data.jpeg, num_images, layout.num_views)


def _write_jpegs(group: zarr.Group, jpegs: list[bytes], num_images: int, num_views: int) -> None:
    offsets = np.zeros((num_views, num_images + 1), dtype=np.int64)
    for view in range(num_views):
        view_jpegs = jpegs[view * num_images : (view + 1) * num_images]
        offsets[view, 1:] = np.cumsum([len(jpeg) for jpeg in view_jpegs], dtype=np.int64)
        flat = np.frombuffer(b"".join(view_jpegs), dtype=np.uint8)
        _create(group, jpeg_array_name(view), flat, len(flat))
    _create(group, "jpeg_offsets", offsets, 1)


def read_zarr_shard(
    folder: Path, name: str, view: int | None, num_images: int, layout: ShardLayout
) -> tuple[ShardData, np.ndarray]:
    """Read a whole shard, or one view slice of it, with one chunk read per array.

    Returns the samples and their stored crc32, uint32 [N]. Raises CorruptCacheError naming the
    shard when a chunk file is missing or an array does not decode.
    """
    views = range(layout.num_views) if view is None else [view]
    try:
        group = zarr.open_group(store=str(folder), mode="r", zarr_format=3, use_consolidated=False)
        rows = slice(0, None) if view is None else slice(view * num_images, (view + 1) * num_images)
        columns = {
            key: _read_rows(folder, name, group, key, rows, views, num_images)
            for key in (*SAMPLE_ARRAYS, "source", "params")
        }
        targets = {
            part: _read_target_rows(folder, name, group, f"targets/{part}", rows, views, num_images)
            for part in sorted(layout.parts)
        }
        jpegs = [jpeg for v in views for jpeg in _read_jpegs(folder, name, group, v, num_images)]
    except _READ_ERRORS as error:
        raise CorruptCacheError(f"cache shard {name} ({folder}) cannot be read: {error}") from error

    data = ShardData(
        image_index=columns["image_index"],
        view_index=columns["view_index"],
        source=[str(s) for s in columns["source"]],
        label=columns["label"],
        params=columns["params"],
        jpeg=jpegs,
        targets=targets,
    )
    check_read(data, name, list(views), num_images, layout)
    return data, columns["crc32"]


def _require_chunk(folder: Path, name: str, array: zarr.Array, array_path: str, coords: tuple[int, ...]) -> None:
    """Raise CorruptCacheError when a chunk file is missing, because zarr would return fill values."""
    if 0 in array.shape:
        return
    key = array.metadata.encode_chunk_key(coords)
    if not (folder / array_path / key).is_file():
        raise CorruptCacheError(f"cache shard {name} is missing chunk file {array_path}/{key} in {folder}")


def _read_rows(
    folder: Path, name: str, group: zarr.Group, array_path: str, rows: slice, views: Sequence[int], num_images: int
) -> np.ndarray:
    array = group[array_path]
    if num_images:
        for v in views:
            _require_chunk(folder, name, array, array_path, (v,) + (0,) * (array.ndim - 1))
    return array[rows]


def _read_target_rows(
    folder: Path, name: str, group: zarr.Group, array_path: str, rows: slice, views: Sequence[int], num_images: int
) -> np.ndarray:
    """Read the target rows of `views`, one whole chunk file per view when the codecs allow it.

    Target chunks are the largest reads of a shard (38 MB per 128 fp16 views of 196 x 768). A
    chunk stored as raw bytes, or raw bytes compressed with zstd, is read from its file straight
    into the result. That skips the copies of zarr's asynchronous read path, which took about a
    third of the read time of a 38 MB fp16+zstd chunk on one core (measured with
    `benchmarks.loader`'s `shard_read_per_s` on the 2-core Xeon of docs/benchmarks.md).
    """
    array = group[array_path]
    decompress = _plain_chunk_decoder(array)
    whole_view_chunks = array.chunks == (num_images, *array.shape[1:])
    if decompress is None or not num_images or not whole_view_chunks or array.shape[0] < (max(views) + 1) * num_images:
        return _read_rows(folder, name, group, array_path, rows, views, num_images)

    chunk_shape = (num_images, *array.shape[1:])
    values = np.empty((len(views), *chunk_shape), dtype=array.dtype)
    for i, v in enumerate(views):
        coords = (v,) + (0,) * (array.ndim - 1)
        _require_chunk(folder, name, array, array_path, coords)
        decompress(folder / array_path / array.metadata.encode_chunk_key(coords), values[i].reshape(-1).view(np.uint8))
    return values.reshape(len(views) * num_images, *array.shape[1:])


def _plain_chunk_decoder(array: zarr.Array):
    """Return the chunk reader (chunk file, uint8 output) of an array of native-endian raw bytes.

    The bytes may be zstd compressed. Any other codec chain returns None, and zarr reads it.
    """
    codecs = array.metadata.codecs
    dtype = np.dtype(array.dtype)
    if not isinstance(codecs[0], zarr.codecs.BytesCodec) or dtype.kind not in "biuf":
        return None
    if dtype.itemsize > 1 and codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None

    if len(codecs) == 1:
        return _read_raw_chunk
    if len(codecs) == 2 and isinstance(codecs[1], zarr.codecs.ZstdCodec):
        return _decompress_zstd_chunk
    return None


def _read_raw_chunk(path: Path, out: np.ndarray) -> None:
    with open(path, "rb") as file:
        size = file.readinto(out)
        extra = file.read(1)
    if size != out.size or extra:
        raise ValueError(f"invalid chunk file {path}: contains {size}{'+' if extra else ''} bytes, expected {out.size}")


def _decompress_zstd_chunk(path: Path, out: np.ndarray) -> None:
    with open(path, "rb") as file:
        encoded = _map_file(file)
        try:
            _decode_zstd_exact(path, encoded, out)
        finally:
            if isinstance(encoded, mmap.mmap):
                encoded.close()


def _map_file(file) -> mmap.mmap | bytes:
    """Map an open file read-only, so zstd reads its pages without a copy, or read it where mapping fails.

    Mapping fails for empty files and on file systems without mmap support (some FUSE mounts).
    NOTE: a mapped file that another process truncates during the read raises SIGBUS.
    """
    try:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return file.read()


def _decode_zstd_exact(path: Path, encoded: mmap.mmap | bytes, out: np.ndarray) -> None:
    """Decompress one zstd frame into `out`, raising ValueError unless it fills `out` exactly.

    numcodecs fills only the frame's declared size when `out` is larger, and leaves the rest as it was.
    """
    size = zstd_frame_content_size(encoded)
    decoded = None
    if size is None:
        decoded = numcodecs.Zstd().decode(encoded)
        size = len(decoded)
    if size != out.size:
        raise ValueError(f"invalid chunk file {path}: decompresses to {size} bytes, expected {out.size}")

    if decoded is None:
        numcodecs.Zstd().decode(encoded, out=out)
    else:
        out[:] = np.frombuffer(decoded, dtype=np.uint8)


def _read_jpegs(folder: Path, name: str, group: zarr.Group, view: int, num_images: int) -> list[bytes]:
    offsets_array = group["jpeg_offsets"]
    _require_chunk(folder, name, offsets_array, "jpeg_offsets", (view, 0))
    offsets = offsets_array[view]

    flat_array = group[jpeg_array_name(view)]
    _require_chunk(folder, name, flat_array, jpeg_array_name(view), (0,))
    flat = flat_array[...].tobytes()

    if len(offsets) != num_images + 1 or offsets[0] != 0 or offsets[-1] != len(flat) or (np.diff(offsets) < 0).any():
        raise CorruptCacheError(f"cache shard {name} has invalid JPEG offsets for view {view} in {folder}")
    return [flat[offsets[i] : offsets[i + 1]] for i in range(num_images)]


def write_codec_group(folder: Path, state: dict[str, np.ndarray]) -> None:
    """Write the codec state arrays (fitted basis, offsets, ...) as a new zarr group, one chunk each."""
    group = zarr.create_group(store=str(folder), zarr_format=3, overwrite=False)
    for key, value in state.items():
        value = np.asarray(value)
        array = group.create_array(
            key,
            shape=value.shape,
            chunks=tuple(max(d, 1) for d in value.shape),
            dtype=value.dtype,
            compressors=None,
            chunk_key_encoding=_CHUNK_KEYS,
            config=_ARRAY_CONFIG,
        )
        if value.size:
            array[...] = value


def read_codec_group(folder: Path) -> dict[str, np.ndarray]:
    """Read every array of a codec state group, checking that its chunk files exist."""
    try:
        group = zarr.open_group(store=str(folder), mode="r", zarr_format=3, use_consolidated=False)
        state = {}
        for key, array in group.arrays():
            _require_chunk(folder, "codec", array, key, (0,) * array.ndim)
            state[key] = np.asarray(array[...])
    except _READ_ERRORS as error:
        raise CorruptCacheError(f"cache codec state in {folder} cannot be read: {error}") from error
    return dict(sorted(state.items()))
