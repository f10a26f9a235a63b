"""Codecs that store each target value as a narrower float: fp32 (exact), fp16 and bf16."""

import numpy as np
import torch

from pipeline.codecs.base import PartSpecs, TargetCodec, TargetRangeError, check_parts

FP16_MAX = float(np.finfo(np.float16).max)
BF16_EXPONENT_MASK = 0x7F80


def _first_sample(mask: np.ndarray) -> int:
    """Return the sample index of the first True in mask [N, L, D]."""
    return int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1)))


class Float32Codec(TargetCodec):
    """Exact float32 storage, the reference for fidelity and size."""

    name = "fp32"
    part_names = ("values",)

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        return {"values": ((num_patches, dim), np.dtype(np.float32))}

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": targets.copy()}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(parts["values"], dtype=np.float32)

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["values"]


class Float16Codec(TargetCodec):
    """IEEE half precision: 11 significant bits, so relative error <= 2**-11 for normal values."""

    name = "fp16"
    part_names = ("values",)

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        return {"values": ((num_patches, dim), np.dtype(np.float16))}

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        too_large = np.abs(targets) > FP16_MAX
        if too_large.any():
            raise TargetRangeError(
                f"fp16 cannot store {int(too_large.sum())} target values beyond +-{FP16_MAX:g} "
                f"(max |value| {float(np.abs(targets).max()):.4g}, first in sample "
                f"{_first_sample(too_large)}). Use bf16 or int8-channel instead"
            )

        return {"values": targets.astype(np.float16)}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts["values"].astype(np.float32)

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["values"]


class BFloat16Codec(TargetCodec):
    """bfloat16 (float32 range, 8 significant bits) stored as the upper 16 bits in uint16."""

    name = "bf16"
    part_names = ("values",)

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        return {"values": ((num_patches, dim), np.dtype(np.uint16))}

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        bits = np.ascontiguousarray(targets).view(np.uint32)

        # Round to nearest, ties to even: add just under half a bf16 step, plus one when the
        # kept lowest bit is odd. Inputs are finite, so the sum stays below 2**32.
        lowest_kept_bit = (bits >> 16) & 1
        rounded = ((bits + 0x7FFF + lowest_kept_bit) >> 16).astype(np.uint16)

        overflow = (rounded & BF16_EXPONENT_MASK) == BF16_EXPONENT_MASK
        if overflow.any():
            raise TargetRangeError(
                f"bf16 cannot store {int(overflow.sum())} target values that round beyond the "
                f"bfloat16 maximum (about 3.39e38), first in sample {_first_sample(overflow)}. "
                f"Use fp32 instead"
            )

        return {"values": rounded}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        bits = parts["values"].astype(np.uint32) << 16
        return bits.view(np.float32)

    def loader_parts(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        check_parts(self.name, parts, set(self.part_names))
        values = np.ascontiguousarray(parts["values"]).view(np.int16)
        return {"values": torch.from_numpy(values).view(torch.bfloat16)}

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["values"]
