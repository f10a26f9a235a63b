"""Input sources: an image folder or webdataset tar shards, indexed once in a stable order.

`open_source` accepts a folder of images (searched recursively), a `.tar` shard, a folder whose
top level contains `.tar` shards, or a brace pattern such as `data/shard-{000..009}.tar`. Every
usable sample gets a position in the index. That position, not a file name, is its sample id
and cache key.

A folder's index is sorted by the bytes of the relative paths. Image files are recognized by
the extensions Pillow can open, case-insensitively. The content is checked only when the image
is decoded, so an HTML page named .jpg is indexed here and skipped by `load_image` with the
reason. Symlinked folders are followed, and a folder reached twice (a link loop or a second
link to the same folder) is skipped, keeping the real path over a link. Tar shards are indexed
in the order given (sorted file names for a folder of shards), and samples in member order.
Anything unusable while indexing is kept in
`ImageSource.skipped` as (path, reason): OS junk files, dangling links, empty files, files with
other extensions, unreadable folders, and for tar input truncated or empty shards and samples
without an image.

Relative paths keep undecodable bytes as surrogate escapes (PEP 383), so `os.fsencode(source)`
returns the original bytes. Encode `source` with errors="surrogateescape" when writing it, or
store `printable_source(source)` where only valid UTF-8 text fits (zarr string arrays).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import tarfile
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand
from PIL import Image

from pipeline.errors import BadImageError, UsageError

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
"""Webdataset fields that contain the image, in order of preference when a sample has several."""

LABEL_FIELD = "cls"

_OS_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})

_NOT_IMAGE_REASONS = (
    "os junk file",
    "not a regular file",
    "not an image file extension",
    "folder already indexed as",
    "symlink loop",
)
"""Prefixes of skip reasons for entries that were never image inputs; see `is_bad_input`."""

_IDENTIFY_ONLY_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "MPEG"})
"""Formats that Pillow recognizes but has no pixel decoder for, so their files are not images here."""


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One usable input sample."""

    index: int  # position in the sorted index, the stable sample id
    key: str  # f"{index:09d}": cache keys come from the index, never from file names
    source: str  # relative path, or "shard.tar::member" for tar input
    label: int | None  # webdataset ".cls" value if present, else None


@dataclass
class ImageSource:
    """An indexed input: its records, what was skipped, and random access to the encoded bytes.

    Built by `open_source`. It contains only plain data (no open files), so it pickles into
    DataLoader workers.
    """

    path: str  # the input as given to open_source
    kind: str  # "folder" or "tar"
    records: list[SourceRecord]
    skipped: list[tuple[str, str]]  # (path, reason)
    _files: list[str] = field(repr=False)  # absolute paths: one per image, or one per tar shard
    _locations: list[tuple[int, int, int]] = field(repr=False)  # per record: (file id, byte offset, size)

    def __len__(self) -> int:
        return len(self.records)

    def read_bytes(self, record: SourceRecord) -> bytes:
        """Read the encoded image of `record`: the whole file, or the tar member at its offset.

        Raises BadImageError when the file can no longer be read, or a shard is shorter than
        when it was indexed.
        """
        file_id, offset, size = self._locations[record.index]
        path = self._files[file_id]
        try:
            with open(path, "rb") as file:
                if self.kind == "folder":
                    return file.read()
                file.seek(offset)
                data = file.read(size)
        except OSError as error:
            raise BadImageError(f"cannot read {record.source}: {error.strerror or error}") from error

        if len(data) != size:
            raise BadImageError(f"tar member {record.source} is truncated: read {len(data)} of {size} bytes")
        return data

    def fingerprint(self) -> str:
        """SHA-256 hex digest over every record's source and size, in index order.

        Two sources with the same fingerprint give the same sample ids to the same bytes
        (checked by size, not content), which is what resuming a cache needs.
        """
        digest = hashlib.sha256()
        digest.update(f"{self.kind}\n".encode())
        for record, (_, _, size) in zip(self.records, self._locations, strict=True):
            digest.update(record.source.encode("utf-8", "surrogateescape"))
            digest.update(f"\0{size}\n".encode())
        return digest.hexdigest()


def is_bad_input(reason: str) -> bool:
    """Tell a broken or missing input (True) from a skipped entry that is not an image, such as a .txt file.

    Broken inputs are empty or undecodable images, dangling links, damaged shards and samples
    without an image. Only they count against `--max-bad-fraction` and stop a `--strict` run.
    """
    return not reason.startswith(_NOT_IMAGE_REASONS)


