"""pca-K: project targets onto a K-dim PCA basis fitted on calibration targets.

Teacher features are close to low-rank, so K coefficients per patch keep most of the variance.
The coefficients are stored as int8 with a float16 absmax scale per patch.
"""

import numpy as np
import torch

from pipeline.codecs.base import (
    CodecNotFittedError,
    PartSpecs,
    TargetCodec,
    check_state_keys,
    check_targets,
)
from pipeline.codecs.int8 import dequantize_per_token, quantize_per_token
from pipeline.errors import CorruptCacheError, UsageError


class PCACodec(TargetCodec):
    """Mean [D] and orthonormal components [K, D] from the SVD of centered calibration patches."""

    needs_fit = True
    part_names = ("codes", "scales")

    def __init__(self, num_components: int) -> None:
        super().__init__()
        if num_components < 1:
            raise UsageError(f"invalid codec pca-{num_components}: K must be at least 1")

        self.num_components = num_components
        self.name = f"pca-{num_components}"
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None
        self.explained_variance_ratio: np.ndarray | None = None

    def fit(self, calibration: np.ndarray) -> None:
        """Fit the basis on calibration targets [N, L, D], treating each patch as one sample.

        Raises:
            UsageError: K exceeds D or the number of calibration patches N * L.
        """
        calibration = check_targets(calibration, "calibration targets")
        dim = calibration.shape[-1]
        self._check_num_components(dim)
        patches = calibration.reshape(-1, dim)
        if patches.shape[0] < self.num_components:
            raise UsageError(
                f"{self.name} needs at least {self.num_components} calibration patches, got "
                f"{patches.shape[0]} (calibration images x patches per view). Raise --calibration-images or pick a smaller K"
            )

        # NOTE: the SVD takes memory ~ N * L * D floats and time ~ N * L * D**2, so keep the
        # calibration slice to a few hundred views.
        mean = patches.mean(axis=0, dtype=np.float64).astype(np.float32)
        centered = patches - mean
        _, singular_values, right_vectors = np.linalg.svd(centered, full_matrices=False)
        components = right_vectors[: self.num_components]

        # SVD signs are arbitrary, so make each component's largest entry positive. Two fits on
        # the same data then store the same basis.
        largest = np.argmax(np.abs(components), axis=1)
        signs = np.sign(components[np.arange(len(components)), largest])
        components = components * signs[:, None]

        variance = singular_values.astype(np.float64) ** 2
        ratio = np.zeros(self.num_components)
        if variance.sum() > 0:
            ratio = variance[: self.num_components] / variance.sum()

        self.mean = mean
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.explained_variance_ratio = ratio.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        return {
            "mean": self.mean.copy(),
            "components": self.components.copy(),
            "explained_variance_ratio": self.explained_variance_ratio.copy(),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        check_state_keys(self.name, state, {"mean", "components", "explained_variance_ratio"})
        mean = np.asarray(state["mean"], dtype=np.float32)
        components = np.asarray(state["components"], dtype=np.float32)
        ratio = np.asarray(state["explained_variance_ratio"], dtype=np.float32)

        num_components = self.num_components
        shapes_valid = (
            mean.ndim == 1
            and components.shape == (num_components, mean.shape[0])
            and ratio.shape == (num_components,)
        )
        if not shapes_valid:
            raise CorruptCacheError(
                f"codec state for {self.name} must contain mean [D], components "
                f"[{num_components}, D] and explained_variance_ratio [{num_components}], got "
                f"{mean.shape}, {components.shape} and {ratio.shape}. Rebuild the cache with "
                f"cache-targets"
            )

        self.mean = mean.copy()
        self.components = np.ascontiguousarray(components).copy()
        self.explained_variance_ratio = ratio.copy()

    def part_specs(self, num_patches: int, dim: int) -> PartSpecs:
        self._check_num_components(dim)
        return {
            "codes": ((num_patches, self.num_components), np.dtype(np.int8)),
            "scales": ((num_patches,), np.dtype(np.float16)),
        }

    def _encode(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        self._require_fitted()
        num_views, num_patches, dim = targets.shape
        if dim != self.mean.shape[0]:
            raise ValueError(
                f"{self.name} was fitted on D={self.mean.shape[0]} channels but the targets "
                f"have D={dim}"
            )

        centered = targets.reshape(-1, dim) - self.mean
        coefficients = (centered @ self.components.T).reshape(num_views, num_patches, -1)
        codes, scales = quantize_per_token(coefficients)
        return {"codes": codes, "scales": scales}

    def _decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        self._require_fitted()
        coefficients = dequantize_per_token(parts["codes"], parts["scales"])
        num_views, num_patches, _ = coefficients.shape
        targets = coefficients.reshape(-1, self.num_components) @ self.components + self.mean
        return targets.reshape(num_views, num_patches, -1)

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require_fitted()
        codes = parts["codes"]
        coefficients = codes.float() * parts["scales"].float().unsqueeze(-1)  # [N, L, K]
        components = self._state_tensor("components", codes.device)  # [K, D]
        return coefficients @ components + self._state_tensor("mean", codes.device)

    def _describe_parameters(self) -> dict:
        parameters = {
            "num_components": self.num_components,
            "coefficients": "int8 per-token absmax",
        }
        if self.explained_variance_ratio is not None:
            parameters["explained_variance"] = float(self.explained_variance_ratio.sum())
        return parameters

    def _check_num_components(self, dim: int) -> None:
        if self.num_components > dim:
            raise UsageError(
                f"{self.name} keeps {self.num_components} components but the targets have only "
                f"D={dim} channels. Pick K <= {dim}, or fp16 or int8-channel to keep every channel"
            )

    def _require_fitted(self) -> None:
        if self.mean is None or self.components is None:
            raise CodecNotFittedError(
                f"{self.name} is not fitted. Call fit() on calibration targets, or load_state() "
                f"with the state stored in the cache"
            )
