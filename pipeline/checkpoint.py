"""Training checkpoints: written atomically, complete enough to continue a run exactly.

A checkpoint contains the model (student and head, keys prefixed `student.` and `head.`), the
optimizer, the step and epoch, the RNG states of every process and the resolved config. It is
written to a temporary file, fsynced and renamed, so a crash or a full disk during the write
leaves the previous checkpoint in place. Weights or optimizer moments with NaN or infinite
values are never written.
"""

from __future__ import annotations

import io
import pickle
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_write_bytes
from pipeline.engine import TrainingDivergedError
from pipeline.errors import UsageError

logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint-last.pt"


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and Python, as tensors and lists so `weights_only` loading works."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, list(python_state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any], copies: tuple[Path, ...] = ()) -> None:
    """Write `payload` with torch.save to `path`, and to each of `copies`, each atomically.

    Raises TrainingDivergedError, before anything is written, when the model or optimizer
    state contains NaN or infinite values. A full disk raises OSError naming the file.
    """
    check_finite(payload, path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()

    for target in (path, *copies):
        atomic_write_bytes(target, data)
    logger.info("saved checkpoint %s (step %d)", path, payload.get("step", -1))


def check_finite(payload: dict[str, Any], path: Path) -> None:
    """Raise TrainingDivergedError naming the first NaN or infinite tensor of the model or optimizer state."""
    for section in ("model", "optimizer"):
        name = _first_non_finite(payload.get(section, {}), section)
        if name is not None:
            raise TrainingDivergedError(
                f"{name} contains NaN or infinite values at step {payload.get('step', '?')}, so {path} was not "
                "written and keeps the last good checkpoint"
            )


def _first_non_finite(value: Any, name: str) -> str | None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{name}.{key}")
        if found is not None:
            return found
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, raising UsageError when it is missing or cannot be read."""
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise UsageError(
            f"checkpoint {path} cannot be read ({error}); replace it with an intact checkpoint, for example "
            "the newest checkpoint-NNNNNNNN.pt of the same run folder"
        ) from error
