import json
import pickle
import subprocess
import sys
import textwrap

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.codecs import (
    CODEC_NAMES,
    CodecNotFittedError,
    NonFiniteTargetError,
    TargetRangeError,
    build_codec,
    compress,
    decompress,
    encoded_nbytes,
    fidelity_report,
    zarr_compressors,
)
from pipeline.codecs.lossless import zstd_frame_content_size
from pipeline.errors import CorruptCacheError, UsageError

ALL_CODECS = ["fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca-64"]

# Relative L2 error ||decoded - exact|| / ||exact|| allowed on Gaussian targets [4, 16, 64].
# pca-64 keeps every channel of D=64, so only its int8 coefficients lose precision.
ROUND_TRIP_TOLERANCE = {
    "fp32": 0.0,
    "fp16": 1e-3,
    "bf16": 4e-3,
    "int8-channel": 1e-2,
    "int8-token": 1e-2,
    "pca-64": 1e-2,
}


def _gaussian(shape, seed=0, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _fitted(name: str, calibration: np.ndarray):
    codec = build_codec(name)
    if codec.needs_fit:
        codec.fit(calibration)
    return codec


def _round_trip(codec, targets: np.ndarray) -> np.ndarray:
    return codec.decode(codec.encode(targets))


def _relative_error(decoded: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(decoded - exact) / np.linalg.norm(exact))


# Smallest positive float16, the floor of every per-token scale, and smallest normal float32.
FP16_SMALLEST = 2.0**-24
FP32_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def _max_error_bound(name: str, targets: np.ndarray) -> float:
    """Largest absolute error each codec may make on `targets`, from its storage format.

    int8 codes round to half a step of range / 254. pca-K with K >= rank stores K int8
    coefficients per patch, whose L2 error is at most sqrt(K) half-steps, each at most
    ||patch - mean|| / 254 <= sqrt(D) * 2 max|x| / 254, or half the float16 scale floor.
    """
    max_abs = float(np.abs(targets).max())
    dim = targets.shape[-1]
    bounds = {
        "fp32": 0.0,
        "fp16": 2.0**-11 * max_abs + FP16_SMALLEST / 2,
        "bf16": 2.0**-8 * max_abs,
        "int8-channel": max_abs / 254 * (1 + 1e-5) + FP32_SMALLEST_NORMAL,
        "int8-token": max_abs / 254 * (1 + 2.0**-10) + FP16_SMALLEST / 2,
    }
    if name.startswith("pca-"):
        num_components = int(name.split("-")[1])
        quantization = np.sqrt(num_components * dim) * 2 * max_abs / 254
        scale_floor = np.sqrt(num_components) * FP16_SMALLEST / 2
        return quantization + scale_floor + 1e-5 * max_abs
    return bounds[name]


# Round trips


@pytest.mark.parametrize("name", ALL_CODECS)
def test_round_trip_gaussian_targets(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    decoded = _round_trip(codec, targets)

    assert decoded.shape == targets.shape
    assert decoded.dtype == np.float32
    assert _relative_error(decoded, targets) <= ROUND_TRIP_TOLERANCE[name]


@pytest.mark.parametrize("name", ALL_CODECS)
def test_round_trip_unseen_targets(name):
    calibration = _gaussian((8, 16, 64), seed=1)
    # Clipped to the calibration range, beyond which int8-channel clips by design.
    low, high = calibration.min(axis=(0, 1)), calibration.max(axis=(0, 1))
    targets = np.clip(_gaussian((3, 16, 64), seed=2), low, high)
    decoded = _round_trip(_fitted(name, calibration), targets)

    assert _relative_error(decoded, targets) <= ROUND_TRIP_TOLERANCE[name]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 7), (3, 1, 13), (2, 3, 1), (2, 4, 33)])
@pytest.mark.parametrize("base_name", ["fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca"])
def test_round_trip_odd_shapes(base_name, shape):
    num_views, num_patches, dim = shape
    name = f"pca-{min(dim, num_views * num_patches)}" if base_name == "pca" else base_name
    targets = _gaussian(shape, seed=3) + 0.5
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    decoded = codec.decode(parts)

    assert decoded.shape == shape
    assert np.abs(decoded - targets).max() <= _max_error_bound(name, targets)
    for part in parts.values():
        assert part.shape[0] == num_views