def printable_source(source: str) -> str:
    """Return `source` as valid UTF-8 text, with each undecodable byte of a file name written as \\xNN."""
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_source(path: str | Path) -> ImageSource:
    """Index an image folder, a tar shard, a folder of tar shards or a brace pattern of shards.

    Raises UsageError when the path does not exist, a shard of a pattern is missing, a folder
    mixes shards and images at its top level, or no usable image is found.
    """
    text = os.fspath(path)
    if not os.path.exists(text) and "{" in text:
        return _open_tar_source(text, _expand_shard_pattern(text))
    if not os.path.exists(text):
        raise UsageError(
            f"input path not found: {text}. Pass an image folder, a .tar shard, a folder of .tar shards, "
            "or a brace pattern like data/shard-{000..009}.tar"
        )

    if os.path.isfile(text):
        if not text.lower().endswith(".tar"):
            raise UsageError(f"input file {text} is not a .tar shard: pass an image folder or webdataset .tar shards")
        return _open_tar_source(text, [text])

    shards = _top_level_shards(text)
    if shards:
        return _open_tar_source(text, shards)
    return _open_folder_source(text)


def _open_folder_source(root: str) -> ImageSource:
    found, skipped = _walk_folder(root)
    found.sort(key=lambda item: os.fsencode(item[0]))

    records, files, locations = [], [], []
    for index, (relative, size) in enumerate(found):
        records.append(SourceRecord(index=index, key=f"{index:09d}", source=relative, label=None))
        files.append(os.path.join(os.path.abspath(root), relative))
        locations.append((index, 0, size))

    source = ImageSource(root, "folder", records, skipped, files, locations)
    _check_not_empty(source)
    _log_summary(source)
    return source


