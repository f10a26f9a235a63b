"""Stage-two dataset for the online teacher: views rendered from the source images each step.

It draws the same view parameters, in the same order, as `cache-targets` with the same seed,
views and shard size, so a run with the teacher online is the reference for a cached run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BadImageError, UsageError
from pipeline.images import load_image
from pipeline.masking import MaskConfig, sample_masks
from pipeline.sources import SourceRecord, open_source, printable_source
from pipeline.views import AugmentConfig, pil_to_tensor, render_views, sample_view_params

logger = logging.getLogger(__name__)


def image_groups(num_images: int, shard_size: int) -> list[np.ndarray]:
    """Consecutive ranges of `shard_size` image indices: the groups a cache's shards would form."""
    return [np.arange(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


class OnlineViews(torch.utils.data.Dataset):
    """Batches of student views, teacher views and masks, rendered from the source images."""

    def __init__(
        self,
        data: str | Path,
        img_size: int,
        teacher_size: int,
        augment: AugmentConfig,
        mask_config: MaskConfig,
        view_seed: int,
        mask_seed: int,
    ) -> None:
        self.source = open_source(data)
        self.img_size = img_size
        self.teacher_size = teacher_size
        self.augment = augment
        self.mask_config = mask_config
        self.view_seed = view_seed
        self.mask_seed = mask_seed
        self._bad: dict[int, str] = {}  # record index -> reason, for the images this process failed to decode

    def __len__(self) -> int:
        return len(self.source)

    def image_indices(self, view: int = 0) -> np.ndarray:
        return np.array([record.index for record in self.source.records], dtype=np.int64)

    def __getitems__(self, items: list[tuple[int, int, int]]) -> dict:
        """Render one batch.

        An image that fails to decode is skipped, and its slot takes the next decodable image in
        index order (rendered as that image's own sample), so every batch keeps its size on
        every rank.

        Returns:
            images: uint8 [B, 3, H, W]; teacher_images: float32 [B, 3, S, S] in [0, 1];
            mask: bool [B, Gh, Gw], True = masked; image_index: int64 [B];
            skipped: list of (source, reason) of the images skipped in this batch.
        """
        epoch = items[0][0]
        students, teachers, indices, skipped = [], [], [], []
        for _, view, sample_id in items:
            record, student, teacher = self._render_decodable(sample_id, view, skipped)
            students.append(torch.from_numpy(np.asarray(student).copy()).permute(2, 0, 1))
            teachers.append(pil_to_tensor(teacher))
            indices.append(record.index)

        image_index = np.array(indices, dtype=np.int64)
        return {
            "images": torch.stack(students),
            "teacher_images": torch.stack(teachers),
            "image_index": torch.from_numpy(image_index),
            "mask": torch.from_numpy(sample_masks(self.mask_config, self.mask_seed, epoch, image_index)),
            "skipped": skipped,
        }

    def _render_decodable(self, sample_id: int, view: int, skipped: list[tuple[str, str]]):
        """Render sample `sample_id`, or the first decodable image after it; add each failure to `skipped`."""
        for offset in range(len(self.source)):
            record = self.source.records[(sample_id + offset) % len(self.source)]
            reason = self._bad.get(record.index)
            if reason is None:
                try:
                    return (record, *self._render(record, view))
                except (BadImageError, OSError) as error:
                    reason = str(error)
                    self._bad[record.index] = reason
                    logger.debug("skipping %s: %s", printable_source(record.source), reason)
            skipped.append((printable_source(record.source), reason))
        raise UsageError(
            f"failed to decode any of the {len(self.source)} images under {self.source.path}: "
            "check the input, for example with cache-targets, which lists each bad file with its reason"
        )

    def _render(self, record: SourceRecord, view: int):
        image = load_image(self.source.read_bytes(record), record.source)
        params = sample_view_params(image.size, self.view_seed, record.index, view, self.augment)
        return render_views(image, params, [self.img_size, self.teacher_size], self.augment)