@pytest.mark.parametrize("name", ALL_CODECS)
def test_part_specs_match_encoded_parts(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    specs = codec.part_specs(num_patches=16, dim=64)

    assert set(parts) == set(specs)
    for part_name, (shape, dtype) in specs.items():
        assert parts[part_name].shape == (4, *shape), part_name
        assert parts[part_name].dtype == dtype, part_name


@pytest.mark.parametrize("name", ALL_CODECS)
def test_decode_one_view_slice(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    one_view = {part_name: part[2:3] for part_name, part in parts.items()}

    assert np.array_equal(codec.decode(one_view), codec.decode(parts)[2:3])


# Per-codec precision


def test_fp16_relative_error_bound():
    targets = _gaussian((2, 8, 64), scale=100)
    decoded = _round_trip(build_codec("fp16"), targets)

    assert np.all(np.abs(decoded - targets) <= 2.0**-11 * np.abs(targets) + 2.0**-25)


def test_fp16_out_of_range_raises():
    targets = _gaussian((3, 4, 8))
    targets[1, 2, 3] = 7e4

    with pytest.raises(TargetRangeError) as raised:
        build_codec("fp16").encode(targets)

    assert "65504" in str(raised.value)
    assert "sample 1" in str(raised.value)
    assert "bf16" in str(raised.value)


def test_bf16_matches_torch_rounding():
    targets = _gaussian((2, 8, 64), scale=1e3)
    targets[0, 0, :3] = [1e-40, -3e38, 0.0]
    parts = build_codec("bf16").encode(targets)
    expected = torch.from_numpy(targets).to(torch.bfloat16).view(torch.int16).numpy()

    assert parts["values"].dtype == np.uint16
    assert np.array_equal(parts["values"].view(np.int16), expected)


def test_bf16_ties_round_to_even():
    halfway_below_even = np.array([0x3F808000], dtype=np.uint32).view(np.float32)
    halfway_below_odd = np.array([0x3F818000], dtype=np.uint32).view(np.float32)
    targets = np.concatenate([halfway_below_even, halfway_below_odd]).reshape(1, 1, 2)
    parts = build_codec("bf16").encode(targets)

    assert parts["values"][0, 0, 0] == 0x3F80
    assert parts["values"][0, 0, 1] == 0x3F82


def test_bf16_relative_error_bound():
    targets = _gaussian((2, 8, 64), scale=1e20)
    decoded = _round_trip(build_codec("bf16"), targets)

    assert np.all(np.abs(decoded - targets) <= 2.0**-8 * np.abs(targets))


def test_bf16_overflow_raises():
    targets = np.full((2, 1, 2), 1.0, dtype=np.float32)
    targets[1, 0, 1] = np.finfo(np.float32).max

    with pytest.raises(TargetRangeError, match="sample 1"):
        build_codec("bf16").encode(targets)


def test_int8_channel_error_within_half_step():
    targets = _gaussian((4, 16, 64)) * np.linspace(0.1, 10, 64, dtype=np.float32)
    codec = _fitted("int8-channel", targets)
    decoded = _round_trip(codec, targets)

    assert np.all(np.abs(decoded - targets) <= codec.scale / 2 * (1 + 1e-5) + 1e-6)


def test_int8_token_scale_per_patch():
    magnitudes = 10.0 ** np.arange(-3, 4, dtype=np.float32)
    targets = _gaussian((2, 7, 64)) * magnitudes[None, :, None]
    parts = build_codec("int8-token").encode(targets)
    decoded = build_codec("int8-token").decode(parts)
    absmax = np.abs(targets).max(axis=-1)
    token_error = np.abs(decoded - targets).max(axis=-1)

    assert parts["scales"].shape == (2, 7)
    assert parts["scales"].dtype == np.float16
    scales = parts["scales"].astype(np.float32)
    assert np.all(scales >= absmax / 127)
    assert np.all(scales <= absmax / 127 * (1 + 2.0**-10) + 2.0**-24)
    assert np.all(token_error <= scales / 2 * (1 + 1e-6))


def test_int8_token_tiny_scale_no_clipping():
    targets = _gaussian((1, 3, 16)) * np.float32(1e-6)
    decoded = _round_trip(build_codec("int8-token"), targets)

    assert np.abs(decoded - targets).max() <= FP16_SMALLEST / 2


def test_int8_token_scale_overflow_raises():
    targets = _gaussian((2, 2, 4))
    targets[1, 0, 0] = 1e7

    with pytest.raises(TargetRangeError, match="sample 1"):
        build_codec("int8-token").encode(targets)


def test_int8_token_zero_patch_decodes_zero():
    targets = _gaussian((1, 3, 8))
    targets[0, 1] = 0.0
    parts = build_codec("int8-token").encode(targets)

    assert parts["scales"][0, 1] == 0
    assert np.array_equal(build_codec("int8-token").decode(parts)[0, 1], np.zeros(8))


# Outlier channels


def _outlier_targets() -> tuple[np.ndarray, np.ndarray]:
    """Gaussian targets [8, 16, 64] whose first 4 channels are 100x larger than the rest."""
    targets = _gaussian((8, 16, 64), seed=4)
    targets[..., :4] *= 100
    ordinary = np.arange(4, 64)
    return targets, ordinary


def _channel_relative_error(decoded: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """RMS error over RMS value per channel [D]."""
    error = np.sqrt(np.mean(np.square(decoded - targets), axis=(0, 1)))
    return error / np.sqrt(np.mean(np.square(targets), axis=(0, 1)))


def test_int8_channel_outliers_keep_ordinary_channels():
    targets, ordinary = _outlier_targets()
    decoded = _round_trip(_fitted("int8-channel", targets), targets)
    channel_error = _channel_relative_error(decoded, targets)

    assert channel_error[ordinary].max() < 0.02
    assert channel_error[:4].max() < 0.02


def test_per_tensor_int8_loses_ordinary_channels():
    targets, ordinary = _outlier_targets()
    scale = np.abs(targets).max() / 127
    decoded = np.clip(np.rint(targets / scale), -127, 127) * scale
    channel_error = _channel_relative_error(decoded, targets)

    assert channel_error[ordinary].min() > 0.5


def test_int8_channel_counts_clipped_values():
    calibration = np.linspace(-1, 1, 2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    codec = _fitted("int8-channel", calibration)
    low = calibration.reshape(-1, 3).min(axis=0)
    high = calibration.reshape(-1, 3).max(axis=0)
    targets = calibration.copy()
    targets[0, 0, :] = high + 2 * codec.scale
    targets[1, 3, :2] = -5.0
    decoded = _round_trip(codec, targets)
    description = codec.describe()["parameters"]

    assert codec.num_clipped == 5
    assert description["num_clipped"] == 5
    assert description["num_encoded"] == targets.size
    assert description["clipped_fraction"] == pytest.approx(5 / targets.size)
    assert np.allclose(decoded[0, 0], high, atol=1e-6)
    assert np.allclose(decoded[1, 3, :2], low[:2], atol=1e-6)


def test_int8_channel_range_ends_not_clipped():
    calibration = _gaussian((2, 8, 16))
    codec = _fitted("int8-channel", calibration)
    codec.encode(calibration)

    assert codec.num_clipped == 0
    assert codec.describe()["parameters"]["clipped_fraction"] == 0.0


def test_int8_channel_subnormal_scale(recwarn):
    targets = np.zeros((1, 4, 2), dtype=np.float32)
    targets[0, :, 1] = [0.0, 1e-39, 5e-40, 0.0]
    codec = _fitted("int8-channel", targets)
    decoded = _round_trip(codec, targets)

    assert 0 < codec.scale[1] < FP32_SMALLEST_NORMAL
    assert np.all(np.isfinite(decoded))
    assert np.abs(decoded - targets).max() <= 1e-39 / 254 + 1e-44
    assert len(recwarn) == 0


def test_int8_channel_constant_channel():
    targets = _gaussian((2, 4, 3))
    targets[..., 1] = 2.5
    codec = _fitted("int8-channel", targets)
    decoded = _round_trip(codec, targets)

    assert codec.scale[1] == 0
    assert np.all(decoded[..., 1] == 2.5)
    assert codec.num_clipped == 0


# PCA


def _low_rank_targets(rank: int, shape=(4, 32, 48), seed=5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    num_views, num_patches, dim = shape
    coefficients = rng.normal(size=(num_views * num_patches, rank)) * np.linspace(5, 1, rank)
    basis = rng.normal(size=(rank, dim))
    mean = rng.normal(size=dim) * 3
    return (coefficients @ basis + mean).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("name", ["pca-6", "pca-8"])
def test_pca_low_rank_basis_exact(name):
    targets = _low_rank_targets(rank=6)
    codec = _fitted(name, targets)
    centered = targets.reshape(-1, 48) - codec.mean
    projected = centered @ codec.components.T @ codec.components

    assert np.abs(projected - centered).max() < 1e-4 * np.abs(centered).max()
    assert codec.describe()["parameters"]["explained_variance"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["pca-6", "pca-8"])
def test_pca_low_rank_round_trip(name):
    targets = _low_rank_targets(rank=6)
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    decoded = codec.decode(parts)
    patch_error = np.linalg.norm(decoded - targets, axis=-1)
    num_components = codec.num_components
    coefficient_bound = np.sqrt(num_components) * parts["scales"].astype(np.float32) / 2

    assert _relative_error(decoded, targets) < 5e-3
    assert np.all(patch_error <= coefficient_bound * (1 + 1e-3) + 1e-4)


def test_pca_tiny_values_scale_floor():
    targets = np.array([1e-6, 0.0], dtype=np.float32).reshape(1, 2, 1)
    codec = _fitted("pca-1", targets)
    parts = codec.encode(targets)

    assert parts["scales"].max() == np.float16(FP16_SMALLEST)
    assert np.abs(codec.decode(parts) - targets).max() <= FP16_SMALLEST / 2


def test_pca_higher_rank_loses_detail():
    targets = _low_rank_targets(rank=24)
    codec = _fitted("pca-6", targets)
    decoded = _round_trip(codec, targets)

    assert _relative_error(decoded, targets - codec.mean) > 0.1
    assert codec.describe()["parameters"]["explained_variance"] < 0.99


def test_pca_components_orthonormal():
    codec = _fitted("pca-16", _gaussian((4, 16, 64)))
    gram = codec.components @ codec.components.T

    assert codec.components.shape == (16, 64)
    assert np.allclose(gram, np.eye(16), atol=1e-5)


def test_pca_fit_deterministic_signs():
    targets = _gaussian((4, 16, 32))
    first = _fitted("pca-8", targets)
    second = _fitted("pca-8", targets[::-1].copy())
    largest = np.argmax(np.abs(first.components), axis=1)

    assert np.all(first.components[np.arange(8), largest] > 0)
    assert np.allclose(first.components, second.components, atol=1e-4)


def test_pca_more_components_than_channels_raises():
    codec = build_codec("pca-8")

    with pytest.raises(UsageError) as raised:
        codec.fit(_gaussian((2, 16, 4)))

    assert "pca-8" in str(raised.value)
    assert "D=4" in str(raised.value)
    with pytest.raises(UsageError, match="D=4"):
        codec.part_specs(num_patches=16, dim=4)


def test_pca_more_components_than_patches_raises():
    with pytest.raises(UsageError) as raised:
        build_codec("pca-8").fit(_gaussian((1, 4, 32)))

    assert "at least 8 calibration patches" in str(raised.value)
    assert "got 4" in str(raised.value)


def test_pca_zero_components_raises():
    with pytest.raises(UsageError, match="at least 1"):
        build_codec("pca-0")


# Input checks


@pytest.mark.parametrize("name", ALL_CODECS)
def test_encode_nan_inf_raises(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    targets[2, 5, 9] = np.nan
    targets[3, 0, 0] = np.nan
    targets[2, 7, 1] = -np.inf

    with pytest.raises(NonFiniteTargetError) as raised:
        codec.encode(targets)

    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "3 values are non-finite" in message
    assert "2 NaN, 1 Inf" in message
    assert "sample 2 (patch 5, channel 9)" in message
    assert raised.value.sample_index == 2
    assert raised.value.num_nan == 2
    assert raised.value.num_inf == 1


@pytest.mark.parametrize("name", ["int8-channel", "pca-4"])
def test_fit_nan_calibration_raises(name):
    calibration = _gaussian((2, 8, 16))
    calibration[1, 0, 0] = np.inf

    with pytest.raises(NonFiniteTargetError, match="calibration targets"):
        build_codec(name).fit(calibration)


def test_encode_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"\[N, L, D\]"):
        build_codec("fp16").encode(np.zeros((4, 8), dtype=np.float32))


def test_encode_float64_converts():
    targets = _gaussian((1, 2, 8)).astype(np.float64)
    decoded = _round_trip(build_codec("fp32"), targets)

    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, targets.astype(np.float32))


def test_encode_beyond_float32_raises():
    targets = np.ones((2, 2, 4))
    targets[1, 0, 0] = 1e39

    with pytest.raises(TargetRangeError, match="float32 range"):
        build_codec("fp32").encode(targets)


def test_encode_integer_dtype_raises():
    with pytest.raises(ValueError, match="int64"):
        build_codec("fp16").encode(np.zeros((1, 2, 3), dtype=np.int64))


@pytest.mark.parametrize("name", ["int8-channel", "pca-4"])
def test_encode_before_fit_raises(name):
    with pytest.raises(CodecNotFittedError, match="load_state"):
        build_codec(name).encode(_gaussian((1, 4, 8)))


@pytest.mark.parametrize("name", ["int8-channel", "pca-4"])
def test_encode_other_width_raises(name):
    codec = _fitted(name, _gaussian((2, 8, 16)))

    with pytest.raises(ValueError, match="D=16 channels but the targets have D=12"):
        codec.encode(_gaussian((2, 8, 12)))


def test_decode_missing_part_raises():
    codec = build_codec("int8-token")
    parts = codec.encode(_gaussian((1, 2, 4)))

    with pytest.raises(CorruptCacheError, match="scales"):
        codec.decode({"codes": parts["codes"]})


# State


@pytest.mark.parametrize("name", ALL_CODECS)
def test_state_load_fresh_codec_decodes_same(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    fresh = build_codec(name)
    fresh.load_state(codec.state())
    fresh_parts = fresh.encode(targets)

    assert np.array_equal(fresh.decode(parts), codec.decode(parts))
    for part_name in parts:
        assert np.array_equal(fresh_parts[part_name], parts[part_name]), part_name


@pytest.mark.parametrize("name", ["int8-channel", "pca-4"])
def test_load_state_missing_key_raises(name):
    state = _fitted(name, _gaussian((2, 8, 16))).state()
    missing_key = sorted(state)[0]
    del state[missing_key]

    with pytest.raises(CorruptCacheError, match=missing_key):
        build_codec(name).load_state(state)


def test_load_state_wrong_shape_raises():
    state = _fitted("pca-4", _gaussian((2, 8, 16))).state()
    state["components"] = state["components"][:, :8]

    with pytest.raises(CorruptCacheError, match="components"):
        build_codec("pca-4").load_state(state)


def test_load_state_negative_scale_raises():
    state = _fitted("int8-channel", _gaussian((2, 8, 16))).state()
    state["scale"][3] = -1.0

    with pytest.raises(CorruptCacheError, match="int8-channel"):
        build_codec("int8-channel").load_state(state)


def test_unfitted_codec_state_empty():
    assert build_codec("int8-token").state() == {}
    with pytest.raises(CorruptCacheError, match="unexpected keys"):
        build_codec("fp16").load_state({"scale": np.ones(3)})


# Names


@pytest.mark.parametrize("name", ALL_CODECS)
def test_build_codec_plain_name(name):
    codec = build_codec(name)

    assert codec.name == name
    assert codec.full_name == name
    assert codec.compressor is None


def test_build_codec_zstd_suffix():
    codec = build_codec("int8-channel+zstd", zstd_level=9)

    assert codec.name == "int8-channel"
    assert codec.full_name == "int8-channel+zstd"
    assert codec.compressor == "zstd"
    assert codec.compression_level == 9
    assert build_codec(codec.full_name).compression_level == 3


@pytest.mark.parametrize("name", ["fp8", "pca", "pca-x", "int8", "fp16+gzip", "fp16+zstd+zstd"])
def test_build_codec_unknown_name_lists_valid(name):
    with pytest.raises(UsageError) as raised:
        build_codec(name)

    assert repr(name) in str(raised.value)
    for valid_name in CODEC_NAMES:
        assert valid_name in str(raised.value)
    assert "+zstd" in str(raised.value)


@pytest.mark.parametrize("level", [0, 23])
def test_build_codec_invalid_zstd_level(level):
    with pytest.raises(UsageError, match=f"invalid zstd level {level}"):
        build_codec("fp16+zstd", zstd_level=level)


@pytest.mark.parametrize("name", ALL_CODECS + ["pca-8+zstd"])
def test_describe_is_json(name):
    targets = _gaussian((4, 16, 64))
    codec = _fitted(name, targets)
    codec.encode(targets)
    description = json.loads(json.dumps(codec.describe()))

    assert description["name"] == codec.name
    assert description["full_name"] == name
    assert description["compressor"] == codec.compressor


# Lossless stage


def _compressible_targets() -> np.ndarray:
    """Targets [4, 16, 64] with only a few distinct values, which zstd shrinks a lot."""
    return np.tile(np.arange(8, dtype=np.float32), (4, 16, 8)) * 0.25


def test_compress_round_trip():
    data = _compressible_targets().tobytes()
    compressed = compress(data, "zstd")

    assert decompress(compressed, "zstd") == data
    assert len(compressed) < len(data) / 10
    assert compress(data, None) == data
    assert decompress(data, None) == data


def test_compress_unknown_compressor_raises():
    with pytest.raises(UsageError, match="'gzip'"):
        compress(b"abc", "gzip")


@pytest.mark.parametrize("name", ["fp16", "int8-channel", "int8-token"])
def test_zstd_reduces_encoded_bytes(name):
    targets = _compressible_targets()
    codec = _fitted(f"{name}+zstd", targets)
    parts = codec.encode(targets)
    raw_bytes = sum(part.nbytes for part in parts.values()) / 4

    assert encoded_nbytes(parts, None) == raw_bytes
    assert encoded_nbytes(parts, codec.compressor) < raw_bytes / 4
    assert np.array_equal(codec.decode(parts), _round_trip(_fitted(name, targets), targets))


def test_encoded_nbytes_gaussian_fp16():
    parts = build_codec("fp16").encode(_gaussian((4, 16, 64)))

    assert encoded_nbytes(parts, None) == 16 * 64 * 2
    assert encoded_nbytes(parts, "zstd") <= 16 * 64 * 2 * 1.01


def test_encoded_nbytes_mismatched_views_raises():
    with pytest.raises(ValueError, match="number of views"):
        encoded_nbytes({"codes": np.zeros((2, 3)), "scales": np.zeros((3,))}, None)


def test_zarr_compressors_store_parts(tmp_path):
    targets = _compressible_targets()
    plain = build_codec("int8-token")
    zstd = build_codec("int8-token+zstd", zstd_level=5)
    codes = zstd.encode(targets)["codes"]

    plain_array = zarr.create_array(
        store=str(tmp_path / "plain"), shape=codes.shape, dtype=codes.dtype,
        compressors=zarr_compressors(plain),
    )
    zstd_array = zarr.create_array(
        store=str(tmp_path / "zstd"), shape=codes.shape, dtype=codes.dtype,
        compressors=zarr_compressors(zstd),
    )
    plain_array[...] = codes
    zstd_array[...] = codes

    assert zarr_compressors(plain) == ()
    assert zarr_compressors(zstd)[0].level == 5
    assert np.array_equal(zstd_array[...], codes)
    assert zstd_array.nbytes_stored() < plain_array.nbytes_stored() / 4


# Fresh process


_DECODE_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import zarr

    from pipeline.codecs import build_codec

    root, name = sys.argv[1], sys.argv[2]
    group = zarr.open_group(root, mode="r")
    codec = build_codec(group.attrs["codec"])
    codec.load_state({key: array[...] for key, array in group["state"].arrays()})
    parts = {key: array[...] for key, array in group["parts"].arrays()}
    np.save(sys.argv[3], codec.decode(parts))
    """
)


@pytest.mark.parametrize("name", ["int8-channel+zstd", "pca-8"])
def test_zarr_state_fresh_process_decodes_same(tmp_path, name):
    targets = _gaussian((3, 16, 32), seed=6)
    codec = _fitted(name, targets)
    parts = codec.encode(targets)
    root = tmp_path / "cache.zarr"
    group = zarr.open_group(str(root), mode="w")
    group.attrs["codec"] = codec.full_name
    group.create_group("state")
    group.create_group("parts")
    for key, value in codec.state().items():
        state_array = zarr.open_array(
            str(root / "state" / key), mode="w", shape=value.shape, dtype=value.dtype
        )
        state_array[...] = value
    for key, value in parts.items():
        part_array = zarr.create_array(
            str(root / "parts" / key), shape=value.shape, dtype=value.dtype,
            compressors=zarr_compressors(codec),
        )
        part_array[...] = value

    output = tmp_path / "decoded.npy"
    subprocess.run(
        [sys.executable, "-c", _DECODE_SCRIPT, str(root), name, str(output)],
        cwd=tmp_path, check=True, capture_output=True, timeout=120,
    )

    assert np.array_equal(np.load(output), codec.decode(parts))


# Hypothesis


@st.composite
def _targets_and_codec(draw):
    num_views = draw(st.integers(1, 3))
    num_patches = draw(st.integers(1, 4))
    dim = draw(st.integers(1, 9))
    bound = float(np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3]))))
    elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    targets = draw(arrays(np.float32, (num_views, num_patches, dim), elements=elements))
    base_name = draw(st.sampled_from(["fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca"]))
    if base_name == "pca":
        return targets, f"pca-{min(dim, num_views * num_patches)}"
    return targets, base_name


@settings(max_examples=150, deadline=None)
@given(_targets_and_codec())
def test_round_trip_property(targets_and_codec):
    targets, name = targets_and_codec
    codec = _fitted(name, targets)
    decoded = _round_trip(codec, targets)

    assert decoded.shape == targets.shape
    assert decoded.dtype == np.float32
    assert np.abs(decoded - targets).max() <= _max_error_bound(name, targets) + 1e-30


# Fidelity


def test_fidelity_identical_targets():
    targets = _gaussian((4, 16, 64))
    report = fidelity_report(targets, targets.copy(), bytes_per_view=2048.0)

    assert report["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert report["cosine_p1"] == pytest.approx(1.0, abs=1e-12)
    assert report["relative_mse"] == 0.0
    assert report["num_patches"] == 64
    assert report["bytes_per_view"] == 2048.0
    assert report["norm"] == "layernorm"


def test_fidelity_noise_numbers():
    targets = _gaussian((8, 16, 256), seed=7)
    noisy = targets + _gaussian((8, 16, 256), seed=8) * 0.1
    report = fidelity_report(targets, noisy)

    assert report["relative_mse"] == pytest.approx(0.01, rel=0.1)
    assert report["cosine_mean"] == pytest.approx(1 / np.sqrt(1.01), abs=2e-3)
    assert report["cosine_p1"] < report["cosine_mean"]
    assert report["cosine_p1"] > 0.98
    assert report["bytes_per_view"] is None


def test_fidelity_layernorm_ignores_patch_affine():
    targets = _gaussian((2, 8, 64), seed=9)
    shifted = targets * 2 + 3

    assert fidelity_report(targets, shifted)["relative_mse"] < 1e-10
    assert fidelity_report(targets, shifted, norm="none")["relative_mse"] > 1


def test_fidelity_codec_ranking():
    targets, _ = _outlier_targets()
    reports = {
        name: fidelity_report(targets, _round_trip(_fitted(name, targets), targets))
        for name in ["fp16", "int8-channel", "pca-8"]
    }

    assert reports["fp16"]["relative_mse"] < reports["int8-channel"]["relative_mse"]
    assert reports["int8-channel"]["relative_mse"] < reports["pca-8"]["relative_mse"]


def test_fidelity_constant_patches():
    targets = np.full((1, 3, 1), 4.0, dtype=np.float32)
    report = fidelity_report(targets, targets + 1)

    assert report["cosine_mean"] == 1.0
    assert report["relative_mse"] == 0.0


def test_fidelity_shape_mismatch_raises():
    with pytest.raises(ValueError, match="share one shape"):
        fidelity_report(_gaussian((1, 2, 4)), _gaussian((1, 2, 5)))


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca-4"])
def test_finish_matches_decode(name):
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(6, 5, 8)).astype(np.float32)
    codec = build_codec(name)
    codec.fit(targets)
    parts = codec.encode(targets)

    shipped = codec.loader_parts(parts)
    finished = codec.finish(shipped)
    expected_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)
    assert finished.dtype == expected_dtype
    assert finished.shape == (6, 5, 8)
    expected = torch.from_numpy(codec.decode(parts))
    if name.startswith("pca"):
        # the [L, K] x [K, D] product may round differently in torch and numpy
        torch.testing.assert_close(finished, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(finished.float(), expected)


@pytest.mark.parametrize("name", ["int8-channel", "int8-token", "pca-4"])
def test_loader_parts_keep_stored_bytes(name):
    targets = np.random.default_rng(0).normal(size=(6, 5, 8)).astype(np.float32)
    codec = build_codec(name)
    codec.fit(targets)
    parts = codec.encode(targets)

    shipped = codec.loader_parts(parts)
    assert set(shipped) == set(codec.part_names)
    for part_name, part in parts.items():
        assert shipped[part_name].numpy().dtype == part.dtype
        assert np.array_equal(shipped[part_name].numpy(), part)


def test_finish_follows_a_refit():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(6, 5, 8)).astype(np.float32)
    second = 10 + 3 * rng.normal(size=(6, 5, 8)).astype(np.float32)
    codec = build_codec("pca-4")
    codec.fit(first)
    codec.finish(codec.loader_parts(codec.encode(first)))

    codec.fit(second)
    parts = codec.encode(second)
    finished = codec.finish(codec.loader_parts(parts))
    torch.testing.assert_close(finished, torch.from_numpy(codec.decode(parts)), rtol=1e-6, atol=1e-5)


def test_pickled_codec_drops_device_copies():
    targets = np.random.default_rng(0).normal(size=(6, 5, 8)).astype(np.float32)
    codec = build_codec("int8-channel")
    codec.fit(targets)
    parts = codec.encode(targets)
    before = codec.finish(codec.loader_parts(parts))

    copy = pickle.loads(pickle.dumps(codec))
    assert copy._device_state == {}
    assert torch.equal(copy.finish(copy.loader_parts(parts)), before)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 300, 65_791, 65_792, 1 << 20])
@pytest.mark.parametrize("level", [1, 3, 19])
def test_zstd_frame_content_size(size, level):
    data = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8).tobytes()
    frame = numcodecs.Zstd(level=level).encode(data)
    assert zstd_frame_content_size(frame) == size


def test_zstd_frame_content_size_rejects_other_bytes():
    with pytest.raises(ValueError, match="not a zstd frame"):
        zstd_frame_content_size(b"PK\x03\x04 not zstd")
    with pytest.raises(ValueError, match="not a zstd frame"):
        zstd_frame_content_size(b"")
