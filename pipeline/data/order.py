"""The order in which an epoch visits samples, and how it is split across processes.

Samples come in groups (cache shards, or the same ranges of images when the teacher runs
online), and a group is read in whole chunks. One epoch's order is a pure function of
(seed, epoch, groups):

1. the groups are permuted;
2. consecutive groups are joined into windows of `window` groups, and the samples inside a
   window are permuted, so batches mix several shards while a worker keeps only one window of
   shards in memory;
3. the sequence is cut into global batches of `global_batch` samples, the last one possibly
   shorter;
4. with `world_size` processes, rank r takes the r-th contiguous slice of every global batch;
5. the loader interleaves the batches in `streams` runs (`interleave_streams`), one per
   DataLoader worker, so that each worker reads the shards of its own windows.

Every sample appears exactly once per epoch, every rank gets the same number of batches, and
no batch is empty. With the same stream count, the union of the ranks' batches k is the
single-process batch k for any number of processes. A last global batch with fewer samples than
ranks cannot give every rank a sample, so those few samples join the previous batch instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDER_STREAM = 0x4F524452
# Groups per window. CachedViews keeps this many shard view slices per worker, which is enough to
# read each slice once per epoch and bounds the loader's memory.
SHARD_WINDOW = 4


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch for one rank, as arrays of sample ids."""

    batches: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.batches)


def epoch_order(groups: list[np.ndarray], seed: int, epoch: int, window: int = SHARD_WINDOW) -> np.ndarray:
    """Return all sample ids of an epoch in visiting order (steps 1 and 2 above)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, ORDER_STREAM, epoch]))
    group_order = rng.permutation(len(groups))

    pieces = []
    for start in range(0, len(group_order), window):
        members = [groups[g] for g in group_order[start : start + window]]
        samples = np.concatenate(members) if members else np.empty(0, dtype=np.int64)
        pieces.append(rng.permutation(samples))
    if not pieces:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(pieces).astype(np.int64)


def global_batch_bounds(num_samples: int, global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """Cut [0, num_samples) into global batches that give every rank at least one sample."""
    bounds = [(start, min(start + global_batch, num_samples)) for start in range(0, num_samples, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def rank_slice(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the contiguous part of the global batch [start, stop) that belongs to `rank`."""
    size = stop - start
    lo = start + (size * rank) // world_size
    hi = start + (size * (rank + 1)) // world_size
    return lo, hi


def plan_epoch(
    groups: list[np.ndarray],
    seed: int,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    window: int = SHARD_WINDOW,
) -> EpochPlan:
    """Return the batches of `rank` for one epoch; `batch_size` is per rank."""
    order = epoch_order(groups, seed, epoch, window)
    if order.size < world_size:
        return EpochPlan([])
    bounds = global_batch_bounds(order.size, batch_size * world_size, world_size)

    batches = []
    for start, stop in bounds:
        lo, hi = rank_slice(start, stop, rank, world_size)
        batches.append(order[lo:hi])
    return EpochPlan(batches)


def interleave_streams(batches: list[np.ndarray], streams: int) -> list[np.ndarray]:
    """Reorder one epoch's batches as `streams` interleaved runs of consecutive batches (step 5 above).

    The batches are cut into `streams` contiguous runs, longer runs first, and the result takes
    batch i of every run before batch i + 1 of any. A DataLoader with `streams` workers sends
    its p-th batch to worker p mod `streams`, so each worker gets one run and reads the shard
    slices of its windows once. Without this, every worker would read every slice and use
    1/`streams` of its samples. One stream keeps the order.
    """
    if streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    runs = np.array_split(np.arange(len(batches)), streams)
    longest = len(runs[0])
    order = [int(run[i]) for i in range(longest) for run in runs if i < len(run)]
    return [batches[k] for k in order]


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Number of batches every rank gets per epoch, known before any data is read."""
    if num_samples < world_size:
        return 0
    return len(global_batch_bounds(num_samples, batch_size * world_size, world_size))
