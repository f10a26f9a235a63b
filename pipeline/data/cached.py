"""Stage-two dataset that reads student views and teacher targets from a cache.

A sample id enumerates the samples of one view across the cache, shard after shard. Batches
arrive as lists of (epoch, view, sample id); a worker reads the shard view slices it needs as
whole chunks, keeps the last few in memory (the epoch order visits a window of shards at a
time), and decodes only the samples of its batch.

NOTE: every rank reads the whole view slice of each shard it touches and keeps its own part of
each global batch, so storage reads grow with the number of ranks (the page cache absorbs this
on one node). JPEG and target decoding, the CPU cost, is not repeated.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from pipeline.cache import CacheReader
from pipeline.codecs import build_codec
from pipeline.masking import MaskConfig, sample_masks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheLayout:
    """Where each sample id of one view lives: shard ids and their first sample ids."""

    shard_ids: np.ndarray  # int64 [S]
    starts: np.ndarray  # int64 [S + 1], cumulative sample counts

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map sample ids to (position of the shard in `shard_ids`, offset inside its view slice)."""
        positions = np.searchsorted(self.starts, sample_ids, side="right") - 1
        return positions, sample_ids - self.starts[positions]

    def groups(self) -> list[np.ndarray]:
        """Sample ids of each shard, the groups that the epoch order permutes."""
        return [np.arange(self.starts[i], self.starts[i + 1]) for i in range(len(self.shard_ids))]


def cache_layout(reader: CacheReader) -> CacheLayout:
    shards = sorted(reader.shards, key=lambda record: record.shard_id)
    counts = [record.num_images for record in shards]
    return CacheLayout(
        shard_ids=np.array([record.shard_id for record in shards], dtype=np.int64),
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


class CachedViews(torch.utils.data.Dataset):
    """Batches of student views, decoded targets and masks, read from a cache."""

    def __init__(
        self,
        root: str | Path,
        mask_config: MaskConfig,
        seed: int,
        decode_jpeg: bool = True,
        shards_in_memory: int = 8,
    ) -> None:
        self.root = Path(root)
        self.mask_config = mask_config
        self.seed = seed
        self.decode_jpeg = decode_jpeg
        self.shards_in_memory = shards_in_memory

        self.reader = CacheReader(self.root)
        self.layout = cache_layout(self.reader)
        self.codec = build_codec(self.reader.manifest["settings"]["codec"]["name"])
        if self.codec.needs_fit:
            self.codec.load_state(self.reader.codec_state())
        self._slices: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return self.layout.num_samples

    def image_indices(self, view: int = 0) -> np.ndarray:
        """Source image index of every sample id, read from the shards' metadata."""
        indices = [self._slice(position, view).image_index for position in range(len(self.layout.shard_ids))]
        return np.concatenate(indices) if indices else np.empty(0, dtype=np.int64)

    def __getitems__(self, items: list[tuple[int, int, int]]) -> dict:
        """Load one batch.

        Args:
            items: (epoch, view, sample id) per sample; one epoch and view per batch.
        Returns:
            images: uint8 [B, 3, H, W] student views (or `jpeg`, a list of uint8 byte tensors,
                when JPEG decoding is left to the GPU); targets: float32 [B, L, D] decoded, not
                yet normalized; mask: bool [B, Gh, Gw], True = masked; image_index: int64 [B].
        """
        epoch, view = items[0][0], items[0][1]
        sample_ids = np.array([item[2] for item in items], dtype=np.int64)
        positions, offsets = self.layout.locate(sample_ids)

        jpeg, parts, image_index = [], [], []
        for position in np.unique(positions):
            chosen = np.flatnonzero(positions == position)
            data = self._slice(int(position), view).select(offsets[chosen])
            jpeg.extend((chosen[i], data.jpeg[i]) for i in range(len(chosen)))
            parts.append((chosen, data.targets))
            image_index.append((chosen, data.image_index))

        order = _restore_order(len(items), parts, image_index)
        targets = self.codec.decode({name: order["targets"][name] for name in order["targets"]})
        batch = {
            "targets": torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
            "image_index": torch.from_numpy(order["image_index"]),
            "mask": torch.from_numpy(sample_masks(self.mask_config, self.seed, epoch, order["image_index"])),
        }

        jpeg_bytes = [data for _, data in sorted(jpeg, key=lambda pair: pair[0])]
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpeg_bytes]
        if self.decode_jpeg:
            batch["images"] = torch.stack(torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB))
        else:
            batch["jpeg"] = encoded
        return batch

    def _slice(self, position: int, view: int):
        key = (position, view)
        if key in self._slices:
            self._slices.move_to_end(key)
            return self._slices[key]
        data = self.reader.read_shard(int(self.layout.shard_ids[position]), view)
        self._slices[key] = data
        if len(self._slices) > self.shards_in_memory:
            self._slices.popitem(last=False)
        return data


def _restore_order(batch_size: int, parts, image_index) -> dict:
    """Put per-shard pieces back into the batch's sample order."""
    names = parts[0][1].keys()
    targets = {}
    for name in names:
        first = parts[0][1][name]
        merged = np.empty((batch_size, *first.shape[1:]), dtype=first.dtype)
        for chosen, piece in parts:
            merged[chosen] = piece[name]
        targets[name] = merged

    indices = np.empty(batch_size, dtype=np.int64)
    for chosen, piece in image_index:
        indices[chosen] = piece
    return {"targets": targets, "image_index": indices}
