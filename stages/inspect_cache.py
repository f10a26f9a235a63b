"""`maskdistill inspect` and `maskdistill verify`: read a cache's manifest and check its bytes."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cache import CacheReader, verify_cache

logger = logging.getLogger(__name__)

IMAGENET_TRAIN_IMAGES = 1_281_167


def describe_cache(root: str | Path, project_images: int = IMAGENET_TRAIN_IMAGES) -> str:
    """Return a readable summary of a cache: teacher, grid, codec, views, counts, bytes, fidelity."""
    reader = CacheReader(Path(root))
    manifest = reader.manifest
    settings = manifest["settings"]
    teacher = settings["teacher"]
    targets = settings["targets"]
    view = settings["student_view"]
    codec = settings["codec"]
    fidelity = manifest.get("fidelity") or {}
    per_view = manifest.get("bytes_per_view") or {}
    total_per_view = per_view.get("total", 0.0)

    lines = [
        f"cache       {Path(root)}  (format {manifest['format']}, schema {manifest['schema_version']})",
        f"teacher     {teacher['name']}  weights {teacher['weights_source']}  sha256 {str(teacher['weights_sha256'])[:16]}",
        f"            input {teacher.get('input_size')} px, mean {teacher.get('mean')}, std {teacher.get('std')}",
        f"targets     grid {targets['grid'][0]}x{targets['grid'][1]}, width {targets['dim']}, {targets['layer']}",
        f"student     {view['img_size']} px views, patch {view['patch_size']}, JPEG quality {view['jpeg_quality']}",
        f"codec       {codec['full_name']}",
        f"views       {settings['views']} per image, seed {settings['seed']}",
        f"samples     {manifest['num_images']} images, {manifest['num_samples']} views, {manifest['num_shards']} shards",
        f"skipped     {manifest.get('num_skipped', 0)} of {manifest.get('num_inputs', manifest['num_images'])} inputs",
    ]
    for item in (manifest.get("skipped") or [])[:5]:
        lines.append(f"            {item['source']}: {item['reason']}")
    if total_per_view:
        target_bytes = per_view.get("targets") or 0.0
        lines.append(f"bytes/view  {total_per_view / 1024:.1f} KiB in all, {target_bytes / 1024:.1f} KiB of targets")
    if fidelity:
        lines.append(
            f"fidelity    cosine mean {fidelity['cosine_mean']:.5f}, p1 {fidelity['cosine_p1']:.5f}, "
            f"relative MSE {fidelity['relative_mse']:.2e} on {fidelity.get('num_views', '?')} held-out views"
        )
    if total_per_view:
        projected = total_per_view * settings["views"] * project_images
        lines.append(
            f"projection  {project_images:,} images x {settings['views']} views: {projected / 1e9:.1f} GB"
        )
    return "\n".join(lines)


def run_verify(root: str | Path) -> tuple[bool, str]:
    """Check every shard against the manifest; return (intact, readable report)."""
    report = verify_cache(Path(root))
    return report.ok, report.summary()
