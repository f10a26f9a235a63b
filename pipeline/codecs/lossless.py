"""The lossless stage after a codec: zstd through numcodecs, or native zarr v3 compression."""

from typing import TYPE_CHECKING

import numcodecs
import numpy as np
import zarr

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.codecs.base import TargetCodec

COMPRESSORS = ("zstd",)
DEFAULT_ZSTD_LEVEL = 3
MIN_ZSTD_LEVEL = 1
MAX_ZSTD_LEVEL = 22


def check_compression(compressor: str | None, level: int) -> None:
    """Raise UsageError for an unknown compressor or a zstd level outside 1-22."""
    if compressor is None:
        return

    if compressor not in COMPRESSORS:
        raise UsageError(f"unknown compressor {compressor!r}: use one of {', '.join(COMPRESSORS)}")

    if not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
        raise UsageError(
            f"invalid zstd level {level}: use a level from {MIN_ZSTD_LEVEL} to {MAX_ZSTD_LEVEL}"
        )


def compress(data: bytes, compressor: str | None, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Compress bytes with `compressor`, or return them unchanged when it is None."""
    check_compression(compressor, level)
    if compressor is None:
        return bytes(data)

    return bytes(numcodecs.Zstd(level=level).encode(data))


def decompress(data: bytes, compressor: str | None) -> bytes:
    """Invert compress(). A zstd frame contains what decompression needs, so no level is passed."""
    check_compression(compressor, DEFAULT_ZSTD_LEVEL)
    if compressor is None:
        return bytes(data)

    return bytes(numcodecs.Zstd().decode(data))


ZSTD_MAGIC = 0xFD2FB528


def zstd_frame_content_size(frame: bytes | memoryview) -> int | None:
    """Return the decompressed size that a zstd frame header declares, or None when it has none.

    The header layout is RFC 8878, section 3.1.1.1: magic number, frame header descriptor, an
    optional window descriptor and dictionary id, then the content size field.

    Raises:
        ValueError: `frame` does not start with a zstd frame header.
    """
    header = bytes(frame[:18])
    if len(header) < 5 or int.from_bytes(header[:4], "little") != ZSTD_MAGIC:
        raise ValueError("not a zstd frame")

    descriptor = header[4]
    size_flag, single_segment, dictionary_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    length = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if length == 0:
        return None
    if len(header) < start + length:
        raise ValueError("zstd frame header is truncated")

    size = int.from_bytes(header[start : start + length], "little")
    return size + 256 if length == 2 else size


def zarr_compressors(codec: "TargetCodec") -> tuple[zarr.abc.codec.BytesBytesCodec, ...]:
    """Return the zarr v3 compressors for the codec's lossless stage.

    Pass the result as `compressors=` to zarr.create_array. An empty tuple turns compression off
    there, whereas zarr's default ("auto") would add zstd.
    """
    check_compression(codec.compressor, codec.compression_level)
    if codec.compressor is None:
        return ()

    return (zarr.codecs.ZstdCodec(level=codec.compression_level),)


def encoded_nbytes(
    parts: dict[str, np.ndarray],
    compressor: str | None,
    level: int = DEFAULT_ZSTD_LEVEL,
) -> float:
    """Measure the mean bytes per view that encoded parts take after the lossless stage.

    Each part is compressed as one block over all N views, as a zarr chunk of N views would be,
    then the total is divided by N. Pass parts from a real batch, because zstd gains depend on
    the data.
    """
    num_views = {part.shape[0] for part in parts.values()}
    if len(num_views) != 1:
        raise ValueError(f"parts must share one number of views N, got {sorted(num_views)}")

    total = 0
    for part in parts.values():
        total += len(compress(np.ascontiguousarray(part).tobytes(), compressor, level))

    return total / num_views.pop()
