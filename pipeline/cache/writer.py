"""Stage-one side of the cache: create or resume a cache, write shards and codec state, finalize.

Several processes (torchrun ranks) may write different shards of one cache at the same time.
Each shard is written into a temp folder, synced, hashed and renamed into place, and only then
recorded in its own ``shards/<name>.done.json``. A shard without that record counts as not
written, so a run killed at any point resumes by rewriting the unrecorded shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
import zarr.errors

from pipeline.atomic import TEMP_PREFIX, atomic_write_json, fsync_dir, fsync_tree, remove_stale_temps, temp_path
from pipeline.cache import manifest as mf
from pipeline.cache.checksum import hash_tree, shard_crc32
from pipeline.cache.manifest import ShardRecord
from pipeline.cache.shard import PartSpec, ShardData, ShardLayout, shard_name
from pipeline.cache.wds_store import write_wds_shard
from pipeline.cache.zarr_store import read_codec_group, write_codec_group, write_zarr_shard
from pipeline.errors import UsageError

logger = logging.getLogger(__name__)

# Manifest keys that finalize() sets itself; `extra` must not overwrite them.
RESERVED_KEYS = frozenset(
    {
        "schema_version",
        "format",
        "created",
        "finalized",
        "complete",
        "num_views",
        "compressor",
        "codec_parts",
        "settings",
        "codec_state",
        "shards",
        "num_shards",
        "num_images",
        "num_samples",
    }
)


# Entries besides the manifest in a cache without a finished shard or codec state: the zarr
# root group and the folders of unrecorded shards and codec state.
UNRECORDED_ENTRIES = ("zarr.json", "shards", "codec")


def holds_written_data(root: Path) -> bool:
    """Return whether the cache folder `root` contains a finished shard or a recorded codec state."""
    root = Path(root)
    return (root / mf.CODEC_RECORD_NAME).exists() or any((root / "shards").glob("shard_*.done.json"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CacheWriter:
    """Create a cache folder, or resume one written with the same content settings.

    ``settings`` contains everything that determines the cache content (teacher, weights sha256,
    sizes, seed, views, augmentation, codec, source fingerprint, shard size, ...) and must be
    JSON-serializable. ``codec_parts`` maps each codec part to its per-sample shape and dtype.
    Opening a cache whose stored settings differ raises CacheMismatchError naming the first
    differing setting with both values, unless the cache contains no finished shard and no
    codec state: such a cache is started over with the new settings.
    """

    def __init__(
        self,
        root: Path,
        fmt: str,
        settings: dict,
        codec_parts: dict[str, PartSpec],
        compressor: str | None,
        num_views: int,
    ) -> None:
        if fmt not in mf.FORMATS:
            raise UsageError(f"cache format {fmt!r} is invalid: choose one of {list(mf.FORMATS)}")
        self.root = Path(root)
        self.fmt = fmt
        self.layout = ShardLayout(num_views=num_views, parts=dict(codec_parts), compressor=compressor)
        self.settings = mf.to_json_value(settings)
        self.shards_dir = self.root / "shards"

        self._open_manifest()
        self.shards_dir.mkdir(exist_ok=True)
        remove_stale_temps(self.root)
        remove_stale_temps(self.shards_dir)
        if fmt == "zarr":
            _ensure_group(self.root)
            _ensure_group(self.shards_dir)

    def _content(self) -> dict:
        """Return the manifest entries that must match for a resume."""
        return {"format": self.fmt, **self.layout.describe(), "settings": self.settings}

    def _open_manifest(self) -> None:
        """Check an existing manifest against this run's content, or write the first manifest."""
        path = mf.manifest_path(self.root)
        if path.exists():
            self.manifest = mf.load_manifest(self.root)
            stored = {key: self.manifest.get(key) for key in self._content()}
            difference = mf.first_difference(stored, self._content())
            if difference is None:
                logger.info("resuming cache %s", self.root)
                return
            if holds_written_data(self.root):
                mf.check_same_content(self.root, stored, self._content())
            self._start_over(difference)
            return

        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"cache path {self.root} is a file: pass a folder path")
        self.root.mkdir(parents=True, exist_ok=True)
        others = [p.name for p in self.root.iterdir() if not p.name.startswith(TEMP_PREFIX)]
        if others:
            raise UsageError(
                f"cache folder {self.root} is not empty and has no {mf.MANIFEST_NAME} "
                f"(found {sorted(others)[:5]}): pass an empty or new folder"
            )

        self.manifest = {"schema_version": mf.SCHEMA_VERSION, "created": _now(), "complete": False, **self._content()}
        mf.write_manifest(self.root, self.manifest)
        logger.info("created cache %s (format %s)", self.root, self.fmt)

    def _start_over(self, difference: tuple) -> None:
        """Replace the settings of a cache that contains no finished shard and no codec state.

        A run that failed before its first shard, for example while fitting the codec, leaves
        nothing worth keeping, so a rerun with corrected settings reuses the folder. The new
        manifest replaces the old one atomically before the unrecorded files are removed.
        """
        key, old, new = difference
        logger.warning(
            "cache %s contains no finished shard or codec state: starting it over with this run's "
            "settings (%s was %s, now %s)", self.root, key, json.dumps(old), json.dumps(new),
        )
        self.manifest = {"schema_version": mf.SCHEMA_VERSION, "created": _now(), "complete": False, **self._content()}
        mf.write_manifest(self.root, self.manifest)
        for name in UNRECORDED_ENTRIES:
            entry = self.root / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()

    def finished_shards(self) -> set[int]:
        """Return the ids of shards with a finished record whose files all exist."""
        return {record.shard_id for record in self._finished_records()}

    def _finished_records(self) -> list[ShardRecord]:
        records = [self._finished_record(path) for path in sorted(self.shards_dir.glob("shard_*.done.json"))]
        return [record for record in records if record is not None]

    def _finished_record(self, path: Path) -> ShardRecord | None:
        """Return the record at ``path``, or None when it is absent or one of its files is missing."""
        if not path.is_file():
            return None
        record = ShardRecord.from_json(mf.read_json(path))
        missing = [name for name in record.files if not (self.root / name).is_file()]
        if missing:
            logger.warning("shard %s is recorded but %s is missing: it will be written again", record.name, missing[0])
            return None
        return record

    def write_shard(
        self, shard_id: int, data: ShardData, image_range: tuple[int, int], num_images: int
    ) -> ShardRecord:
        """Write one whole shard (all views, view-major) and record it as finished.

        The shard goes to a temp folder first, is synced and hashed, then renamed into place; its
        record ``shards/<name>.done.json`` is written last. Raises ValueError for data that does
        not fit the cache layout or a shard that is already finished.
        """
        name = shard_name(shard_id)
        self.layout.check_shard(data, num_images, image_range)
        done = mf.done_record_path(self.root, name)
        if self._finished_record(done) is not None:
            raise ValueError(f"shard {name} of {self.root} is already finished: skip the ids in finished_shards()")
        done.unlink(missing_ok=True)  # a record whose files are gone
        crc32 = shard_crc32(data)

        tmp = temp_path(self.shards_dir / name)
        tmp.mkdir()
        try:
            files = self._write_shard_files(tmp, name, data, crc32, num_images)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        record = ShardRecord(
            shard_id=shard_id,
            name=name,
            num_images=num_images,
            num_samples=len(data),
            image_range=(int(image_range[0]), int(image_range[1])),
            files=files,
            nbytes=sum((self.root / path).stat().st_size for path in files),
        )
        atomic_write_json(mf.done_record_path(self.root, name), record.to_json())
        logger.debug("wrote shard %s: %d samples, %d bytes", name, len(data), record.nbytes)
        return record

    def _write_shard_files(
        self, tmp: Path, name: str, data: ShardData, crc32: np.ndarray, num_images: int
    ) -> dict[str, str]:
        """Write, sync, hash and move the shard files into place, and return {relative path: sha256}."""
        if self.fmt == "zarr":
            write_zarr_shard(tmp, data, crc32, num_images, self.layout)
            fsync_tree(tmp)
            files = hash_tree(tmp, f"shards/{name}")

            final = self.shards_dir / name
            if final.exists():
                shutil.rmtree(final)  # an unrecorded shard of a killed run
            os.rename(tmp, final)
        else:
            tars = write_wds_shard(tmp, name, data, crc32, num_images, self.layout)
            fsync_tree(tmp)
            files = hash_tree(tmp, "shards")
            for tar in tars:
                os.replace(tar, self.shards_dir / tar.name)
            tmp.rmdir()

        fsync_dir(self.shards_dir)
        return files

    def write_codec_state(self, state: dict[str, np.ndarray]) -> None:
        """Write the fitted codec state once, atomically, to ``codec/``.

        Writing the same state again is a no-op. Writing a different state raises ValueError,
        because the shards already written were encoded with the first one. Only one process
        (rank 0) may call this; the others read the state after a barrier.
        """
        existing = self.read_codec_state()
        if existing is not None:
            if _same_state(existing, state):
                return
            raise ValueError(f"cache {self.root} already has a different codec state in codec/")

        final = self.root / "codec"
        tmp = temp_path(final)
        try:
            write_codec_group(tmp, {key: np.asarray(value) for key, value in state.items()})
            fsync_tree(tmp)
            files = hash_tree(tmp, "codec")
            if final.exists():
                shutil.rmtree(final)  # unrecorded codec state of a killed run
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        fsync_dir(self.root)
        atomic_write_json(self.root / mf.CODEC_RECORD_NAME, {"files": files})

    def read_codec_state(self) -> dict[str, np.ndarray] | None:
        """Return the recorded codec state, or None when none was written yet."""
        if not (self.root / mf.CODEC_RECORD_NAME).is_file():
            return None
        return read_codec_group(self.root / "codec")

    def finalize(self, extra: dict, *, expected_shards: int | None = None) -> dict:
        """Gather the shard records into the final manifest, write it atomically and return it.

        ``extra`` adds entries such as counts, skipped inputs, fidelity and package versions.
        With ``expected_shards``, a UsageError lists the shard ids in ``range(expected_shards)``
        without a finished record. Call it from one process after every writer has finished.
        """
        clash = sorted(RESERVED_KEYS & set(extra))
        if clash:
            raise ValueError(f"finalize extra must not set the manifest keys {clash}")

        records = sorted(self._finished_records(), key=lambda record: record.shard_id)
        if expected_shards is not None:
            missing = sorted(set(range(expected_shards)) - {record.shard_id for record in records})
            if missing:
                raise UsageError(
                    f"cache {self.root} is missing shards {missing[:10]} ({len(missing)} in all): "
                    "rerun cache-targets with the same settings to write them"
                )

        manifest = self._final_manifest(records, mf.to_json_value(extra))
        mf.write_manifest(self.root, manifest)
        if self.fmt == "zarr":
            zarr.open_group(store=str(self.root), mode="a", zarr_format=3).attrs.put({"maskdistill": manifest})
        self.manifest = manifest
        logger.info("finalized cache %s: %d shards, %d samples", self.root, len(records), manifest["num_samples"])
        return manifest

    def _final_manifest(self, records: list[ShardRecord], extra: dict) -> dict:
        codec_record = self.root / mf.CODEC_RECORD_NAME
        return {
            "schema_version": mf.SCHEMA_VERSION,
            "created": self.manifest.get("created", _now()),
            "finalized": _now(),
            "complete": True,
            **self._content(),
            "codec_state": mf.read_json(codec_record) if codec_record.is_file() else None,
            "num_shards": len(records),
            "num_images": sum(record.num_images for record in records),
            "num_samples": sum(record.num_samples for record in records),
            **extra,
            "shards": [record.to_json() for record in records],
        }


def _ensure_group(folder: Path) -> None:
    """Create a zarr v3 group at ``folder`` unless there is one; a concurrent creator is fine."""
    try:
        zarr.open_group(store=str(folder), mode="a", zarr_format=3)
    except zarr.errors.ContainsGroupError:
        pass


def _same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        old, new = np.asarray(a[key]), np.asarray(b[key])
        if old.dtype != new.dtype or not np.array_equal(old, new):
            return False
    return True
