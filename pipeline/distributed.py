"""The process group of a torchrun launch, read from its environment variables.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process. A
run with none of them is a single process. A run with only some of them is rejected, because a
half-set environment usually means a launcher mistake that would otherwise train each process
alone on the whole data.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UsageError

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for the other ranks before it raises, e.g. when one rank has stalled.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
# The accepted --device strings. Other strings that torch accepts (mps, xpu, cpu:0) are rejected,
# because the stages are tested on CPU and CUDA only.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process; rank 0 of 1 outside torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def read_torchrun_env() -> DistInfo:
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return DistInfo()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UsageError(
            f"torchrun environment is incomplete: {', '.join(missing)} not set "
            f"(found {', '.join(present)}); launch with torchrun or unset these variables"
        )
    return DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def check_device(requested: str) -> None:
    """Raise UsageError unless `requested` is one of the accepted forms: auto, cpu, cuda or cuda:N."""
    if DEVICE_PATTERN.fullmatch(requested) is None:
        raise UsageError(f"invalid --device {requested!r}: use auto, cpu, cuda or cuda:N (N is a GPU index)")


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """Map "auto", "cpu", "cuda" or "cuda:N" to a device; torchrun ranks get GPU LOCAL_RANK.

    Raises UsageError for any other string, for a CUDA device when CUDA is not available, and
    for a GPU index that is not visible.
    """
    check_device(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")

    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {requested}: CUDA is not available on this machine; use --device cpu or --device auto"
        )
    count = torch.cuda.device_count()
    if requested != "cuda":
        if info.enabled:
            raise UsageError(
                f"--device {requested} would put all {info.world_size} torchrun processes on one GPU; "
                "pass --device cuda so that each process uses GPU LOCAL_RANK (select GPUs with CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device(requested)
        if device.index >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {requested}: GPU not found, the visible GPUs are {visible}; pass one of them")
        return device

    if info.local_rank >= count:
        raise UsageError(
            f"torchrun process with LOCAL_RANK {info.local_rank} has no GPU of its own: {count} GPUs are visible; "
            f"pass --nproc_per_node {count} or fewer"
        )
    return torch.device("cuda", info.local_rank)


def bind_device(device: torch.device) -> None:
    """Make `device` the current CUDA device, so pinned-memory threads and NCCL use it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def init_process_group(info: DistInfo, device: torch.device) -> bool:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); return whether this call joined it.

    Returns False for a single process and when the caller already joined a group.
    """
    if not info.enabled or dist.is_initialized():
        return False
    bind_device(device)
    if device.type == "cuda":
        dist.init_process_group(backend="nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    logger.info("joined process group: rank %d of %d, backend %s", info.rank, info.world_size, dist.get_backend())
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Return the sum of `value` over all processes (a copy; `value` itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def destroy_process_group() -> None:
    """Leave the process group; safe to call when none was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
