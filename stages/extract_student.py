"""extract-student: write the student of a pre-training checkpoint as timm weights.

The command output is a Python snippet that builds the timm model and loads the weights with
strict=True. Its second line is the exact constructor call.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UsageError
from pipeline.output_paths import check_output_file
from pipeline.extract import (
    OutputFormat,
    TimmCall,
    build_student_from_config,
    extract_student,
    load_checkpoint,
    load_extracted,
    read_student_state,
    resolve_output_format,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractStudentConfig:
    """Options of extract-student."""

    checkpoint: Path  # training checkpoint written by pretrain
    output: Path  # .safetensors (default) or .pt/.pth/.bin file to write
    output_format: OutputFormat | None = None  # None: from the output suffix
    keep_rel_pos_bias: bool = False  # export a timm Beit that keeps the relative position bias tables
    keep_layer_scale_gamma: bool = False  # keep layer scale as parameters instead of folding it
    allow_pickle: bool = False  # load checkpoints with arbitrary Python objects (trusted files only)
    overwrite: bool = False  # replace an existing output file


def check_output_path(config: ExtractStudentConfig) -> None:
    """Reject an output that is the input checkpoint, a folder, an existing file without overwrite, or below a file."""
    output = Path(config.output)
    if output.exists() and output.resolve() == Path(config.checkpoint).resolve():
        raise UsageError(f"--output {output} is the input checkpoint; choose another file name")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; pass a file name such as {output / 'student.safetensors'}")
    if output.exists() and not config.overwrite:
        raise UsageError(f"--output {output} already exists; pass --overwrite to replace it or choose another name")
    check_output_file(output, "--output")


def run_extract_student(config: ExtractStudentConfig, verify: bool = False) -> str:
    """Extract the student weights and return the snippet that loads them into timm.

    With `verify`, the written weights are also loaded into timm and compared with the student
    (see `verify_extracted`), and the result is appended to the returned text.
    """
    check_output_path(config)
    logger.info("extracting the student of %s to %s", config.checkpoint, config.output)
    call = extract_student(
        config.checkpoint,
        config.output,
        output_format=config.output_format,
        keep_rel_pos_bias=config.keep_rel_pos_bias,
        keep_layer_scale_gamma=config.keep_layer_scale_gamma,
        allow_pickle=config.allow_pickle,
    )

    snippet = format_load_snippet(call, config.output, resolve_output_format(config.output, config.output_format))
    logger.info("timm model call: %s", call)
    if verify:
        snippet += "\n" + verify_extracted(config, call)
    return snippet


def format_load_snippet(call: TimmCall, weights_path: Path, output_format: OutputFormat) -> str:
    """Return Python lines that build the model of `call` and load `weights_path` with strict=True."""
    if output_format == "pt":
        imports = "import timm, torch"
        load = f"torch.load({str(weights_path)!r}, map_location='cpu', weights_only=True)"
    else:
        imports = "import timm, safetensors.torch"
        load = f"safetensors.torch.load_file({str(weights_path)!r})"
    return f"{imports}\nmodel = {call}\nmodel.load_state_dict({load}, strict=True)"



def verify_extracted(config: ExtractStudentConfig, call: TimmCall, tolerance: float = 1e-3) -> str:
    """Run the extracted timm model and the checkpoint's student on one input and compare features.

    Raises UsageError when the largest difference exceeds `tolerance`, which happens when
    non-zero relative position tables were dropped (extract with --keep-rel-pos-bias instead).
    """
    checkpoint = load_checkpoint(config.checkpoint, allow_pickle=config.allow_pickle)
    student = build_student_from_config(checkpoint, config.checkpoint)
    student.load_state_dict(read_student_state(checkpoint, config.checkpoint, student))
    student.eval()
    model = load_extracted(config.output, call)
    model.eval()

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, student.img_size, student.img_size, generator=generator)
    with torch.no_grad():
        ours = student(images, None)
        theirs = model.forward_features(images)
    # timm's Swin returns NHWC feature maps [B, H, W, C], our student tokens [B, H * W, C]
    theirs = theirs.reshape(ours.shape)
    difference = (ours - theirs).abs().max().item()
    if difference > tolerance:
        raise UsageError(
            f"timm model from {config.output} differs from the student by up to {difference:.2e} "
            f"(tolerance {tolerance:.0e}); if relative position tables were dropped, extract with --keep-rel-pos-bias"
        )
    return (
        f"# verified: {call.module}.{call.class_name} loaded {config.output} with strict=True; features "
        f"{list(theirs.shape)} match the student (max difference {difference:.1e})"
    )
