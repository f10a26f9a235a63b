"""Atomic file writes: a temp file in the same folder, fsync, rename, fsync of the folder.

A reader sees either the previous file or the complete new one, never a partial write, and the
rename survives a power loss once the folder is synced. Temp names have the form
``.tmp-<name>-<pid>-<token>@<host>`` so that a later run can tell a leftover of a killed process
from the live temp file of a concurrent writer (see ``remove_stale_temps``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(?P<name>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})@(?P<host>[A-Za-z0-9._-]+)$")


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""errno values of a write that failed for lack of space: device full or disk quota exceeded."""


def is_disk_full(error: BaseException) -> bool:
    """Check whether `error` is an OSError for a full device or an exceeded disk quota."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


@contextmanager
def naming_disk_full(path: Path) -> Iterator[None]:
    """Re-raise a disk-full OSError that names no file (as from ``write``) as one that names ``path``."""
    try:
        yield
    except OSError as error:
        if is_disk_full(error) and error.filename is None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
        raise


def host_name() -> str:
    """Return this machine's host name with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temp_path(path: Path) -> Path:
    """Return a fresh temp path beside ``path``, named after it, this process and this host."""
    path = Path(path)
    token = secrets.token_hex(4)
    return path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{token}@{host_name()}"


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new, renamed or removed files) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (``folder`` included) to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_open(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file that replaces ``path`` when the block exits without an exception.

    On an exception the temp file is removed and ``path`` keeps its previous content. A disk-full
    error is re-raised naming ``path``.
    ``mode`` is "wb" for bytes or "w" (same as "wt") for text.
    """
    path = Path(path)
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_open needs mode 'wb', 'w' or 'wt', got {mode!r}")

    tmp = temp_path(path)
    try:
        with naming_disk_full(path), open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``obj`` serialized as JSON (with a trailing newline) atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """Return whether ``path`` is a temp file or folder left by a dead process on this host.

    Temp entries of other hosts are never stale here, because a process id cannot be checked
    across machines that share a file system.
    """
    match = _TEMP_NAME.match(Path(path).name)
    if match is None:
        return False
    if match["host"] != host_name():
        return False
    return not _pid_alive(int(match["pid"]))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files and folders in ``folder`` that dead processes on this host left behind.

    Returns the removed paths. Temp entries of live processes and of other hosts are kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []

    removed = []
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        if not is_stale_temp(entry):
            logger.debug("keeping temp entry %s of a live process or another host", entry)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("removed %s left behind by a killed run", entry)

    if removed:
        fsync_dir(folder)
    return removed
