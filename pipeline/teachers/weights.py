"""Where a teacher's weights come from: a published open_clip tag, a local file, or random init.

Published tags resolve through open_clip's Hugging Face Hub download. Without network, that
download retries with backoff: with huggingface_hub 2.4 and failing DNS lookups it took 46 s
before raising, over two candidate files. So `resolve_published_weights` first looks in the
local Hub cache, then probes the Hub once with a short timeout, and raises
WeightsUnavailableError as soon as the probe fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import open_clip
from huggingface_hub import constants as hub_constants
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.factory import load_state_dict
from safetensors import SafetensorError
from torch import Tensor

from pipeline.errors import UsageError, WeightsUnavailableError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
NO_WEIGHTS = "none"
HUB_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of a teacher's weights.

    `source` is the published tag (for example "openai"), the absolute path of a local file,
    "random" for random init, or "none" for the pixel teacher. `sha256` is the hex digest of
    the checkpoint file that was loaded, or None when no file was loaded.
    """

    source: str
    sha256: str | None

    @property
    def is_random(self) -> bool:
        """True when the weights are a random init, so the targets are not CLIP features."""
        return self.source == RANDOM_WEIGHTS


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hash a file with SHA-256, reading `chunk_bytes` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_local_weights(weights: str | Path) -> Path:
    """Return the absolute path of a local checkpoint, or raise UsageError if it is not a file."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise UsageError(
            f"teacher checkpoint {str(path)!r} not found; pass an existing file with --teacher-weights, "
            f"or omit it to use the published weights"
        )
    if not path.is_file():
        raise UsageError(f"teacher checkpoint {str(path)!r} is not a file; pass the checkpoint file itself")
    return path.resolve()


def hub_file_candidates(pretrained_cfg: dict) -> tuple[str, list[str]]:
    """Return the Hub repo id of a pretrained config and its file names, preferred first.

    The order is the one open_clip 3.3 `download_pretrained_from_hf` tries: the safetensors
    file, then the pickle file named in the config.
    """
    repo_id, filename = os.path.split(pretrained_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [os.path.splitext(filename)[0] + ".safetensors", filename]
    return repo_id, [filename]


def find_cached_hub_file(
    repo_id: str, filenames: list[str], cache_dir: str | Path | None = None
) -> Path | None:
    """Return the first of `filenames` present in the local Hugging Face cache, or None."""
    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    return None


def resolve_published_weights(
    pretrained_cfg: dict,
    *,
    teacher_name: str,
    tag: str,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return the local path of a published checkpoint, downloading it if it is not cached.

    `pretrained_cfg` is open_clip's pretrained config for the tag. Raises
    WeightsUnavailableError when the file is neither cached nor downloadable.
    """

    def unavailable(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"could not fetch the published weights {tag!r} for teacher {teacher_name} ({reason}); "
            f"download them on a machine with network, or pass a local checkpoint with "
            f"--teacher-weights PATH"
        )

    if not pretrained_cfg.get("hf_hub"):
        raise unavailable(f"open_clip {open_clip.__version__} lists no Hugging Face Hub location for it")
    repo_id, filenames = hub_file_candidates(pretrained_cfg)

    cached = find_cached_hub_file(repo_id, filenames, cache_dir)
    if cached is not None:
        logger.info("teacher %s: using cached weights %s", teacher_name, cached)
        return cached

    if hub_constants.is_offline_mode():
        raise unavailable(f"HF_HUB_OFFLINE is set and {repo_id} is not in the Hugging Face cache")

    # One request without retries decides whether the Hub is reachable at all.
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any failure means the download below would fail too
        raise unavailable(f"{type(error).__name__}: {error}") from error

    logger.info("teacher %s: downloading weights %r from %s", teacher_name, tag, repo_id)
    try:
        path = open_clip.download_pretrained(pretrained_cfg, cache_dir=cache_dir)
    except Exception as error:  # open_clip re-raises download failures as several types
        raise unavailable(f"{type(error).__name__}: {error}") from error
    return Path(path)


def read_visual_state_dict(path: Path) -> dict[str, Tensor]:
    """Read the image-tower tensors, keys starting with "visual.", of an open_clip checkpoint.

    Accepts what open_clip's `load_state_dict` reads: a state dict saved with torch.save
    (optionally under a "state_dict" key, optionally with "module." prefixes) or a
    .safetensors file. Raises UsageError naming the file if it cannot be read or has no
    image tower.
    """
    try:
        state_dict = load_state_dict(str(path), device="cpu", weights_only=True)
    except (
        RuntimeError,
        ValueError,
        EOFError,
        AttributeError,
        StopIteration,
        pickle.UnpicklingError,
        SafetensorError,
    ) as error:  # open_clip assumes a non-empty dict, so other contents fail in different ways
        raise UsageError(
            f"could not read teacher checkpoint {str(path)!r} ({type(error).__name__}: {error}); "
            f"pass an open_clip CLIP checkpoint (.pt, .pth, .bin or .safetensors)"
        ) from error

    visual = {key: value for key, value in state_dict.items() if key.startswith("visual.")}
    if not visual:
        first_keys = ", ".join(list(state_dict)[:5]) or "none"
        raise UsageError(
            f"teacher checkpoint {str(path)!r} has no image tower keys starting with 'visual.' "
            f"(first keys: {first_keys}); pass the state dict of an open_clip CLIP model"
        )
    return visual
