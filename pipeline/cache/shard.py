"""In-memory shard data and the per-cache layout that every shard follows.

A stage-one shard covers a consecutive range of source images with all their views, ordered
view-major: sample ``v * n + i`` is view ``v`` of the shard's image ``i`` (``n`` images per view).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.errors import CorruptCacheError

PartSpec = tuple[tuple[int, ...], np.dtype]

# Field names that the webdataset samples use for everything that is not a codec part.
RESERVED_FIELDS = frozenset({"jpg", "params", "meta"})
_PART_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def shard_name(shard_id: int) -> str:
    """Return the file name stem of a shard, e.g. ``shard_000012``."""
    if shard_id < 0:
        raise ValueError(f"shard_id must be >= 0, got {shard_id}")
    return f"shard_{shard_id:06d}"


@dataclass
class ShardData:
    """The samples of one shard, or of one view slice of it.

    ``params`` is float64 [N, P] (view parameters), each ``targets`` part has leading dim N, and
    ``label`` is -1 where the class is unknown.
    """

    image_index: np.ndarray
    view_index: np.ndarray
    source: list[str]
    label: np.ndarray
    params: np.ndarray
    jpeg: list[bytes]
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def select(self, idx: np.ndarray) -> ShardData:
        """Return the samples at positions ``idx`` (int array or bool mask [N])."""
        positions = np.arange(len(self))[np.asarray(idx)]
        return ShardData(
            image_index=self.image_index[positions],
            view_index=self.view_index[positions],
            source=[self.source[i] for i in positions],
            label=self.label[positions],
            params=self.params[positions],
            jpeg=[self.jpeg[i] for i in positions],
            targets={name: part[positions] for name, part in self.targets.items()},
        )

    def check_lengths(self) -> None:
        """Raise ValueError unless every field has the same number of samples."""
        n = len(self)
        lengths = {
            "view_index": len(self.view_index),
            "source": len(self.source),
            "label": len(self.label),
            "params": len(self.params),
            "jpeg": len(self.jpeg),
        }
        lengths.update({f"targets[{name!r}]": len(part) for name, part in self.targets.items()})
        wrong = {field: length for field, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(f"ShardData fields disagree on the sample count: image_index has {n}, {wrong}")


def concat_shard_data(pieces: list[ShardData]) -> ShardData:
    """Join shard data pieces (e.g. view slices) in order."""
    if not pieces:
        raise ValueError("concat_shard_data needs at least one piece")
    return ShardData(
        image_index=np.concatenate([p.image_index for p in pieces]),
        view_index=np.concatenate([p.view_index for p in pieces]),
        source=[s for p in pieces for s in p.source],
        label=np.concatenate([p.label for p in pieces]),
        params=np.concatenate([p.params for p in pieces]),
        jpeg=[b for p in pieces for b in p.jpeg],
        targets={name: np.concatenate([p.targets[name] for p in pieces]) for name in pieces[0].targets},
    )


@dataclass(frozen=True)
class ShardLayout:
    """Layout shared by every shard of one cache: the view count, the codec parts and the compressor.

    ``parts`` maps a codec part name to its per-sample shape and dtype. ``compressor`` is None or
    "zstd" / "zstd:<level>" (level 1-22, default 3), applied to the codec parts only.
    """

    num_views: int
    parts: dict[str, PartSpec]
    compressor: str | None

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        for name in self.parts:
            if not _PART_NAME.match(name) or name in RESERVED_FIELDS:
                raise ValueError(
                    f"codec part name {name!r} is invalid: use letters, digits, '_' or '-' "
                    f"and none of {sorted(RESERVED_FIELDS)}"
                )
        self.zstd_level()

    def zstd_level(self) -> int | None:
        """Return the zstd level, or None when the parts are stored uncompressed."""
        if self.compressor is None:
            return None
        match = re.fullmatch(r"zstd(?::(\d+))?", self.compressor)
        if match is None:
            raise ValueError(f"compressor must be None, 'zstd' or 'zstd:<level>', got {self.compressor!r}")
        level = int(match[1]) if match[1] else 3
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be in 1..22, got {level} in {self.compressor!r}")
        return level

    def describe(self) -> dict:
        """Return the JSON form stored in the manifest."""
        return {
            "num_views": self.num_views,
            "compressor": self.compressor,
            "codec_parts": {
                name: {"shape": list(shape), "dtype": np.dtype(dtype).name} for name, (shape, dtype) in self.parts.items()
            },
        }

    @classmethod
    def from_description(cls, description: dict) -> ShardLayout:
        """Build the layout from its manifest form (see ``describe``)."""
        parts = {
            name: (tuple(spec["shape"]), np.dtype(spec["dtype"])) for name, spec in description["codec_parts"].items()
        }
        return cls(num_views=description["num_views"], parts=parts, compressor=description["compressor"])

    def check_shard(self, data: ShardData, num_images: int, image_range: tuple[int, int]) -> None:
        """Raise ValueError unless ``data`` is a whole shard in view-major order that fits this layout."""
        data.check_lengths()
        expected = num_images * self.num_views
        if len(data) != expected:
            raise ValueError(f"shard has {len(data)} samples, expected num_images * num_views = {expected}")

        views = np.repeat(np.arange(self.num_views), num_images)
        if not np.array_equal(data.view_index, views):
            raise ValueError("shard samples must be view-major: view_index must be repeat(arange(num_views), num_images)")

        images = data.image_index.reshape(self.num_views, num_images)
        if not (images == images[:1]).all():
            raise ValueError("every view slice of a shard must list the same images in the same order")
        start, stop = image_range
        if num_images and not (start <= images.min() and images.max() < stop):
            raise ValueError(f"image indices {images.min()}..{images.max()} fall outside image_range [{start}, {stop})")
        if len(np.unique(images[0])) != num_images:
            raise ValueError("a shard view slice lists the same image index twice")

        if data.params.ndim != 2:
            raise ValueError(f"params must be [N, P], got shape {data.params.shape}")
        self.check_targets(data.targets)

    def check_targets(self, targets: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless ``targets`` has exactly the layout's parts with their shapes and dtypes."""
        if set(targets) != set(self.parts):
            raise ValueError(f"target parts {sorted(targets)} do not match the codec parts {sorted(self.parts)}")
        for name, (shape, dtype) in self.parts.items():
            part = targets[name]
            if tuple(part.shape[1:]) != tuple(shape) or part.dtype != np.dtype(dtype):
                raise ValueError(
                    f"target part {name!r} is {part.dtype} {tuple(part.shape[1:])} per sample, "
                    f"expected {np.dtype(dtype)} {tuple(shape)}"
                )


def check_read(data: ShardData, name: str, views: list[int], num_images: int, layout: ShardLayout) -> None:
    """Raise CorruptCacheError naming the shard unless ``data`` is what the manifest promises.

    ``data`` must hold ``num_images`` samples of each view in ``views``, in that order, with the
    layout's target parts.
    """
    try:
        data.check_lengths()
        layout.check_targets(data.targets)
    except ValueError as error:
        raise CorruptCacheError(f"cache shard {name} does not fit the manifest layout: {error}") from error

    expected = len(views) * num_images
    if len(data) != expected:
        raise CorruptCacheError(f"cache shard {name} has {len(data)} samples where the manifest records {expected}")
    if not np.array_equal(data.view_index, np.repeat(np.asarray(views, dtype=np.int64), num_images)):
        raise CorruptCacheError(f"cache shard {name} has view indices that differ from the view-major layout")
