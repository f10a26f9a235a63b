"""The `maskdistill` command line: parses options and hands typed configs to the stages.

Every option that changes what a run computes can also come from a YAML preset (`--config`),
and an option given on the command line wins over the preset. User-fixable errors print one
line and exit with code 2. With `--debug` they show the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import CacheConfig, PretrainConfig, load_preset, resolve_config
from pipeline.errors import UsageError
from pipeline.logs import setup_logging

logger = logging.getLogger("maskdistill")

app = typer.Typer(
    help="Masked-distillation pretraining of vision transformers from a teacher that runs once.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"maskdistill {version('maskdistill')}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    STATE["debug"] = debug


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _options(**values) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def _config(cls, section: str, preset: Optional[Path], options: dict):
    values = load_preset(preset, section) if preset is not None else {}
    # the training length is one choice: --steps on the command line replaces a preset's epochs
    for given, replaced in (("steps", "epochs"), ("epochs", "steps")):
        if given in options and replaced not in options:
            values.pop(replaced, None)
    return resolve_config(cls, values, options, source=str(preset) if preset else "options")


@contextmanager
def _on_interrupt(hint: str):
    """Turn Ctrl-C into exit code 130 (128 + SIGINT) and one line on stderr with the way to continue."""
    try:
        yield
    except KeyboardInterrupt:
        if _rank() == 0:
            typer.echo(f"interrupted: {hint}", err=True)
        raise typer.Exit(130) from None


CONFIG_HELP = "YAML preset (see configs/); options given on the command line override it."


@app.command("cache-targets")
def cache_targets(
    data: Optional[str] = typer.Option(None, help="Input: a folder of images (searched recursively) or webdataset .tar shards (a file, a folder, or a brace pattern)."),
    out: Optional[str] = typer.Option(None, help="Cache folder to create, or to resume with the same settings."),
    teacher: Optional[str] = typer.Option(None, help="Teacher name, e.g. clip_vit_large_patch14, openclip_vit_huge_patch14 or pixel. (default: clip_vit_large_patch14)"),
    teacher_weights: Optional[str] = typer.Option(None, help="Teacher weights: omit for the published weights, a local checkpoint file, or 'random' for smoke tests (not CLIP)."),
    img_size: Optional[int] = typer.Option(None, help="Student input size in pixels per side. (default: 224)"),
    student_patch_size: Optional[int] = typer.Option(None, help="Student patch size in pixels; with --img-size it fixes the target grid. (default: 16)"),
    views: Optional[int] = typer.Option(None, help="Augmented views stored per image. (default: 1)"),
    seed: Optional[int] = typer.Option(None, help="Seed of the view parameters. (default: 0)"),
    batch_size: Optional[int] = typer.Option(None, help="Views per teacher forward pass. (default: 64)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes decoding and rendering views. (default: 4)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N. (default: auto)"),
    precision: Optional[str] = typer.Option(None, help="Autocast dtype of the teacher: auto (bf16 on CUDA, float32 elsewhere), bf16 or fp32. (default: auto)"),
    codec: Optional[str] = typer.Option(None, help="Target codec: fp16, bf16, int8-channel, int8-token, pca-K; add +zstd for lossless compression. (default: fp16)"),
    format: Optional[str] = typer.Option(None, "--format", help="Cache format: zarr (local disk) or wds (webdataset tar shards, one tar per shard and view). (default: zarr)"),
    shard_size: Optional[int] = typer.Option(None, help="Source images per shard, the unit of writing, resuming and splitting across torchrun ranks: one zarr group, or with --format wds one tar of this many images per view. (default: 256)"),
    jpeg_quality: Optional[int] = typer.Option(None, help="JPEG quality of the stored student views, 90 to 100. (default: 95)"),
    calibration_images: Optional[int] = typer.Option(None, help="Images whose view 0 fits the int8-channel and pca codecs. (default: 256)"),
    fidelity_views: Optional[int] = typer.Option(None, help="Held-out views on which the stored targets are compared with exact ones. (default: 64)"),
    max_bad_fraction: Optional[float] = typer.Option(None, help="Stop when more than this fraction of inputs cannot be used. (default: 0.01)"),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Stop at the first input that cannot be used. (default: no-strict)"),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Stage one: run the frozen teacher once over recorded views and write the target cache."""
    from stages.cache_targets import run_cache_targets

    options = _options(
        data=data, out=out, teacher=teacher, teacher_weights=teacher_weights, img_size=img_size,
        student_patch_size=student_patch_size, views=views, seed=seed, batch_size=batch_size, workers=workers,
        device=device, precision=precision, codec=codec, format=format, shard_size=shard_size, jpeg_quality=jpeg_quality,
        calibration_images=calibration_images, fidelity_views=fidelity_views,
        max_bad_fraction=max_bad_fraction, strict=strict,
    )
    cache_config = _config(CacheConfig, "cache_targets", config, options)
    with _on_interrupt(f"run the same command again to continue: finished shards of {cache_config.out} are kept"):
        run_cache_targets(cache_config)


