"""`inspect`: the cache summary, and pictures of cached views with their targets and masks.

The caches are real: stage one runs the pixel teacher over real photos (plus two broken files),
so the targets have image structure and the summary has skipped inputs to report.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_runs import IMG_SIZE, REPO, copy_photos, sample_photos
from PIL import Image

from pipeline.cache import CacheReader
from pipeline.codecs import build_codec
from pipeline.config import CacheConfig
from pipeline.data.cached import CachedViews
from pipeline.errors import UsageError
from pipeline.masking import MaskConfig
from pipeline.visualize import draw_mask, pca_colors, upsample_grid
from stages.cache_targets import run_cache_targets
from stages.inspect_cache import cache_panels, describe_cache, show_cache

FORMAT_DOC = REPO / "docs" / "cache-format.md"
GRID = (6, 6)


def build_cache(root: Path, photos: int, bad_files: bool, **changes) -> Path:
    folder = copy_photos(root / "photos", photos)
    if bad_files:
        (folder / "truncated.jpg").write_bytes(sample_photos()[-1].read_bytes()[:3000])
        (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")

    values = dict(
        data=str(folder), out=str(root / "cache"), teacher="pixel", img_size=IMG_SIZE, batch_size=8, workers=0,
        device="cpu", shard_size=4, fidelity_views=4, max_bad_fraction=0.5,
    )
    values.update(changes)
    run_cache_targets(CacheConfig(**values))
    return root / "cache"


@pytest.fixture(scope="module")
def zarr_cache(tmp_path_factory) -> Path:
    """8 photos and 2 broken files, 2 views, int8-channel (a codec with a fitted state)."""
    return build_cache(tmp_path_factory.mktemp("zarr"), 8, True, views=2, codec="int8-channel", calibration_images=8)


@pytest.fixture(scope="module")
def wds_cache(tmp_path_factory) -> Path:
    """5 photos, 1 view, fp16 with zstd, in webdataset tars."""
    return build_cache(tmp_path_factory.mktemp("wds"), 5, False, format="wds", codec="fp16+zstd")


def read_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ---- the summary


def test_describe_skipped_by_reason(zarr_cache):
    text = describe_cache(zarr_cache)
    assert "skipped     2 of 10 inputs (20.00%)" in text
    assert "1 x not an image" in text
    assert "1 x failed to decode JPEG pixel data" in text
    assert "page.jpg: not an image" in text
    assert "truncated.jpg: failed to decode" in text


def test_describe_bytes_and_fidelity(zarr_cache):
    text = describe_cache(zarr_cache)
    float32_kib = GRID[0] * GRID[1] * 768 * 4 / 1024
    assert "samples     8 images, 16 views, 3 shards" in text
    assert "codec       int8-channel" in text
    assert f"4.0x smaller than float32, {float32_kib:.1f} KiB" in text
    assert "JPEG view and metadata" in text
    assert "projection  1,281,167 images x 2 views:" in text
    assert "fidelity    cosine mean 0.99" in text
    assert "1st percentile" in text
    assert "relative MSE" in text


def test_describe_without_skips(wds_cache):
    text = describe_cache(wds_cache)
    assert "skipped     0 of 5 inputs (0.00%)" in text
    assert "first skipped" not in text
    assert "format wds" in text
    assert "codec       fp16+zstd" in text


def test_describe_pixel_teacher_has_no_sha(wds_cache):
    assert "teacher     pixel  weights none\n" in describe_cache(wds_cache)


# ---- the picture


def test_show_writes_grid_png(zarr_cache, tmp_path):
    output = show_cache(zarr_cache, tmp_path / "pictures" / "views.png", count=4)
    pixels = read_pixels(output)
    assert output == tmp_path / "pictures" / "views.png"
    assert pixels.shape[0] > 400
    assert pixels.shape[1] > 400
    assert pixels.std() > 30
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000


def test_show_webdataset_cache(wds_cache, tmp_path):
    pixels = read_pixels(show_cache(wds_cache, tmp_path / "views.png", count=2))
    assert pixels.std() > 30
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_panels_match_store_and_trainer(zarr_cache):
    reader = CacheReader(zarr_cache)
    panels = cache_panels(reader, count=6, view=1)

    # the trainer's dataset: sample ids count the samples of one view in shard order
    dataset = CachedViews(zarr_cache, MaskConfig(*GRID), seed=0)
    batch = dataset.__getitems__([(0, 1, sample_id) for sample_id in range(6)])
    stored = [reader.read_shard(record.shard_id, 1) for record in sorted(reader.shards, key=lambda r: r.shard_id)]
    jpegs = [jpeg for data in stored for jpeg in data.jpeg][:6]

    assert len(panels) == 6
    for i, panel in enumerate(panels):
        assert panel.title.startswith(f"image {int(batch['image_index'][i])}, view 1")
        assert np.array_equal(panel.view, decode(jpegs[i]))
        assert np.array_equal(panel.mask, batch["mask"][i].numpy())
    colors = pca_colors(dataset.finish_targets(batch["target_parts"]).numpy(), GRID)
    assert np.allclose(np.stack([panel.targets_rgb for panel in panels]), colors)


def test_panels_mask_follows_ratio_and_seed(zarr_cache):
    reader = CacheReader(zarr_cache)
    default = cache_panels(reader, count=3)
    other_seed = cache_panels(reader, count=3, seed=1)
    lower = cache_panels(reader, count=3, mask_ratio=0.25, min_mask_block=4)

    assert all(panel.mask.sum() == 14 for panel in default)
    assert all(panel.mask.sum() == 9 for panel in lower)
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(default, other_seed))


def test_panels_count_beyond_cache(wds_cache):
    panels = cache_panels(CacheReader(wds_cache), count=50)
    assert len(panels) == 5


def test_show_rejects_bad_requests(zarr_cache, tmp_path):
    reader = CacheReader(zarr_cache)
    with pytest.raises(UsageError, match="--show must be at least 1, got 0"):
        cache_panels(reader, count=0)
    with pytest.raises(UsageError, match="--view 2 is out of range"):
        cache_panels(reader, count=1, view=2)
    with pytest.raises(UsageError, match="--mask-ratio"):
        cache_panels(reader, count=1, mask_ratio=1.0)
    with pytest.raises(UsageError, match=r"views\.txt"):
        show_cache(zarr_cache, tmp_path / "views.txt")
    assert not (tmp_path / "views.txt").exists()


def test_show_rejects_missing_cache(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        show_cache(tmp_path / "no-cache", tmp_path / "views.png")


# ---- the pieces of the picture


def test_pca_colors_separate_clusters():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(2, 32))
    # left half of every view is one kind of patch, right half another
    kinds = np.tile(np.repeat([0, 1], 3), 6)
    features = directions[kinds][None].repeat(2, axis=0) + 0.01 * rng.normal(size=(2, 36, 32))
    colors = pca_colors(features, GRID)

    # the first component (red) separates the two kinds; the others only spread the noise
    left, right = colors[:, :, :3, 0], colors[:, :, 3:, 0]
    assert colors.shape == (2, 6, 6, 3)
    assert colors.min() >= 0.0
    assert colors.max() <= 1.0
    assert abs(left.mean() - right.mean()) > 0.9
    assert left.std() < 0.05
    assert right.std() < 0.05


def test_pca_colors_fit_jointly_over_views():
    features = np.random.default_rng(1).normal(size=(1, 36, 16)).astype(np.float32)
    both = pca_colors(np.concatenate([features, features]), GRID)
    assert np.array_equal(both[0], both[1])


def test_pca_colors_rejects_wrong_grid():
    with pytest.raises(ValueError, match="36 patches"):
        pca_colors(np.zeros((1, 36, 8), dtype=np.float32), (5, 5))


def test_draw_mask_grays_masked_patches_only():
    view = np.random.default_rng(2).integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    mask = np.zeros(GRID, dtype=bool)
    mask[1, 2] = True
    drawn = draw_mask(view, mask)

    patch = (slice(16, 32), slice(32, 48))
    outside = ~upsample_grid(mask, (IMG_SIZE, IMG_SIZE))
    assert np.array_equal(drawn[outside], view[outside])
    assert not np.array_equal(drawn[patch], view[patch])
    assert drawn[patch].std() < view[patch].std() / 2


def test_upsample_grid_blocks():
    values = np.arange(6).reshape(2, 3)
    pixels = upsample_grid(values, (4, 6))
    assert pixels.shape == (4, 6)
    assert pixels[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert pixels[3].tolist() == [3, 3, 4, 4, 5, 5]


# ---- the reading example of docs/cache-format.md


def run_format_doc_example(cache: Path, monkeypatch) -> tuple[dict, str]:
    """Run the doc's Python block on `cache`; return its variables and what it printed."""
    code = re.search(r"```python\n(.*?)```", FORMAT_DOC.read_text(), re.S).group(1)
    monkeypatch.setattr(sys, "argv", ["read_cache.py", str(cache)])
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(FORMAT_DOC), "exec"), namespace)
    return namespace, printed.getvalue()


