"""Codec names, as written in configs, on the command line and in cache manifests."""

import re

from pipeline.codecs.base import TargetCodec
from pipeline.codecs.floating import BFloat16Codec, Float16Codec, Float32Codec
from pipeline.codecs.int8 import Int8ChannelCodec, Int8TokenCodec
from pipeline.codecs.lossless import COMPRESSORS, DEFAULT_ZSTD_LEVEL, check_compression
from pipeline.codecs.pca import PCACodec
from pipeline.errors import UsageError

# "pca-K" stands for pca-64, pca-128 and so on. Any name may end in "+zstd".
CODEC_NAMES = ["fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca-K"]

_FIXED_CODECS: dict[str, type[TargetCodec]] = {
    "fp32": Float32Codec,
    "fp16": Float16Codec,
    "bf16": BFloat16Codec,
    "int8-channel": Int8ChannelCodec,
    "int8-token": Int8TokenCodec,
}
_PCA_NAME = re.compile(r"pca-(\d+)")


def build_codec(name: str, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> TargetCodec:
    """Build an unfitted codec from a name such as "fp16", "pca-64" or "int8-channel+zstd".

    `zstd_level` sets the level of the "+zstd" lossless stage (1-22) and is ignored without it.

    Raises:
        UsageError: an unknown name, an unknown suffix or an invalid level. The message lists
            the valid names.
    """
    base_name, _, compressor = name.strip().partition("+")
    codec = _build_base_codec(base_name, name)

    if compressor:
        if compressor not in COMPRESSORS:
            raise UsageError(_unknown_name_message(name))
        check_compression(compressor, zstd_level)
        codec.compressor = compressor
        codec.compression_level = zstd_level

    return codec


def _build_base_codec(base_name: str, name: str) -> TargetCodec:
    if base_name in _FIXED_CODECS:
        return _FIXED_CODECS[base_name]()

    match = _PCA_NAME.fullmatch(base_name)
    if match:
        return PCACodec(int(match.group(1)))

    raise UsageError(_unknown_name_message(name))


def _unknown_name_message(name: str) -> str:
    return (
        f"unknown target codec {name!r}: use one of {', '.join(CODEC_NAMES)} (K is the number "
        f"of PCA components, e.g. pca-64), optionally with the suffix '+zstd' for lossless "
        f"compression (e.g. int8-channel+zstd)"
    )
