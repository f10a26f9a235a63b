"""Target codecs: lossy compression of per-patch teacher targets for the cache, with fidelity.

Build a codec with build_codec(name), fit it on a calibration slice when needs_fit is set, store
state() and encode() parts in the cache, then load_state() and decode() in stage two.
"""

from pipeline.codecs.base import (
    CodecNotFittedError,
    NonFiniteTargetError,
    PartSpecs,
    TargetCodec,
    TargetRangeError,
)
from pipeline.codecs.fidelity import fidelity_report
from pipeline.codecs.floating import BFloat16Codec, Float16Codec, Float32Codec
from pipeline.codecs.int8 import Int8ChannelCodec, Int8TokenCodec
from pipeline.codecs.lossless import (
    DEFAULT_ZSTD_LEVEL,
    compress,
    decompress,
    encoded_nbytes,
    zarr_compressors,
)
from pipeline.codecs.pca import PCACodec
from pipeline.codecs.registry import CODEC_NAMES, build_codec

__all__ = [
    "BFloat16Codec",
    "CODEC_NAMES",
    "CodecNotFittedError",
    "DEFAULT_ZSTD_LEVEL",
    "Float16Codec",
    "Float32Codec",
    "Int8ChannelCodec",
    "Int8TokenCodec",
    "NonFiniteTargetError",
    "PCACodec",
    "PartSpecs",
    "TargetCodec",
    "TargetRangeError",
    "build_codec",
    "compress",
    "decompress",
    "encoded_nbytes",
    "fidelity_report",
    "zarr_compressors",
]