def _walk_folder(root: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Find image files under `root`, following each symlinked folder once.

    Returns (relative path, size) of each image file and (relative path, reason) of each
    skipped entry. Folders are identified by (st_dev, st_ino). Real folders are walked first
    and symlinked folders afterwards, so a link to a folder inside the tree is the one skipped,
    and a link back to an ancestor is reported as a loop instead of being followed.
    """
    root_stat = os.stat(root)
    root_identity = (root_stat.st_dev, root_stat.st_ino)
    visited = {root_identity: "."}
    found: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    # Each folder to walk carries the ids of its ancestors, to tell a loop from a duplicate.
    real_folders = [("", frozenset({root_identity}))]
    linked_folders: deque[tuple[str, frozenset[tuple[int, int]], tuple[int, int]]] = deque()

    while real_folders or linked_folders:
        if real_folders:
            folder, ancestors = real_folders.pop()
        else:
            folder, ancestors, identity = linked_folders.popleft()
            if identity in ancestors:
                skipped.append((folder, f"symlink loop: links back to {visited[identity]}"))
                continue
            if identity in visited:
                skipped.append((folder, f"folder already indexed as {visited[identity]}"))
                continue
            visited[identity] = folder
            ancestors = ancestors | {identity}

        files, folder_skipped, subfolders = _scan_folder(root, folder)
        found.extend(files)
        skipped.extend(folder_skipped)
        new_real_folders = []
        for relative, identity, is_link in subfolders:
            if is_link:
                linked_folders.append((relative, ancestors, identity))
            elif identity not in visited:
                visited[identity] = relative
                new_real_folders.append((relative, ancestors | {identity}))
            else:  # a bind mount or another folder reachable twice without a symlink
                skipped.append((relative, f"folder already indexed as {visited[identity]}"))
        real_folders.extend(reversed(new_real_folders))  # a stack: pop them in sorted order
    return found, skipped


def _scan_folder(
    root: str, folder: str
) -> tuple[list[tuple[str, int]], list[tuple[str, str]], list[tuple[str, tuple[int, int], bool]]]:
    """Sort the entries of one folder into image files, skipped entries and subfolders.

    Subfolders come as (relative path, (st_dev, st_ino), is a symlink). Every list is in
    sorted byte order of the names.
    """
    files, skipped, subfolders = [], [], []
    try:
        entries = sorted(os.scandir(os.path.join(root, folder)), key=lambda entry: os.fsencode(entry.name))
    except OSError as error:
        return [], [(folder or ".", f"cannot list folder: {error.strerror or error}")], []

    extensions = _image_extensions()
    for entry in entries:
        relative = f"{folder}/{entry.name}" if folder else entry.name
        if _is_os_junk(entry.name):
            skipped.append((relative, "os junk file"))
            continue

        try:
            info = os.stat(entry.path)
        except OSError as error:
            skipped.append((relative, _stat_failure(entry, error)))
            continue

        if stat.S_ISDIR(info.st_mode):
            subfolders.append((relative, (info.st_dev, info.st_ino), entry.is_symlink()))
        elif not stat.S_ISREG(info.st_mode):
            skipped.append((relative, "not a regular file"))
        elif os.path.splitext(entry.name)[1].lower() not in extensions:
            skipped.append((relative, "not an image file extension"))
        elif info.st_size == 0:
            skipped.append((relative, "empty file (0 bytes)"))
        else:
            files.append((relative, info.st_size))
    return files, skipped, subfolders


def _stat_failure(entry: os.DirEntry, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if error.errno == errno.ENOENT and entry.is_symlink():
        return f"dangling symlink: target {os.readlink(entry.path)} not found"
    return f"cannot stat: {error.strerror or error}"


def _is_os_junk(name: str) -> bool:
    return name.lower() in _OS_JUNK_NAMES or name.startswith("._")


@cache
def _image_extensions() -> frozenset[str]:
    """Lower-case extensions, with the dot, of every format this Pillow build can open."""
    registered = Image.registered_extensions()  # loads every plugin, which fills Image.OPEN
    readable = set(Image.OPEN) - _IDENTIFY_ONLY_FORMATS
    return frozenset(extension for extension, name in registered.items() if name in readable)


def _top_level_shards(folder: str) -> list[str]:
    """Sorted .tar files directly in `folder`. Raises UsageError if image files sit beside them."""
    shards, images = [], []
    extensions = _image_extensions()
    for entry in os.scandir(folder):
        extension = os.path.splitext(entry.name)[1].lower()
        if _is_os_junk(entry.name) or not _is_file(entry):
            continue
        if extension == ".tar":
            shards.append(entry.path)
        elif extension in extensions:
            images.append(entry.name)

    if shards and images:
        raise UsageError(
            f"folder {folder} contains both .tar shards and image files (for example {images[0]!r}): "
            "pass the shards as a brace pattern, or move them to their own folder"
        )
    return sorted(shards, key=os.fsencode)


def _is_file(entry: os.DirEntry) -> bool:
    """Check whether the entry is a regular file or a link to one. A broken link counts as not a file."""
    try:
        return entry.is_file()
    except OSError:  # a symlink loop raises ELOOP
        return False


def _expand_shard_pattern(pattern: str) -> list[str]:
    shards = list(braceexpand(pattern))
    not_tar = [shard for shard in shards if not shard.lower().endswith(".tar")]
    if not_tar:
        raise UsageError(f"brace pattern {pattern} names files that are not .tar shards, such as {not_tar[0]}")
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"{len(missing)} of {len(shards)} shards of {pattern} not found: {listed}")
    return shards


def _open_tar_source(path: str, shards: list[str]) -> ImageSource:
    base = os.path.commonpath([os.path.dirname(os.path.abspath(shard)) for shard in shards])

    records, skipped, locations = [], [], []
    files = [os.path.abspath(shard) for shard in shards]
    for file_id, shard in enumerate(files):
        samples, shard_skipped = _index_shard(shard, os.path.relpath(shard, base))
        skipped.extend(shard_skipped)
        for member_source, offset, size, label in samples:
            index = len(records)
            records.append(SourceRecord(index=index, key=f"{index:09d}", source=member_source, label=label))
            locations.append((file_id, offset, size))

    source = ImageSource(path, "tar", records, skipped, files, locations)
    _check_not_empty(source)
    _log_summary(source)
    return source


@dataclass
class _Sample:
    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # field name -> member


def _index_shard(shard: str, shard_name: str) -> tuple[list[tuple[str, int, int, int | None]], list[tuple[str, str]]]:
    """Index one shard: (source, offset, size, label) per sample with an image, and the skipped entries.

    Members are grouped by webdataset key: the member name up to the first dot of its base
    name, so "train.v2/abc.seg.png" has key "train.v2/abc" and field "seg.png".
    """
    skipped: list[tuple[str, str]] = []
    shard_size = os.path.getsize(shard)
    if shard_size == 0:
        return [], [(shard_name, "empty shard (0 bytes)")]

    samples, error = _read_members(shard, shard_name, shard_size, skipped)
    if error is not None:
        skipped.append((shard_name, error))
    if not samples and error is None:
        skipped.append((shard_name, "empty shard: no members"))

    indexed = []
    with open(shard, "rb") as file:
        for sample in samples:
            entry = _index_sample(file, shard_name, sample, skipped)
            if entry is not None:
                indexed.append(entry)
    return indexed, skipped


def _read_members(
    shard: str, shard_name: str, shard_size: int, skipped: list[tuple[str, str]]
) -> tuple[list[_Sample], str | None]:
    """Group the complete regular members of a shard by key, in order of first appearance.

    Returns the samples and, for a shard that ends early or contains garbage, the reason. The
    samples read before the damage are kept.
    """
    samples: dict[str, _Sample] = {}
    members_read = 0
    try:
        with tarfile.open(shard, mode="r:") as archive:
            try:
                for member in archive:
                    members_read += 1
                    if member.isfile():
                        _add_member(samples, shard_name, member, shard_size, skipped)
            except tarfile.ReadError as error:
                return list(samples.values()), f"truncated shard after {members_read} members: {error}"
            end = archive.offset
    except tarfile.ReadError as error:
        return [], f"not a readable uncompressed tar file: {error}"

    # tarfile stops quietly at an invalid header after the first member, so check that only
    # the zero padding of the end-of-archive marker follows.
    if not _only_zeros_after(shard, end):
        return list(samples.values()), f"invalid tar header at byte {end}, so the rest of the shard is ignored"
    return list(samples.values()), None


def _add_member(
    samples: dict[str, _Sample],
    shard_name: str,
    member: tarfile.TarInfo,
    shard_size: int,
    skipped: list[tuple[str, str]],
) -> None:
    source = f"{shard_name}::{member.name}"
    directory, _, base_name = member.name.rpartition("/")
    stem, dot, extension = base_name.partition(".")
    if not stem or not dot or not extension:
        skipped.append((source, "member name has no webdataset key and extension"))
        return
    if member.offset_data + member.size > shard_size:
        skipped.append((source, "member data is cut off by the end of the shard"))
        return

    key = f"{directory}/{stem}" if directory else stem
    sample = samples.setdefault(key, _Sample(key))
    field_name = extension.lower()
    if field_name in sample.members:
        skipped.append((source, f"duplicate field {field_name!r} for key {key!r}"))
        return
    sample.members[field_name] = member


def _index_sample(
    file: BinaryIO, shard_name: str, sample: _Sample, skipped: list[tuple[str, str]]
) -> tuple[str, int, int, int | None] | None:
    image_field = next((name for name in IMAGE_FIELDS if name in sample.members), None)
    if image_field is None:
        fields = ", ".join(sorted(sample.members))
        skipped.append((f"{shard_name}::{sample.key}", f"sample has no image field (fields: {fields})"))
        return None

    image = sample.members[image_field]
    source = f"{shard_name}::{image.name}"
    if image.size == 0:
        skipped.append((source, "empty image member (0 bytes)"))
        return None

    label = None
    if LABEL_FIELD in sample.members:
        member = sample.members[LABEL_FIELD]
        file.seek(member.offset_data)
        text = file.read(member.size).decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            skipped.append((source, f"invalid .cls label {text[:40]!r}: expected an integer"))
            return None
    return source, image.offset_data, image.size, label


def _only_zeros_after(path: str, offset: int, chunk_size: int = 1 << 16) -> bool:
    with open(path, "rb") as file:
        file.seek(offset)
        while chunk := file.read(chunk_size):
            if chunk.count(0) != len(chunk):
                return False
    return True


def _check_not_empty(source: ImageSource) -> None:
    if source.records:
        return
    reasons = count_reasons(source.skipped)
    detail = f" ({len(source.skipped)} entries skipped: {reasons})" if source.skipped else ""
    raise UsageError(
        f"no images found under {source.path}{detail}. Image files are searched recursively, "
        ".tar shards only at the top level of a folder"
    )


def _log_summary(source: ImageSource) -> None:
    logger.info("indexed %d images from %s (%s)", len(source), source.path, source.kind)
    if source.skipped:
        logger.info("skipped %d entries while indexing: %s", len(source.skipped), count_reasons(source.skipped))


def count_reasons(skipped: Iterable[tuple[str, str]]) -> str:
    """Summarize reasons by their text before the first colon or bracket, most common first."""
    counts = Counter(re.split(r"[:(]", reason)[0].strip() for _, reason in skipped)
    return ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
