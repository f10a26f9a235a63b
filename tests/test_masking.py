import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import UsageError
from pipeline.masking import MaskConfig, block_mask, mask_rng, sample_masks


@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.75])
@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (7, 10)])
def test_mask_count_matches_ratio(ratio, grid):
    config = MaskConfig(*grid, ratio=ratio)
    for seed in range(20):
        mask = block_mask(config, mask_rng(seed, 0, 0))
        assert mask.shape == grid
        assert mask.dtype == bool
        assert mask.sum() == config.num_masked


def test_mask_is_made_of_blocks():
    config = MaskConfig(14, 14, ratio=0.4, min_block=16)
    largest = []
    for seed in range(50):
        mask = block_mask(config, mask_rng(seed, 0, 0))
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        largest.append(sizes.max())
        # 78 masked patches from blocks of >= 16: never a scatter of single patches
        assert count <= 8
    assert min(largest) >= 16


def test_mask_differs_between_epochs_and_images():
    config = MaskConfig(14, 14)
    first = block_mask(config, mask_rng(0, 0, 5))
    assert not np.array_equal(first, block_mask(config, mask_rng(0, 1, 5)))
    assert not np.array_equal(first, block_mask(config, mask_rng(0, 0, 6)))
    assert not np.array_equal(first, block_mask(config, mask_rng(1, 0, 5)))


def test_mask_is_deterministic_per_sample():
    config = MaskConfig(14, 14)
    batch = sample_masks(config, seed=3, epoch=2, image_indices=[7, 1, 9])
    again = sample_masks(config, seed=3, epoch=2, image_indices=[9, 7])
    assert batch.shape == (3, 14, 14)
    assert np.array_equal(batch[0], again[1])
    assert np.array_equal(batch[2], again[0])


def test_mask_spreads_over_the_grid():
    config = MaskConfig(14, 14)
    frequency = sample_masks(config, seed=0, epoch=0, image_indices=range(2000)).mean(axis=0)
    # every position is masked sometimes; block placement masks corners less often than the centre
    assert frequency.min() > 0.02
    assert frequency[4:10, 4:10].min() > 0.3
    assert abs(frequency.mean() - 0.4) < 0.01


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval(ratio):
    with pytest.raises(UsageError, match="--mask-ratio"):
        MaskConfig(14, 14, ratio=ratio)
