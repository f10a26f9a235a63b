"""Setup of the DataLoader worker processes shared by the stage-one and training loaders."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from typing import Callable

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent_init() -> Callable[[int], None]:
    """Return a `worker_init_fn` that makes each loader worker exit when this process dies.

    torch 2.14's worker loop checks for a dead parent only between batches. After a parent
    killed with SIGKILL or SIGTERM, a worker whose batches fill the pipe to it notices that,
    then blocks at exit while its queue waits to flush into the pipe that no process reads, and
    outlives the run. On Linux the kernel kills each worker when the thread that started it
    exits, so the loader must be iterated by a thread that lives as long as the loader.
    Elsewhere the workers keep only torch's own check.
    """
    return functools.partial(_exit_with_parent, os.getpid())


def _exit_with_parent(parent_pid: int, worker_id: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        logger.warning("loader worker %d: prctl(PR_SET_PDEATHSIG) failed: %s", worker_id, os.strerror(error))
        return
    # the parent may have died before prctl took effect
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
