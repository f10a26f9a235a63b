"""Codecs that store each target value as an int8 code: per-channel and per-token scales.

Codes are symmetric in [-127, 127] so that zero deviation is exactly representable.
"""

import numpy as np
import torch

from pipeline.codecs.base import (
    CodecNotFittedError,
    PartSpecs,
    TargetCodec,
    TargetRangeError,
    check_state_keys,
    check_targets,
)
from pipeline.errors import CorruptCacheError

INT8_MAX_CODE = 127


def quantize_per_token(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize each token to int8 codes with its own absmax scale.

    Args:
        values: float32 [N, L, C].

    Returns:
        codes: int8 [N, L, C], and scales: float16 [N, L] with values ~= codes * scales.
        The absolute error of a value is at most half its token's scale. A nonzero scale is at
        least 2**-24 (the smallest float16), so tokens with max |value| below about 7.6e-6
        keep less than int8 relative precision.

    Raises:
        TargetRangeError: a token's absmax needs a scale beyond the float16 maximum.
    """
    exact_scales = np.abs(values).max(axis=-1) / INT8_MAX_CODE

    # Round scales up, because a scale rounded down to float16 would push the token's largest
    # value past code 127 and clip it. Overflow to inf is reported below.
    with np.errstate(over="ignore"):
        scales = exact_scales.astype(np.float16)
        rounded_down = scales.astype(np.float32) < exact_scales
        scales = np.where(rounded_down, np.nextafter(scales, np.float16(np.inf)), scales)

    if np.isinf(scales).any():
        first_sample = int(np.argmax(np.isinf(scales).any(axis=1)))
        raise TargetRangeError(
            f"int8 per-token scales overflow float16: a token in sample {first_sample} has max "
            f"|value| {float(exact_scales.max()) * INT8_MAX_CODE:.4g}, above the limit "
            f"{float(np.finfo(np.float16).max) * INT8_MAX_CODE:.4g}. Use int8-channel or bf16"
        )

    divisors = np.where(scales > 0, scales, 1).astype(np.float32)
    codes = np.rint(values / divisors[..., None])
    codes = np.clip(codes, -INT8_MAX_CODE, INT8_MAX_CODE).astype(np.int8)
    return codes, scales


def dequantize_per_token(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Invert quantize_per_token: int8 [N, L, C] and float16 [N, L] -> float32 [N, L, C]."""
    return codes.astype(np.float32) * scales.astype(np.float32)[..., None]


class Int8TokenCodec(TargetCodec):
    """int8 codes with one float16 absmax scale per patch. It needs no calibration."""

    name = "int8-token"
    part_names = ("codes", "scales")

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        return {
            "codes": ((num_patches, dim), np.dtype(np.int8)),
            "scales": ((num_patches,), np.dtype(np.float16)),
        }

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        codes, scales = quantize_per_token(targets)
        return {"codes": codes, "scales": scales}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return dequantize_per_token(parts["codes"], parts["scales"])

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["codes"].float() * parts["scales"].float().unsqueeze(-1)


class Int8ChannelCodec(TargetCodec):
    """int8 codes with a per-channel offset and scale fitted on calibration targets.

    Each channel gets its calibration [min, max] range, so a few channels that are far larger
    than the rest do not cost the others their precision. Values outside the fitted range clip
    to its ends. The codec counts them in num_clipped and reports them in describe().
    """

    name = "int8-channel"
    needs_fit = True
    part_names = ("codes",)

    def __init__(self) -> None:
        super().__init__()
        self.offset: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.num_clipped = 0
        self.num_encoded = 0

    def fit(self, calibration: np.ndarray) -> None:
        """Fit per-channel offset and scale [D] to the min and max over calibration [N, L, D]."""
        calibration = check_targets(calibration, "calibration targets")
        patches = calibration.reshape(-1, calibration.shape[-1])
        low = patches.min(axis=0).astype(np.float64)
        high = patches.max(axis=0).astype(np.float64)

        self.offset = ((low + high) / 2).astype(np.float32)
        self.scale = ((high - low) / (2 * INT8_MAX_CODE)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        return {"offset": self.offset.copy(), "scale": self.scale.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        check_state_keys(self.name, state, {"offset", "scale"})
        offset = np.asarray(state["offset"], dtype=np.float32)
        scale = np.asarray(state["scale"], dtype=np.float32)
        if offset.ndim != 1 or offset.shape != scale.shape:
            raise CorruptCacheError(
                f"codec state for {self.name} must contain offset and scale of shape [D], got "
                f"{offset.shape} and {scale.shape}. Rebuild the cache with cache-targets"
            )

        if not (np.isfinite(offset).all() and np.isfinite(scale).all() and (scale >= 0).all()):
            raise CorruptCacheError(
                f"codec state for {self.name} has non-finite offsets or invalid scales (they "
                f"must be finite and >= 0). Rebuild the cache with cache-targets"
            )

        self.offset = offset.copy()
        self.scale = scale.copy()

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        return {"codes": ((num_patches, dim), np.dtype(np.int8))}

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        self._require_fitted()
        if targets.shape[-1] != self.offset.shape[0]:
            raise ValueError(
                f"{self.name} was fitted on D={self.offset.shape[0]} channels but the targets "
                f"have D={targets.shape[-1]}"
            )

        with np.errstate(over="ignore"):
            deviation = targets - self.offset
        self.num_clipped += int((np.abs(deviation) > (INT8_MAX_CODE + 0.5) * self.scale).sum())
        self.num_encoded += targets.size

        # Channels that were constant during calibration have scale 0 and decode to the offset.
        # Values far outside the fitted range may overflow to inf, which np.clip maps to the
        # end codes.
        divisors = np.where(self.scale > 0, self.scale, np.float32(np.inf))
        with np.errstate(over="ignore"):
            codes = np.rint(deviation / divisors)
        codes = np.clip(codes, -INT8_MAX_CODE, INT8_MAX_CODE).astype(np.int8)
        return {"codes": codes}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        self._require_fitted()
        return parts["codes"].astype(np.float32) * self.scale + self.offset

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require_fitted()
        codes = parts["codes"]
        return codes.float() * self._state_tensor("scale", codes.device) + self._state_tensor("offset", codes.device)

    def _describe_parameters(self) -> dict:
        clipped_fraction = self.num_clipped / self.num_encoded if self.num_encoded else 0.0
        return {
            "range": "per-channel calibration min/max",
            "num_clipped": self.num_clipped,
            "num_encoded": self.num_encoded,
            "clipped_fraction": clipped_fraction,
        }

    def _require_fitted(self) -> None:
        if self.offset is None or self.scale is None:
            raise CodecNotFittedError(
                f"{self.name} is not fitted. Call fit() on calibration targets, or load_state() "
                f"with the state stored in the cache"
            )
