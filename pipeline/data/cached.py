"""Stage-two dataset that reads student views and teacher targets from a cache.

A sample id enumerates the samples of one view across the cache, shard after shard. Batches
arrive as lists of (epoch, view, sample id). A worker reads the shard view slices it needs as
whole chunks, keeps at most `shards_in_memory` of them, and decodes only the samples of its
batch.

The epoch order (`pipeline.data.order`) visits the shards in windows of `SHARD_WINDOW` and
gives each DataLoader worker its own run of consecutive batches, so a worker that keeps one
window of slices reads each slice once per epoch. Within a window every slice stays cached, and
a batch that reaches the next window uses its cached slices before new reads evict the least
recently used ones. Memory per worker is therefore one window of view slices, whatever the size
of the cache.

NOTE: every rank reads the whole view slice of each shard it touches and keeps its own part of
each global batch, so storage reads grow with the number of ranks. The ranks move through the
same windows in step, so on one node the page cache serves most repeats. JPEG and target
decoding, the CPU cost, is not repeated.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from pipeline.cache import CacheReader, ShardData
from pipeline.codecs import build_codec
from pipeline.data.order import SHARD_WINDOW
from pipeline.masking import MaskConfig, sample_masks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheLayout:
    """Location of each sample id of one view: shard ids and their first sample ids."""

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


@dataclass(frozen=True)
class ViewSlice:
    """The columns of one shard's view slice that training reads, n samples.

    The JPEGs are kept back to back in one byte tensor, so a batch takes views of it instead of
    copying each file.
    """

    image_index: np.ndarray  # int64 [n]
    targets: dict[str, np.ndarray]  # codec parts, each [n, ...]
    jpeg: torch.Tensor  # uint8 [total bytes]
    jpeg_offsets: list[int]  # n + 1 byte offsets into `jpeg`

    @classmethod
    def from_shard(cls, data: ShardData) -> ViewSlice:
        offsets = np.zeros(len(data.jpeg) + 1, dtype=np.int64)
        np.cumsum([len(jpeg) for jpeg in data.jpeg], out=offsets[1:])
        joined = bytearray().join(data.jpeg)
        jpeg = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return cls(data.image_index, data.targets, jpeg, offsets.tolist())

    def jpeg_at(self, row: int) -> torch.Tensor:
        """Return the JPEG bytes of sample `row` as a view into `jpeg`, without copying."""
        return self.jpeg[self.jpeg_offsets[row] : self.jpeg_offsets[row + 1]]


class CachedViews(torch.utils.data.Dataset):
    """Batches of student views, decoded targets and masks, read from a cache."""

    def __init__(
        self,
        root: str | Path,
        mask_config: MaskConfig,
        seed: int,
        decode_jpeg: bool = True,
        shards_in_memory: int = SHARD_WINDOW,
    ) -> None:
        if shards_in_memory < 1:
            raise ValueError(f"shards_in_memory must be at least 1, got {shards_in_memory}")
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
        self._slices: OrderedDict[tuple[int, int], ViewSlice] = OrderedDict()

    def __len__(self) -> int:
        return self.layout.num_samples

    @property
    def slices_in_memory(self) -> int:
        """Number of shard view slices that this process keeps in memory now."""
        return len(self._slices)

    def __getitems__(self, items: list[tuple[int, int, int]]) -> dict:
        """Load one batch, in the order of `items`.

        Args:
            items: (epoch, view, sample id) per sample; one epoch and view per batch.
        Returns:
            images: uint8 [B, 3, H, W] student views, or, when JPEG decoding is left to the GPU,
                jpeg: uint8 [total bytes] the batch's JPEG files back to back, with
                jpeg_offsets: int64 [B + 1];
            target_parts: the codec's stored parts of the batch as tensors [B, ...] (int8 codes,
                float16 scales, float16 values, ...); `finish_targets` decodes them on the
                trainer's device;
            mask: bool [B, Gh, Gw], True = masked;
            image_index: int64 [B]; sample_id: int64 [B].
        """
        epoch, view = items[0][0], items[0][1]
        if any(item[0] != epoch or item[1] != view for item in items):
            raise ValueError(f"a batch must hold one epoch and one view, got items {items[:4]} ...")
        sample_ids = np.array([item[2] for item in items], dtype=np.int64)
        positions, rows = self.layout.locate(sample_ids)

        batch_size = len(items)
        image_index = np.empty(batch_size, dtype=np.int64)
        parts = {
            name: np.empty((batch_size, *shape), dtype=dtype) for name, (shape, dtype) in self.reader.layout.parts.items()
        }
        jpeg: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * batch_size

        for position in self._visit_order(positions, view):
            chosen = np.flatnonzero(positions == position)
            piece = self._slice(position, view)
            image_index[chosen] = piece.image_index[rows[chosen]]
            for name, part in parts.items():
                part[chosen] = piece.targets[name][rows[chosen]]
            for i, row in zip(chosen.tolist(), rows[chosen].tolist()):
                jpeg[i] = piece.jpeg_at(row)

        batch = {
            "target_parts": self.codec.loader_parts(parts),
            "image_index": torch.from_numpy(image_index),
            "sample_id": torch.from_numpy(sample_ids),
            "mask": torch.from_numpy(sample_masks(self.mask_config, self.seed, epoch, image_index)),
        }
        if self.decode_jpeg:
            decoded = torchvision.io.decode_jpeg(jpeg, mode=torchvision.io.ImageReadMode.RGB)
            batch["images"] = torch.stack(decoded)
        else:
            # one tensor per batch: a list would cost one shared-memory file per JPEG between processes
            batch["jpeg"] = torch.cat(jpeg)
            batch["jpeg_offsets"] = torch.tensor([0] + [len(data) for data in jpeg]).cumsum(0)
        return batch

    def finish_targets(self, target_parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode a batch's `target_parts`, on their device, into targets [B, L, D], not normalized.

        float16 or bfloat16 for the fp16 and bf16 codecs, float32 otherwise.
        """
        return self.codec.finish(target_parts)

    def _visit_order(self, positions: np.ndarray, view: int) -> list[int]:
        """Shard positions of a batch: those in memory first, then the others in batch order.

        Using the cached slices before reading new ones keeps a new read from evicting a slice
        that this batch still needs.
        """
        unique, first = np.unique(positions, return_index=True)
        by_appearance = unique[np.argsort(first)].tolist()
        cached = [position for position in by_appearance if (position, view) in self._slices]
        new = [position for position in by_appearance if (position, view) not in self._slices]
        return cached + new

    def _slice(self, position: int, view: int) -> ViewSlice:
        key = (position, view)
        if key in self._slices:
            self._slices.move_to_end(key)
            return self._slices[key]

        while len(self._slices) >= self.shards_in_memory:
            self._slices.popitem(last=False)
        data = self.reader.read_shard(int(self.layout.shard_ids[position]), view)
        piece = ViewSlice.from_shard(data)
        self._slices[key] = piece
        return piece
