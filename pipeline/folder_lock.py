"""An exclusive lock on an output folder, which stops a second command from writing into it."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from pipeline.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""flock errors of file systems without lock support, as opposed to a lock held by another process."""


class FolderLock:
    """An advisory lock (flock) on a folder, held from acquire() until release() or process exit.

    The lock is on the folder itself, so it adds no file to it. Forked DataLoader workers share
    the lock until they exit. NOTE: flock is reliable on local file systems. On a network file
    system it may lock only on one machine, or not at all.
    """

    def __init__(self) -> None:
        self._descriptor: int | None = None

    def acquire(self, folder: Path, option: str) -> None:
        """Create `folder` if needed and lock it; raise UsageError when another process holds the lock."""
        folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            logger.warning("cannot lock %s: this platform has no flock, so nothing stops a second command "
                           "from writing the same folder", folder)
            return
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in UNSUPPORTED_ERRNOS:
                # some FUSE and network file systems implement no flock, so the run goes on unlocked
                logger.warning(
                    "cannot lock %s (%s): this file system has no flock, so nothing stops a second "
                    "command from writing the same folder", folder, os.strerror(error.errno),
                )
                return
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UsageError(
                f"{option} {folder} is in use by another process that writes it: wait until that command "
                "ends or stop it, then run again, or choose another folder. After a killed torchrun, "
                "its ranks may still run"
            ) from error
        self._descriptor = descriptor
        logger.debug("locked %s", folder)

    def release(self) -> None:
        """Release the lock; a lock never acquired or already released is a no-op."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
