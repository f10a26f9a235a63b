"""Codec table: stored bytes per view and fidelity of each target codec, on real photos.

For each teacher, the script builds one cache per codec with `run_cache_targets` (zarr, one
view per image) and prints one JSON line per cache with the bytes per view and the fidelity
that the cache manifest records. The teacher runs once per teacher, and its outputs are kept
per teacher view, so the caches of every codec encode the same targets. The seconds of a cache
cover rendering the views, encoding, writing and the fidelity check, but not the teacher pass.

    python -m benchmarks.codec_table                          # print the JSON lines
    python -m benchmarks.codec_table --doc docs/codecs.md     # and write the doc page
    python -m benchmarks.codec_table --quick                  # tiny smoke run, seconds

The CLIP teachers run with random weights, because published weights cannot be fetched
offline. Their numbers describe random-weight teachers, not CLIP (see the doc page).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline.config import CacheConfig
from pipeline.data.teacher_views import TeacherViews, collate_views
from pipeline.sources import open_source
from pipeline.targets import normalize_targets
from pipeline.teachers import build_teacher
from stages.cache_targets import run_cache_targets

logger = logging.getLogger("benchmarks.codec_table")

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "imagenet-sample-64"
IMAGENET_TRAIN_IMAGES = 1_281_167
BASE_CODECS = ("fp32", "fp16", "bf16", "int8-channel", "int8-token", "pca-64", "pca-128")
CODECS = tuple(name for base in BASE_CODECS for name in (base, f"{base}+zstd"))
DEFAULT_SHARD_SIZE = CacheConfig().shard_size
TEACHERS = ("clip_vit_base_patch16", "clip_vit_large_patch14", "pixel")
QUICK_OVERRIDES = {"width": 64, "layers": 2, "heads": 2, "patch_size": 16, "embed_dim": 32}


@dataclass(frozen=True)
class TableScale:
    """Size of one run of the table."""

    images: int
    img_size: int
    calibration_images: int
    fidelity_views: int
    batch_size: int
    teacher_overrides: dict | None


FULL = TableScale(images=64, img_size=224, calibration_images=32, fidelity_views=32, batch_size=16, teacher_overrides=None)
QUICK = TableScale(images=8, img_size=64, calibration_images=4, fidelity_views=4, batch_size=8, teacher_overrides=QUICK_OVERRIDES)


class MemoizedTeacher:
    """A teacher whose output is kept per input view, so that several caches share one teacher pass.

    Calls return float32 targets [N, L, D] for views [N, 3, S, S]. A view is identified by the
    sha256 of its pixel bytes. Every other attribute is the wrapped teacher's.
    """

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.outputs: dict[str, torch.Tensor] = {}
        self.forward_views = 0
        self.forward_seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images.cpu()]
        missing = [i for i, key in enumerate(keys) if key not in self.outputs]
        if missing:
            started = time.perf_counter()
            outputs = self.teacher(images[missing]).float().cpu()
            self.forward_seconds += time.perf_counter() - started
            self.forward_views += len(missing)
            for i, output in zip(missing, outputs):
                self.outputs[keys[i]] = output
        return torch.stack([self.outputs[key] for key in keys]).to(images.device)


def link_first_images(source_dir: Path, folder: Path, count: int) -> Path:
    """Link the first `count` images of `source_dir`, in the order stage one indexes them, into `folder`."""
    source = open_source(source_dir)
    if len(source) < count:
        raise SystemExit(f"the table needs {count} images but {source_dir} has {len(source)}: pass a larger --data folder")
    folder.mkdir(parents=True)
    for record in source.records[:count]:
        target = folder / record.source.replace("/", "__")
        target.symlink_to((source_dir / record.source).resolve())
    return folder


def cache_config(data: Path, out: Path, teacher: str, codec: str, scale: TableScale, weights: str) -> CacheConfig:
    """Return the stage-one config of one cache; `weights` is "random" or "published" (CLIP teachers only)."""
    if teacher == "pixel":
        teacher_weights = None
    else:
        teacher_weights = None if weights == "published" else "random"
    return CacheConfig(
        data=str(data),
        out=str(out),
        teacher=teacher,
        teacher_weights=teacher_weights,
        teacher_overrides=None if teacher == "pixel" else scale.teacher_overrides,
        img_size=scale.img_size,
        views=1,
        seed=0,
        batch_size=scale.batch_size,
        workers=0,
        device="cpu",
        codec=codec,
        format="zarr",
        shard_size=scale.images,
        calibration_images=scale.calibration_images,
        fidelity_views=scale.fidelity_views,
    )


def build_memoized_teacher(config: CacheConfig) -> MemoizedTeacher:
    teacher = build_teacher(
        config.teacher,
        config.teacher_weights,
        student_img_size=config.img_size,
        student_patch_size=config.student_patch_size,
        overrides=config.teacher_overrides,
    )
    return MemoizedTeacher(teacher)


def run_teacher_once(teacher: MemoizedTeacher, config: CacheConfig) -> None:
    """Run the teacher over view 0 of every image, the views every cache of the table stores."""
    source = open_source(config.data)
    views = TeacherViews(
        source, list(range(len(source))), 1, config.img_size, teacher.input_size, config.augment,
        config.seed, config.jpeg_quality,
    )
    loader = torch.utils.data.DataLoader(views, batch_size=config.batch_size, collate_fn=collate_views)
    for batch in loader:
        teacher(torch.cat([item.teacher_images for item in batch if item.skipped is None]))


def feature_statistics(teacher: MemoizedTeacher) -> dict:
    """Describe the distribution of the teacher's targets kept so far, after per-patch LayerNorm.

    Returns the share of variance that the top 64 and 128 principal components hold, the largest
    channel standard deviation over the median one (large for outlier channels), the mean
    excess kurtosis of the channels (0 for Gaussian values), and the fraction of flat patches,
    whose values are all equal, so that LayerNorm turns them into zeros.
    """
    targets = normalize_targets(torch.stack(list(teacher.outputs.values())))
    patches = targets.reshape(-1, targets.shape[-1]).double()
    flat = (patches == 0).all(dim=1)
    centered = patches - patches.mean(dim=0)

    variance = torch.linalg.svdvals(centered) ** 2
    explained = torch.cumsum(variance, dim=0) / variance.sum()
    std = centered.std(dim=0)
    kurtosis = (centered**4).mean(dim=0) / (centered**2).mean(dim=0) ** 2 - 3
    return {
        "pca_64_variance": round(float(explained[min(64, len(explained)) - 1]), 4),
        "pca_128_variance": round(float(explained[min(128, len(explained)) - 1]), 4),
        "max_over_median_channel_std": round(float(std.max() / std.median()), 2),
        "mean_excess_kurtosis": round(float(kurtosis.mean()), 2),
        "flat_patch_fraction": round(float(flat.double().mean()), 4),
    }


def measure_codec(teacher: MemoizedTeacher, config: CacheConfig) -> dict:
    """Build the cache of one codec and return its JSON line."""
    views_before = teacher.forward_views
    started = time.perf_counter()
    manifest = run_cache_targets(config, teacher=teacher)
    seconds = time.perf_counter() - started

    fidelity = manifest["fidelity"]
    settings = manifest["settings"]
    return {
        "benchmark": "codec_table",
        "teacher": config.teacher,
        "weights": settings["teacher"]["weights_source"],
        "codec": config.codec,
        "bytes_per_view": {
            "targets": manifest["bytes_per_view"]["targets"],
            "total": manifest["bytes_per_view"]["total"],
        },
        "cosine_mean": fidelity["cosine_mean"],
        "cosine_p1": fidelity["cosine_p1"],
        "relative_mse": fidelity["relative_mse"],
        "fidelity_views": fidelity["num_views"],
        "seconds": round(seconds, 2),
        "teacher_forward_views": teacher.forward_views - views_before,
        "images": manifest["num_images"],
        "grid": settings["targets"]["grid"],
        "target_dim": settings["targets"]["dim"],
        "img_size": config.img_size,
    }


def machine_setup() -> dict:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).date().isoformat(),
    }


def run_table(
    data: Path, teachers: list[str], codecs: list[str], scale: TableScale, weights: str, work: Path
) -> list[dict]:
    """Build every (teacher, codec) cache under `work`, print and return their JSON lines."""
    photos = link_first_images(data, work / "photos", scale.images)
    rows = []
    for teacher_name in teachers:
        first = cache_config(photos, work / "unused", teacher_name, codecs[0], scale, weights)
        teacher = build_memoized_teacher(first)
        run_teacher_once(teacher, first)
        teacher_seconds = round(teacher.forward_seconds, 1)
        logger.info("%s: teacher pass over %d views in %.1f s", teacher_name, teacher.forward_views, teacher_seconds)
        features = feature_statistics(teacher)

        for codec in codecs:
            out = work / f"{teacher_name}-{codec}"
            row = measure_codec(teacher, cache_config(photos, out, teacher_name, codec, scale, weights))
            row["teacher_seconds"] = teacher_seconds
            row["teacher_features"] = features
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out)
    return rows


def format_doc(rows: list[dict], setup: dict, command: str, scale: TableScale) -> str:
    """Return the markdown page with the measured table and the computed ImageNet projection."""
    lines = [
        "# Target codecs: bytes per view and fidelity",
        "",
        "Each cache stores, per view, the student view as JPEG (quality 95) and the teacher's per-patch",
        "targets encoded by a codec. This page lists, for each codec, how many bytes a view takes and how",
        "close the decoded targets are to the exact ones. The numbers were measured with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Setup: the first {scale.images} photos of `data/imagenet-sample-64`, one view per image at "
        f"{scale.img_size} px, seed 0, zarr format, one shard. CPU: {setup['cpu']}, {setup['cpu_count']} cores "
        f"visible, torch {setup['torch']} with {setup['torch_threads']} threads, {setup['date']}. Random teacher "
        "weights come from a fixed seed, so a rerun reproduces the targets and the fidelity. The seconds are "
        "wall-clock time, so other load on the machine slows them.",
        "",
        "Columns:",
        "",
        "- *targets B/view*: encoded target bytes per view after the optional zstd stage, from the manifest's",
        "  `bytes_per_view.targets` (measured on the fidelity views).",
        "- *total B/view*: all shard files (JPEG view, view parameters, metadata, targets, zarr metadata)",
        "  divided by the number of views, from `bytes_per_view.total`. The zarr metadata of a shard is a",
        f"  few KB, spread here over {scale.images} views. Shards of {DEFAULT_SHARD_SIZE} images (the default) spread it",
        f"  {DEFAULT_SHARD_SIZE / scale.images:g} times thinner.",
        "- *cosine mean* and *cosine p1*: mean and 1st percentile of the per-patch cosine similarity between",
        "  decoded and exact targets, both normalized per patch with LayerNorm without affine, as the trainer",
        "  normalizes them. *rel. MSE*: squared error over squared norm of the normalized exact targets.",
        f"  All are measured on view 0 of the {scale.images - scale.calibration_images} images outside the",
        f"  {scale.calibration_images}-image calibration slice, the same views for every codec.",
        "- *seconds*: building the cache without the teacher pass (rendering views, encoding, writing and the",
        "  fidelity check). The teacher ran once per teacher; its outputs were reused by every codec.",
        "",
        "**Random-weight teachers are not CLIP.** The CLIP teachers below have random weights, because",
        "published weights cannot be downloaded on this machine, so their targets are not CLIP features and",
        "are distributed differently. Trained CLIP features have a few outlier channels of much larger",
        "magnitude than the rest, and their own low-rank structure. The codecs react to that by construction.",
        "int8-token sets one scale per patch from its largest value, so an outlier channel coarsens every",
        "other channel of the patch. int8-channel gives each channel its own range, calibrated on the",
        "calibration slice. pca-K keeps the share of variance its K components hold. The int8 and pca rows",
        "will therefore differ on real CLIP. Under each table, a line summarizes that teacher's normalized",
        "targets. It gives the share of variance in the top 64 and 128 principal components, the ratio of",
        "the largest channel standard deviation to the median one, and the mean excess kurtosis of the",
        "channels (0 for Gaussian values). This page gives no numbers for real CLIP weights. Measure them",
        "with the same command and `--weights published` once the published weights are in the Hugging Face",
        "cache. The `pixel` teacher's targets are the patch pixels themselves and do not depend on weights.",
        "",
    ]
    for teacher in dict.fromkeys(row["teacher"] for row in rows):
        lines += _teacher_table(teacher, [row for row in rows if row["teacher"] == teacher])
    lines += _projection(rows)
    return "\n".join(lines) + "\n"


def _teacher_table(teacher: str, rows: list[dict]) -> list[str]:
    first = rows[0]
    features = first["teacher_features"]
    weights = "no weights" if teacher == "pixel" else f"{first['weights']} weights"
    lines = [
        f"## {teacher} ({weights}; targets {first['grid'][0]}x{first['grid'][1]} x {first['target_dim']})",
        "",
        f"Teacher pass over {first['images']} views: {first['teacher_seconds']} s. Normalized targets: the top 64",
        f"and 128 principal components hold {features['pca_64_variance']:.1%} and {features['pca_128_variance']:.1%}"
        f" of the variance, the largest channel standard deviation is {features['max_over_median_channel_std']:g}"
        f" times the median one, and the mean excess kurtosis is {features['mean_excess_kurtosis']:g}.",
    ]
    if features["flat_patch_fraction"] > 0:
        lines += [
            f"{features['flat_patch_fraction']:.1%} of the patches of the {first['images']} views are flat (one value",
            "throughout, such as a clipped highlight), so LayerNorm turns them into zeros. A codec that does not",
            "reproduce such a patch exactly has cosine 0 there, which pulls its cosine p1 to 0 once flat patches",
            "make up more than 1% of the patches compared.",
        ]
    lines += [
        "",
        "| codec | targets B/view | total B/view | cosine mean | cosine p1 | rel. MSE | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['codec']} | {row['bytes_per_view']['targets']:,.0f} | {row['bytes_per_view']['total']:,.0f} | "
            f"{row['cosine_mean']:.6f} | {row['cosine_p1']:.6f} | {row['relative_mse']:.2e} | {row['seconds']:.1f} |"
        )
    return lines + [""]


def _projection(rows: list[dict]) -> list[str]:
    lines = [
        "## ImageNet-1k projection (computed, not measured)",
        "",
        f"Cache size for one view of each of the {IMAGENET_TRAIN_IMAGES:,} ImageNet-1k training images, computed",
        "as the measured bytes per view above times the image count. K views take K times as much. The",
        "JPEG part depends on the photos, so real ImageNet totals will differ somewhat.",
        "",
        "| teacher | codec | targets GB/view set | total GB/view set |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        targets = row["bytes_per_view"]["targets"] * IMAGENET_TRAIN_IMAGES / 1e9
        total = row["bytes_per_view"]["total"] * IMAGENET_TRAIN_IMAGES / 1e9
        lines.append(f"| {row['teacher']} | {row['codec']} | {targets:,.1f} | {total:,.1f} |")
    return lines + [""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=PHOTOS, help="Image folder. [default: the bundled photos]")
    parser.add_argument("--teachers", default=",".join(TEACHERS), help="Comma-separated teacher names.")
    parser.add_argument("--codecs", default=",".join(CODECS), help="Comma-separated codec names.")
    parser.add_argument(
        "--weights", choices=("random", "published"), default="random",
        help="Weights of the CLIP teachers: random (offline) or the published ones from the Hugging Face cache.",
    )
    parser.add_argument("--doc", type=Path, help="Also write the markdown page to this path, e.g. docs/codecs.md.")
    parser.add_argument("--quick", action="store_true", help="Tiny teachers, 8 images at 64 px: a smoke run.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = QUICK if args.quick else FULL
    teachers = [name.strip() for name in args.teachers.split(",") if name.strip()]
    codecs = [name.strip() for name in args.codecs.split(",") if name.strip()]

    with tempfile.TemporaryDirectory(prefix="codec-table-") as work:
        rows = run_table(args.data, teachers, codecs, scale, args.weights, Path(work))

    if args.doc is not None:
        command = "python -m benchmarks.codec_table " + " ".join(argv if argv is not None else sys.argv[1:])
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(format_doc(rows, machine_setup(), command.strip(), scale))
        logger.info("wrote %s", args.doc)


if __name__ == "__main__":
    main()
