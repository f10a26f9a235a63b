"""The TargetCodec interface and the input checks every codec shares.

A codec turns float32 targets [N, L, D] (N views, L patches, D teacher width) into named parts,
each a numpy array with leading dimension N, and back. Fitted codecs (int8-channel, pca-K) learn
their parameters on a calibration slice. Those parameters travel in the cache through state().
"""

from abc import ABC, abstractmethod

import numpy as np
import torch

from pipeline.codecs.lossless import DEFAULT_ZSTD_LEVEL
from pipeline.errors import CorruptCacheError

PartSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]


class NonFiniteTargetError(ValueError):
    """Targets that contain NaN or Inf. The attributes locate the first one."""

    def __init__(self, num_nan: int, num_inf: int, first_index: tuple[int, int, int], label: str):
        self.num_nan = num_nan
        self.num_inf = num_inf
        self.sample_index, self.patch_index, self.channel_index = first_index
        super().__init__(
            f"cannot encode {label}: {num_nan + num_inf} values are non-finite "
            f"({num_nan} NaN, {num_inf} Inf). The first is in sample {self.sample_index} "
            f"(patch {self.patch_index}, channel {self.channel_index})"
        )


class TargetRangeError(ValueError):
    """Finite targets whose magnitude the codec's storage type cannot represent."""


class CodecNotFittedError(RuntimeError):
    """A fitted codec used before fit() or load_state()."""


def check_targets(targets: np.ndarray, label: str = "targets") -> np.ndarray:
    """Validate targets [N, L, D] and return them as float32.

    `label` names the array in error messages.

    Raises:
        ValueError: wrong rank or a non-float dtype.
        NonFiniteTargetError: any NaN or Inf, with counts and the first location.
        TargetRangeError: float64 values beyond the float32 range.
    """
    targets = np.asarray(targets)
    if targets.ndim != 3:
        raise ValueError(f"{label} must have shape [N, L, D], got shape {targets.shape}")

    if not np.issubdtype(targets.dtype, np.floating):
        raise ValueError(f"{label} must be a float array, got dtype {targets.dtype}")

    finite = np.isfinite(targets)
    if not finite.all():
        num_nan = int(np.isnan(targets).sum())
        num_inf = int(targets.size - finite.sum()) - num_nan
        first_flat = int(np.argmin(finite.reshape(-1)))
        first_index = tuple(int(i) for i in np.unravel_index(first_flat, targets.shape))
        raise NonFiniteTargetError(num_nan, num_inf, first_index, label)

    if targets.dtype == np.float32:
        return targets

    with np.errstate(over="ignore"):
        converted = targets.astype(np.float32)
    if not np.isfinite(converted).all():
        raise TargetRangeError(
            f"{label} exceed the float32 range (max |value| {float(np.abs(targets).max()):.4g}). "
            f"Scale the teacher features down before caching them"
        )
    return converted


def check_state_keys(codec_name: str, state: dict[str, np.ndarray], expected: set[str]) -> None:
    """Raise CorruptCacheError when a codec state lacks or adds keys."""
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CorruptCacheError(
            f"codec state for {codec_name} has missing keys {missing} and unexpected keys "
            f"{unexpected}. The cache was written incompletely or by another codec, so rebuild "
            f"it with cache-targets"
        )


def check_parts(codec_name: str, parts: dict[str, np.ndarray], expected: set[str]) -> None:
    """Raise CorruptCacheError when encoded parts lack a part the codec decodes."""
    missing = sorted(expected - parts.keys())
    if missing:
        raise CorruptCacheError(
            f"encoded targets for {codec_name} lack parts {missing} (found {sorted(parts)}). "
            f"Rebuild the cache with cache-targets"
        )


class TargetCodec(ABC):
    """Lossy conversion between float32 targets [N, L, D] and named numpy parts.

    `compressor` names the lossless stage applied to each part afterwards ("zstd" or None).
    The cache store applies it, not the codec.
    """

    name: str
    needs_fit: bool = False
    part_names: tuple[str, ...]

    def __init__(self) -> None:
        self.compressor: str | None = None
        self.compression_level: int = DEFAULT_ZSTD_LEVEL
        self._device_state: dict[tuple[str, str], tuple[np.ndarray, torch.Tensor]] = {}

    @property
    def full_name(self) -> str:
        """Name that build_codec accepts to rebuild this codec, with the "+zstd" suffix if set."""
        if self.compressor is None:
            return self.name
        return f"{self.name}+{self.compressor}"

    def fit(self, calibration: np.ndarray) -> None:
        """Fit parameters on calibration targets [N, L, D].

        Codecs without parameters only validate the calibration targets.
        """
        check_targets(calibration, "calibration targets")

    def state(self) -> dict[str, np.ndarray]:
        """Fitted parameters as named arrays, stored in the cache beside the encoded parts."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore the parameters that state() returned."""
        check_state_keys(self.name, state, set())

    def encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Encode targets [N, L, D] into parts, each with leading dimension N.

        Raises:
            NonFiniteTargetError: the targets contain NaN or Inf.
            TargetRangeError: the targets exceed what the storage type represents.
        """
        return self._encode(check_targets(targets))

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Decode parts from encode() into float32 targets [N, L, D]."""
        check_parts(self.name, parts, set(self.part_names))
        return self._decode(parts)

    def loader_parts(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Wrap the stored parts of a batch as tensors [N, ...] for a loader worker to send.

        A worker only gathers the stored bytes. The expansion to [N, L, D] runs later in
        finish() on the trainer's device. The int8 and pca-K codecs therefore send 4 to over 40
        times fewer bytes from each worker, and their dequantization leaves the worker's core.
        """
        check_parts(self.name, parts, set(self.part_names))
        return {name: torch.from_numpy(np.ascontiguousarray(parts[name])) for name in self.part_names}

    @abstractmethod
    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode the tensors of loader_parts() into targets [N, L, D], on the tensors' device.

        float16 and bfloat16 for fp16 and bf16 (their stored values), float32 otherwise.
        The result equals decode() of the same parts up to float32 rounding in pca-K's product.
        """

    def _state_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        """Return the fitted state array `name` as a float32 tensor on `device`, copied once per device and array."""
        array = getattr(self, name)
        key = (name, str(device))
        cached = self._device_state.get(key)
        if cached is None or cached[0] is not array:
            cached = (array, torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device))
            self._device_state[key] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        # device copies stay in the process that made them: a worker gets the numpy state only
        state = self.__dict__.copy()
        state["_device_state"] = {}
        return state

    def describe(self) -> dict:
        """JSON-ready description for the cache manifest."""
        return {
            "name": self.name,
            "full_name": self.full_name,
            "parameters": self._describe_parameters(),
            "compressor": self.compressor,
            "compression_level": self.compression_level if self.compressor else None,
        }

    @abstractmethod
    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        """Per-sample shape and dtype of each part, so a store can create arrays up front."""

    @abstractmethod
    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Encode validated float32 targets [N, L, D]."""

    @abstractmethod
    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Decode parts whose names were checked."""

    def _describe_parameters(self) -> dict:
        return {}