def check_doc_example(cache: Path, monkeypatch) -> None:
    namespace, printed = run_format_doc_example(cache, monkeypatch)

    reader = CacheReader(cache)
    first = reader.read_shard(min(record.shard_id for record in reader.shards), 0)
    codec = build_codec(reader.manifest["settings"]["codec"]["name"])
    if codec.needs_fit:
        codec.load_state(reader.codec_state())
    assert namespace["image_index"].tolist() == first.image_index.tolist()
    assert namespace["jpegs"] == first.jpeg
    assert np.array_equal(namespace["targets"], codec.decode(first.targets))
    assert printed.startswith(f"image {first.image_index[0]}: view ({IMG_SIZE}, {IMG_SIZE}) RGB, targets (36, 768)")


def test_format_doc_example_zarr(zarr_cache, monkeypatch):
    check_doc_example(zarr_cache, monkeypatch)


def test_format_doc_example_wds_zstd(wds_cache, monkeypatch):
    check_doc_example(wds_cache, monkeypatch)


@pytest.mark.parametrize(("codec", "cache_format"), [("pca-8", "wds"), ("bf16+zstd", "zarr"), ("int8-token", "wds")])
def test_format_doc_example_codecs(codec, cache_format, tmp_path, monkeypatch):
    cache = build_cache(tmp_path, 3, False, codec=codec, format=cache_format, calibration_images=3, fidelity_views=0)
    check_doc_example(cache, monkeypatch)
