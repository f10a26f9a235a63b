"""`maskdistill inspect` and `maskdistill verify`: describe a cache, draw its samples, check its bytes."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.cache import CacheReader, ShardData, verify_cache
from pipeline.cache.shard import concat_shard_data
from pipeline.codecs import build_codec
from pipeline.errors import UsageError
from pipeline.masking import MaskConfig, sample_masks
from pipeline.output_paths import check_output_file
from pipeline.visualize import ViewPanel, check_figure_suffix, decode_jpeg, pca_colors, save_view_grid

logger = logging.getLogger(__name__)

IMAGENET_TRAIN_IMAGES = 1_281_167
SKIPPED_LISTED = 5
KIB = 1024


def describe_cache(root: str | Path, project_images: int = IMAGENET_TRAIN_IMAGES) -> str:
    """Return a readable summary of a cache: teacher, grid, codec, views, skipped inputs, bytes, fidelity."""
    if project_images < 1:
        raise UsageError(f"--project-images must be at least 1, got {project_images}")
    reader = CacheReader(Path(root))
    manifest = reader.manifest
    settings = manifest["settings"]
    teacher = settings["teacher"]
    targets = settings["targets"]
    view = settings["student_view"]

    lines = [
        f"cache       {Path(root)}  (format {manifest['format']}, schema {manifest['schema_version']})",
        f"teacher     {teacher['name']}  weights {teacher['weights_source']}{_short_sha(teacher.get('weights_sha256'))}",
        f"            input {teacher.get('input_size')} px, mean {teacher.get('mean')}, std {teacher.get('std')}",
        f"targets     grid {targets['grid'][0]}x{targets['grid'][1]}, width {targets['dim']}, {targets['layer']}",
        f"student     {view['img_size']} px views, patch {view['patch_size']}, JPEG quality {view['jpeg_quality']}",
        f"codec       {settings['codec']['full_name']}",
        f"views       {settings['views']} per image, seed {settings['seed']}",
        f"samples     {manifest['num_images']} images, {manifest['num_samples']} views, {manifest['num_shards']} shards",
    ]
    lines += _skipped_lines(manifest)
    lines += _bytes_lines(manifest, project_images)
    lines += _fidelity_lines(manifest.get("fidelity") or {})
    return "\n".join(lines)


def _short_sha(digest: str | None) -> str:
    return f"  sha256 {digest[:16]}" if digest else ""


def _skipped_lines(manifest: dict) -> list[str]:
    """Count skipped inputs by reason, then list the first few with their reasons."""
    skipped = manifest.get("skipped") or []
    count = manifest.get("num_skipped", len(skipped))
    inputs = manifest.get("num_inputs", manifest["num_images"])
    share = f" ({100 * count / inputs:.2f}%)" if inputs else ""
    lines = [f"skipped     {count} of {inputs} inputs{share}"]
    if not skipped:
        return lines

    # A reason reads "<kind>: <details>"; the kind groups files that failed the same way.
    kinds = Counter(str(item["reason"]).split(":")[0] for item in skipped)
    for kind, number in kinds.most_common():
        lines.append(f"            {number:>6} x {kind}")
    lines.append("            first skipped:")
    for item in skipped[:SKIPPED_LISTED]:
        lines.append(f"              {item['source']}: {item['reason']}")
    if len(skipped) > SKIPPED_LISTED:
        lines.append(f"              ... and {len(skipped) - SKIPPED_LISTED} more (see the skipped list in manifest.json)")
    return lines


def _bytes_lines(manifest: dict, project_images: int) -> list[str]:
    """Describe bytes per view split into targets and the rest, the saving against float32, and a projection."""
    per_view = manifest.get("bytes_per_view") or {}
    total = per_view.get("total") or 0.0
    if not total:
        return []
    settings = manifest["settings"]
    grid = settings["targets"]["grid"]
    float32_bytes = grid[0] * grid[1] * settings["targets"]["dim"] * 4

    target_bytes = per_view.get("targets")
    if target_bytes:
        lines = [
            f"bytes/view  {total / KIB:.1f} KiB: targets {target_bytes / KIB:.1f} KiB "
            f"({float32_bytes / target_bytes:.1f}x smaller than float32, {float32_bytes / KIB:.1f} KiB), "
            f"JPEG view and metadata {(total - target_bytes) / KIB:.1f} KiB"
        ]
    else:
        lines = [f"bytes/view  {total / KIB:.1f} KiB in all (float32 targets would take {float32_bytes / KIB:.1f} KiB)"]

    projected = total * settings["views"] * project_images
    lines.append(f"projection  {project_images:,} images x {settings['views']} views: {projected / 1e9:.1f} GB")
    return lines


def _fidelity_lines(fidelity: dict) -> list[str]:
    if not fidelity:
        return ["fidelity    not measured (fidelity views were 0)"]
    return [
        f"fidelity    cosine mean {fidelity['cosine_mean']:.5f}, 1st percentile {fidelity['cosine_p1']:.5f}, "
        f"relative MSE {fidelity['relative_mse']:.2e}",
        f"            {fidelity.get('num_views', '?')} held-out views, {fidelity.get('norm', 'layernorm')}-normalized "
        "targets compared with a fresh teacher pass",
    ]


def show_cache(
    root: str | Path,
    output: str | Path,
    count: int = 8,
    view: int = 0,
    mask_ratio: float = 0.4,
    min_mask_block: int = 16,
    seed: int = 0,
) -> Path:
    """Draw `count` samples of one view of a cache with their targets and a mask; return the figure path.

    See `cache_panels` for what each sample shows. The output format follows the suffix of
    `output` (.png, .pdf, .svg, ...).
    """
    output = Path(output)
    check_show_options(root, output, count, view, mask_ratio, min_mask_block)
    reader = CacheReader(Path(root))
    panels = cache_panels(reader, count, view, mask_ratio, min_mask_block, seed)

    settings = reader.manifest["settings"]
    grid = settings["targets"]["grid"]
    title = (
        f"{Path(root).name}: teacher {settings['teacher']['name']}, codec {settings['codec']['full_name']}\n"
        f"targets {grid[0]}x{grid[1]} x {settings['targets']['dim']}; mask ratio {mask_ratio}, seed {seed}, epoch 0"
    )
    save_view_grid(panels, output, title)
    logger.info("drew %d samples of view %d of %s into %s", len(panels), view, root, output)
    return output


def check_show_options(
    root: str | Path, output: str | Path, count: int, view: int, mask_ratio: float, min_mask_block: int
) -> None:
    """Raise UsageError for an invalid --show, --output, --view, --mask-ratio or --min-mask-block.

    `inspect` calls this before it prints the summary, so a bad option prints only the error.
    """
    check_figure_suffix(Path(output))
    check_output_file(output, "--output")
    _check_panel_options(CacheReader(Path(root)), count, view, mask_ratio, min_mask_block)


def _check_panel_options(reader: CacheReader, count: int, view: int, mask_ratio: float, min_mask_block: int) -> None:
    if count < 1:
        raise UsageError(f"--show must be at least 1, got {count}")
    if not 0 <= view < reader.num_views:
        raise UsageError(f"--view {view} is out of range: cache {reader.root} has views 0 to {reader.num_views - 1}")
    if min_mask_block < 1:
        raise UsageError(f"--min-mask-block must be at least 1 patch, got {min_mask_block}")
    grid = reader.manifest["settings"]["targets"]["grid"]
    MaskConfig(grid[0], grid[1], ratio=mask_ratio, min_block=min_mask_block)


def cache_panels(
    reader: CacheReader,
    count: int,
    view: int = 0,
    mask_ratio: float = 0.4,
    min_mask_block: int = 16,
    seed: int = 0,
) -> list[ViewPanel]:
    """Return the first `count` samples of `view`, in shard order, ready to draw.

    Each panel contains the stored student view, its decoded targets as PCA colors (fitted over
    exactly these samples) and the mask that `pretrain --seed seed --mask-ratio mask_ratio`
    draws for the sample in epoch 0. A cache with fewer samples gives fewer panels.
    """
    _check_panel_options(reader, count, view, mask_ratio, min_mask_block)
    samples = _first_samples(reader, count, view)
    grid = tuple(reader.manifest["settings"]["targets"]["grid"])
    colors = pca_colors(_decode_targets(reader, samples.targets), grid)
    mask_config = MaskConfig(grid[0], grid[1], ratio=mask_ratio, min_block=min_mask_block)
    masks = sample_masks(mask_config, seed, 0, samples.image_index)

    return [
        ViewPanel(
            view=decode_jpeg(samples.jpeg[i]),
            targets_rgb=colors[i],
            mask=masks[i],
            title=f"image {int(samples.image_index[i])}, view {view}\n{_short(samples.source[i])}",
        )
        for i in range(len(samples))
    ]


def _first_samples(reader: CacheReader, count: int, view: int) -> ShardData:
    """Read view slices shard by shard until `count` samples are collected (fewer if the cache is smaller)."""
    pieces: list[ShardData] = []
    collected = 0
    for record in sorted(reader.shards, key=lambda item: item.shard_id):
        if collected >= count:
            break
        if record.num_images == 0:
            continue
        data = reader.read_shard(record.shard_id, view)
        keep = min(len(data), count - collected)
        pieces.append(data.select(np.arange(keep)))
        collected += keep
    if not pieces:
        raise UsageError(f"cache {reader.root} contains no samples to show")
    return concat_shard_data(pieces)


def _decode_targets(reader: CacheReader, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Decode stored target parts to float32 [N, L, D] with the codec named in the manifest."""
    codec = build_codec(reader.manifest["settings"]["codec"]["name"])
    if codec.needs_fit:
        codec.load_state(reader.codec_state())
    return codec.decode(parts)


def _short(source: str, limit: int = 28) -> str:
    name = Path(source).name
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def run_verify(root: str | Path) -> tuple[bool, str]:
    """Check every shard against the manifest; return (intact, readable report)."""
    report = verify_cache(Path(root))
    return report.ok, report.summary()
