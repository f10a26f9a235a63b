import numpy as np
import pytest

from pipeline.data.order import batches_per_epoch, epoch_order, interleave_streams, plan_epoch


def make_groups(sizes):
    groups, start = [], 0
    for size in sizes:
        groups.append(np.arange(start, start + size))
        start += size
    return groups


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[10, 10, 7], [64], [5, 5, 5, 5, 5, 5, 5, 1], [3]])
def test_each_sample_once_per_epoch(world_size, sizes):
    groups = make_groups(sizes)
    total = sum(sizes)
    plans = [plan_epoch(groups, seed=0, epoch=1, batch_size=4, rank=r, world_size=world_size) for r in range(world_size)]
    if total < world_size:
        assert all(len(plan) == 0 for plan in plans)
        assert batches_per_epoch(total, 4, world_size) == 0
        return
    seen = np.concatenate([b for plan in plans for b in plan.batches])
    assert sorted(seen.tolist()) == list(range(total))
    lengths = {len(plan) for plan in plans}
    assert len(lengths) == 1
    assert lengths.pop() == batches_per_epoch(total, 4, world_size)
    assert all(len(b) > 0 for plan in plans for b in plan.batches)


def test_ranks_split_the_single_process_batches():
    groups = make_groups([13, 9, 20])
    single = plan_epoch(groups, seed=1, epoch=0, batch_size=8, rank=0, world_size=1)
    halves = [plan_epoch(groups, seed=1, epoch=0, batch_size=4, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(halves[0])
    for k, batch in enumerate(single.batches):
        joined = np.concatenate([halves[0].batches[k], halves[1].batches[k]])
        assert np.array_equal(batch, joined)


def test_order_changes_with_epoch_and_is_reproducible():
    groups = make_groups([50, 50])
    assert np.array_equal(epoch_order(groups, 0, 3), epoch_order(groups, 0, 3))
    assert not np.array_equal(epoch_order(groups, 0, 3), epoch_order(groups, 0, 4))


def test_window_limits_mixing_to_nearby_groups():
    groups = make_groups([100] * 8)
    order = epoch_order(groups, seed=0, epoch=0, window=2)
    # the first 200 samples come from exactly two groups
    assert len(np.unique(order[:200] // 100)) == 2


@pytest.mark.parametrize("streams", [1, 2, 3, 5])
def test_interleave_keeps_each_batch_once(streams):
    batches = [np.array([k]) for k in range(11)]
    order = [int(batch[0]) for batch in interleave_streams(batches, streams)]
    assert sorted(order) == list(range(11))
    # the DataLoader sends batch p to worker p mod streams: each worker gets consecutive batches
    for worker in range(streams):
        mine = order[worker::streams]
        assert mine == list(range(mine[0], mine[0] + len(mine)))


def test_interleave_with_one_stream_keeps_order():
    batches = [np.array([k]) for k in range(7)]
    assert [int(b[0]) for b in interleave_streams(batches, 1)] == list(range(7))


def test_interleaved_ranks_split_single_process_batches():
    groups = make_groups([16, 16, 16])
    single = interleave_streams(plan_epoch(groups, seed=2, epoch=0, batch_size=8).batches, 3)
    halves = [
        interleave_streams(plan_epoch(groups, seed=2, epoch=0, batch_size=4, rank=r, world_size=2).batches, 3)
        for r in range(2)
    ]
    assert len(single) == len(halves[0]) == len(halves[1]) == 6
    for k, batch in enumerate(single):
        assert np.array_equal(batch, np.concatenate([halves[0][k], halves[1][k]]))


def test_interleave_rejects_zero_streams():
    with pytest.raises(ValueError, match="streams"):
        interleave_streams([np.array([0])], 0)