@app.command()
def pretrain(
    out: Optional[str] = typer.Option(None, help="Run folder for checkpoints, metrics and the resolved config."),
    student: Optional[str] = typer.Option(None, help="Student name, e.g. vit_base_patch16 or swin_tiny_patch4. (default: vit_base_patch16)"),
    cache: Optional[str] = typer.Option(None, help="Cache written by cache-targets (use this, or --teacher with --data)."),
    teacher: Optional[str] = typer.Option(None, help="Online teacher name: runs the teacher every step instead of reading a cache."),
    teacher_weights: Optional[str] = typer.Option(None, help="Online teacher weights: a local checkpoint file, 'random', or omit for the published ones."),
    data: Optional[str] = typer.Option(None, help="Images for the online teacher (folder or webdataset shards)."),
    img_size: Optional[int] = typer.Option(None, help="Student input size in pixels; must match the cache. (default: 224)"),
    views: Optional[int] = typer.Option(None, help="Online teacher only: number of view indices to cycle through. (default: 1)"),
    shard_size: Optional[int] = typer.Option(None, help="Online teacher only: images per group of the epoch order (as the cache's shard size). (default: 256)"),
    head: Optional[str] = typer.Option(None, help="Prediction head: fc (linear) or vit (small transformer decoder). (default: fc)"),
    head_depth: Optional[int] = typer.Option(None, help="Blocks of the vit head. (default: 2)"),
    head_width: Optional[int] = typer.Option(None, help="Width of the vit head. (default: 384)"),
    epochs: Optional[int] = typer.Option(None, help="Training length in epochs (or use --steps)."),
    steps: Optional[int] = typer.Option(None, help="Training length in optimizer steps (or use --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per process and step; the global batch is this times the number of processes. (default: 64)"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate; when omitted it is --blr x global batch / 256."),
    blr: Optional[float] = typer.Option(None, help="Base learning rate per 256 samples. (default: 1.875e-4, i.e. 1.5e-3 at batch 2048)"),
    min_lr: Optional[float] = typer.Option(None, help="Learning rate at the end of the cosine schedule. (default: 1e-5)"),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup length in steps (overrides --warmup-epochs)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warmup length in epochs. (default: 10)"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (not on norms, biases, tokens, position tables). (default: 0.05)"),
    clip_grad: Optional[float] = typer.Option(None, help="Maximum gradient norm. (default: 3.0)"),
    mask_ratio: Optional[float] = typer.Option(None, help="Fraction of patches masked, strictly between 0 and 1. (default: 0.4)"),
    min_mask_block: Optional[int] = typer.Option(None, help="Minimum patches per mask block. (default: 16)"),
    loss: Optional[str] = typer.Option(None, help="smooth_l1, l1 or l2, on masked patches only. (default: smooth_l1)"),
    smooth_l1_beta: Optional[float] = typer.Option(None, help="Beta of the smooth L1 loss: the error size where it turns from quadratic to linear. (default: 1.0)"),
    target_norm: Optional[str] = typer.Option(None, help="layernorm (per patch, no affine) or none. (default: layernorm)"),
    drop_path: Optional[float] = typer.Option(None, help="Stochastic depth rate; default per student size."),
    val_fraction: Optional[float] = typer.Option(None, help="Fraction of samples held out for the validation loss. (default: 0.01)"),
    checkpoint_every: Optional[int] = typer.Option(None, help="Keep a numbered checkpoint every N steps (the last one is always kept). (default: 1000)"),
    log_every: Optional[int] = typer.Option(None, help="Log and record metrics every N steps. (default: 20)"),
    seed: Optional[int] = typer.Option(None, help="Seed of masks, data order and initialization. (default: 0)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes. (default: 4)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N. (default: auto)"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Compile the model with torch.compile. (default: no-compile)"),
    precision: Optional[str] = typer.Option(None, help="Autocast dtype of the student (and online teacher): auto (bf16 on CUDA, float32 elsewhere), bf16 or fp32. Weights and optimizer state stay float32. (default: auto)"),
    gpu_decode: Optional[bool] = typer.Option(None, "--gpu-decode/--no-gpu-decode", help="Decode JPEG views on the GPU (CUDA only). (default: no-gpu-decode)"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out from its last checkpoint. Without a checkpoint there, start at step 0 with a warning, so that one command line both starts and resumes a job."),
    log_samples: Optional[bool] = typer.Option(None, "--log-samples/--no-log-samples", help="Write the image indices of every step, one file per process, to RUN/samples/rank<r>.jsonl for auditing. (default: no-log-samples)"),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Stage two: train the masked student from a cache, or with the teacher online."""
    from stages.pretrain import run_pretrain

    options = _options(
        out=out, student=student, cache=cache, teacher=teacher, teacher_weights=teacher_weights, data=data,
        img_size=img_size, views=views, shard_size=shard_size, head=head, head_depth=head_depth,
        head_width=head_width, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, blr=blr, min_lr=min_lr,
        warmup_steps=warmup_steps, warmup_epochs=warmup_epochs, weight_decay=weight_decay, clip_grad=clip_grad,
        mask_ratio=mask_ratio, min_mask_block=min_mask_block, loss=loss, smooth_l1_beta=smooth_l1_beta,
        target_norm=target_norm, drop_path=drop_path, val_fraction=val_fraction,
        checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, workers=workers, device=device,
        compile=compile, precision=precision, gpu_decode=gpu_decode, resume=resume, log_samples=log_samples,
    )
    pretrain_config = _config(PretrainConfig, "pretrain", config, options)
    with _on_interrupt(f"run the same command with --resume to continue from the last checkpoint in {pretrain_config.out}"):
        summary = run_pretrain(pretrain_config)
    if summary and _rank() == 0:
        typer.echo(f"finished {summary['steps']} steps: loss {summary['loss']:.4f}, run folder {summary['run_dir']}")


@app.command("extract-student")
def extract_student(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint written by pretrain, e.g. RUN/checkpoint-last.pt."),
    output: Path = typer.Option(..., "--output", "-o", help="Weights file to write: .safetensors (default format), or .pt, .pth or .bin for a torch.save state dict."),
    output_format: Optional[str] = typer.Option(None, "--format", help="safetensors or pt; by default taken from the --output suffix."),
    keep_rel_pos_bias: bool = typer.Option(False, "--keep-rel-pos-bias", help="Keep the relative position bias tables: the weights then load into timm's Beit instead of VisionTransformer."),
    keep_layer_scale_gamma: bool = typer.Option(False, "--keep-layer-scale-gamma", help="Keep layer scale as gamma parameters instead of folding it into the projection weights."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load checkpoints that contain arbitrary Python objects (only for files you trust)."),
    verify: bool = typer.Option(False, "--verify", help="Load the written weights into the timm model with strict=True and compare its features with the student's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --output file if it exists."),
) -> None:
    """Write the student of a checkpoint as weights that timm loads with strict=True."""
    from stages.extract_student import ExtractStudentConfig, run_extract_student

    config = ExtractStudentConfig(
        checkpoint=checkpoint, output=output, output_format=output_format, keep_rel_pos_bias=keep_rel_pos_bias,
        keep_layer_scale_gamma=keep_layer_scale_gamma, allow_pickle=allow_pickle, overwrite=overwrite,
    )
    typer.echo(run_extract_student(config, verify=verify))


@app.command()
def inspect(
    cache: Path = typer.Argument(..., help="Cache folder written by cache-targets."),
    project_images: int = typer.Option(1_281_167, help="Dataset size, in images, for the projected cache size (default: ImageNet-1k train)."),
    show: Optional[int] = typer.Option(None, "--show", help="Also draw this many samples (view, masked view, targets as PCA colors) into the --output picture."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Picture written by --show: .png, .pdf or .svg."),
    view: int = typer.Option(0, help="View index drawn by --show."),
    mask_ratio: float = typer.Option(0.4, help="Mask ratio of the masks drawn by --show (as pretrain --mask-ratio)."),
    min_mask_block: int = typer.Option(16, help="Minimum patches per mask block of the masks drawn by --show (as pretrain --min-mask-block)."),
    seed: int = typer.Option(0, help="Seed of the masks drawn by --show (as pretrain --seed); they are the masks of epoch 0."),
) -> None:
    """Print a cache's manifest in readable form; with --show N -o FILE, also draw N samples with their targets and masks."""
    from stages.inspect_cache import check_show_options, describe_cache, show_cache

    if (show is None) != (output is None):
        raise UsageError("--show N and --output FILE go together: pass both to draw samples, or neither")
    if show is not None:
        check_show_options(cache, output, show, view, mask_ratio, min_mask_block)
    typer.echo(describe_cache(cache, project_images))
    if show is not None:
        picture = show_cache(cache, output, show, view=view, mask_ratio=mask_ratio, min_mask_block=min_mask_block, seed=seed)
        typer.echo(f"wrote {picture}")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders written by pretrain; each has a metrics.jsonl."),
    output: Path = typer.Option(..., "--output", "-o", help="Picture to write: .png, .pdf or .svg."),
) -> None:
    """Plot training loss, validation loss and learning rate of one or more runs, overlaid."""
    from stages.plot_runs import plot_runs

    typer.echo(f"wrote {plot_runs(runs, output)}")


@app.command()
def verify(cache: Path = typer.Argument(..., help="Cache folder written by cache-targets.")) -> None:
    """Check every shard of a cache against the checksums in its manifest; exit 1 if any is damaged."""
    from stages.inspect_cache import run_verify

    intact, report = run_verify(cache)
    typer.echo(report)
    if not intact:
        raise typer.Exit(1)


def _known_failure(error: Exception) -> tuple[str, int] | None:
    """Return the one-line message and exit code of an expected failure, or None for a bug."""
    from pipeline.atomic import is_disk_full

    if isinstance(error, UsageError):
        return str(error), 2
    if is_disk_full(error):
        written = error.filename or "the output"
        return (
            f"no space left on device while writing {written}: free space or choose another output folder, "
            "then rerun the same command (pretrain continues with --resume, cache-targets keeps finished shards)",
            2,
        )
    if isinstance(error, RuntimeError):
        from pipeline.engine import TrainingDivergedError

        if isinstance(error, TrainingDivergedError):
            return str(error), 1
    return None


def main() -> None:
    """Console entry point: run the app, turning expected failures into one line on stderr.

    Exit codes: 2 for a problem the user can fix (an invalid option, a missing or damaged
    input, a full disk), 1 when training diverged (NaN or infinite loss or weights) or
    `verify` found damage. `--debug` shows the traceback instead of the line.
    """
    debug = "--debug" in sys.argv
    setup_logging(rank=_rank(), debug=debug)
    try:
        app()
    except Exception as error:
        failure = _known_failure(error)
        if failure is None or debug:
            raise
        message, code = failure
        typer.echo(f"error: {message}", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
