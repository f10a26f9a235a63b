"""Training checkpoints: written atomically, complete enough to continue a run exactly.

A checkpoint holds the model (student and head, keys prefixed `student.` and `head.`), the
optimizer, the step and epoch, the RNG states of this process and the resolved config. It is
written to a temporary file, fsynced and renamed, so a crash during the write leaves the
previous checkpoint in place.
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


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` with torch.save, atomically."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("saved checkpoint %s (step %d)", path, payload.get("step", -1))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise UsageError(f"checkpoint {path} cannot be read ({error}); pass an intact checkpoint") from error
