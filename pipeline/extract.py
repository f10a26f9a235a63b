"""Turn a pre-training checkpoint into student weights that a timm model loads with strict=True.

ViT students become timm `VisionTransformer` weights by default:
- BEiT's separate q and v biases become the fused `qkv` bias, with a zero k bias as in BEiT.
- Layer scale is folded into `attn.proj` and `mlp.fc2` (gamma * (W x + b) = (gamma W) x + gamma b),
  which keeps the function up to float rounding, or kept as `ls1.gamma` / `ls2.gamma` on request.
- Relative position bias tables are dropped, which changes the features when they are non-zero,
  or kept on request, in which case the target is timm `Beit`.
Swin students become timm `SwinTransformer` weights unchanged. The mask token, the head and any
other training state are dropped.
"""

import importlib
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import UsageError
from pipeline.students import Student, StudentSpec, build_student
from pipeline.students.swin import swin_kwargs
from pipeline.students.vit import beit_kwargs

logger = logging.getLogger(__name__)

OutputFormat = Literal["safetensors", "pt"]
OUTPUT_FORMATS = ("safetensors", "pt")
STUDENT_PREFIX = "student."
METADATA_KEY = "timm_call"


@dataclass(frozen=True)
class TimmCall:
    """A timm model constructor call: `{module}.{class_name}(**kwargs)`."""

    module: str
    class_name: str
    kwargs: dict[str, Any]

    def __str__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.module}.{self.class_name}({arguments})"

    def to_json(self) -> str:
        return json.dumps({"module": self.module, "class_name": self.class_name, "kwargs": self.kwargs})

    @classmethod
    def from_json(cls, text: str) -> "TimmCall":
        data = json.loads(text)
        # JSON turns tuples (Swin depths and heads) into lists.
        kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in data["kwargs"].items()}
        return cls(data["module"], data["class_name"], kwargs)


def build_timm_model(call: TimmCall) -> nn.Module:
    """Instantiate the timm model that `call` describes, with freshly initialised weights."""
    if call.module != "timm" and not call.module.startswith("timm."):
        raise UsageError(f"model module {call.module!r} is not part of timm; only timm models can be built")
    model_class = getattr(importlib.import_module(call.module), call.class_name)
    return model_class(**call.kwargs)


def extract_student(
        checkpoint_path: str | Path,
        output_path: str | Path,
        *,
        output_format: OutputFormat | None = None,
        keep_rel_pos_bias: bool = False,
        keep_layer_scale_gamma: bool = False,
        allow_pickle: bool = False,
) -> TimmCall:
    """Write the student weights of a training checkpoint for timm and return the model call.

    The checkpoint is a dict with `model` (state dict with `student.` and `head.` keys) and
    `config["student"]` (`name`, `img_size`, optional `overrides`). `output_format` defaults to
    "pt" when `output_path` ends in .pt, .pth or .bin and to "safetensors" otherwise. Safetensors files
    also store the call as JSON metadata, which `load_extracted` reads. `allow_pickle` loads
    checkpoints that contain arbitrary Python objects; use it only for trusted files.
    """
    checkpoint_path, output_path = Path(checkpoint_path), Path(output_path)
    output_format = resolve_output_format(output_path, output_format)

    checkpoint = load_checkpoint(checkpoint_path, allow_pickle=allow_pickle)
    with torch.device("meta"):
        student = build_student_from_config(checkpoint, checkpoint_path)
    spec, img_size = student.spec, student.img_size
    state = read_student_state(checkpoint, checkpoint_path, student)

    if spec.family == "vit":
        call = vit_timm_call(spec, img_size, keep_rel_pos_bias=keep_rel_pos_bias,
                             keep_layer_scale_gamma=keep_layer_scale_gamma)
        state = convert_vit_state(state, keep_rel_pos_bias=keep_rel_pos_bias,
                                  keep_layer_scale_gamma=keep_layer_scale_gamma)
    else:
        call = TimmCall("timm.models.swin_transformer", "SwinTransformer", swin_kwargs(spec, img_size))
        state = {key: value for key, value in state.items() if key != "mask_token"}

    with torch.device("meta"):
        timm_model = build_timm_model(call)
    _check_state(timm_model, state, error=RuntimeError, subject=f"converted weights for {call.class_name}",
                 hint="this is a bug in extract-student")

    save_weights(state, output_path, output_format, call)
    logger.info("wrote %s weights of %s (%d tensors) to %s", output_format, spec.name, len(state), output_path)
    return call


def resolve_output_format(output_path: Path, output_format: str | None) -> OutputFormat:
    """Return the requested format, or infer it from the suffix (.pt, .pth and .bin: pt, else safetensors).

    .bin is a torch.save file, as in Hugging Face's pytorch_model.bin. Raises UsageError for an
    unknown format or one that contradicts a .pt, .pth, .bin or .safetensors suffix.
    """
    suffix_formats = {".pt": "pt", ".pth": "pt", ".bin": "pt", ".safetensors": "safetensors"}
    suffix_format = suffix_formats.get(output_path.suffix)
    if output_format is None:
        return suffix_format or "safetensors"
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; valid formats: {', '.join(OUTPUT_FORMATS)}")
    if suffix_format is not None and suffix_format != output_format:
        raise UsageError(f"output {output_path} ends in {output_path.suffix} but the format is {output_format}; "
                         f"rename the output or pass --format {suffix_format}")
    return output_format


def load_checkpoint(path: Path, *, allow_pickle: bool = False) -> Any:
    """Load a training checkpoint on the CPU, with torch's weights-only unpickler unless `allow_pickle`."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} not found; pass the .pt file written by `maskdistill pretrain`")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if allow_pickle:
            raise UsageError(f"checkpoint {path} is not a readable torch checkpoint: {error}") from error
        raise UsageError(
            f"checkpoint {path} could not be loaded with torch's weights-only loader ({_unpickler_reason(error)}); "
            "if it is a checkpoint from a source you trust, pass --allow-pickle"
        ) from error
    except (RuntimeError, EOFError) as error:
        raise UsageError(f"checkpoint {path} is not a readable torch checkpoint: {error}") from error


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """Return the first sentence of the weights-only unpickler's reason, without torch's generic advice."""
    text = " ".join(str(error).split())
    _, marker, reason = text.partition("WeightsUnpickler error:")
    if not marker:
        return text[:200]
    return reason.strip().split(". ")[0]


def build_student_from_config(checkpoint: Any, path: Path) -> Student:
    """Build the student that the checkpoint's config describes.

    Two layouts are read: a section `config["student"] = {"name", "img_size", "overrides"}`, or
    the flat pretrain config with `config["student"]` as the name beside `img_size` and
    `student_overrides`.
    """
    if not isinstance(checkpoint, dict):
        raise UsageError(f"checkpoint {path} is a {type(checkpoint).__name__}, not a training checkpoint dict; "
                         "pass the checkpoint written by `maskdistill pretrain`")
    for key in ("model", "config"):
        if key not in checkpoint:
            raise UsageError(f"checkpoint {path} has no {key!r} entry (keys: {sorted(map(str, checkpoint))}); "
                             "pass the checkpoint written by `maskdistill pretrain`")

    config = checkpoint["config"]
    student_config = config.get("student") if isinstance(config, dict) else None
    if isinstance(student_config, str):
        student_config = {"name": student_config, "img_size": config.get("img_size"),
                          "overrides": config.get("student_overrides")}
    if not isinstance(student_config, dict):
        raise UsageError(f"checkpoint {path} has no config['student'] naming the student architecture")
    for key in ("name", "img_size"):
        if student_config.get(key) is None:
            raise UsageError(f"checkpoint {path} has no student {key!r} in its config")

    return build_student(student_config["name"], int(student_config["img_size"]),
                         overrides=student_config.get("overrides"))


def read_student_state(checkpoint: dict, path: Path, student: Student) -> dict[str, torch.Tensor]:
    """Return the `student.` entries of `checkpoint["model"]` without the prefix, checked against `student`."""
    model_state = checkpoint["model"]
    if not isinstance(model_state, dict):
        raise UsageError(f"checkpoint {path}: 'model' is a {type(model_state).__name__}, not a state dict")
    state = {key[len(STUDENT_PREFIX):]: value for key, value in model_state.items() if key.startswith(STUDENT_PREFIX)}
    if not state:
        raise UsageError(f"checkpoint {path}: 'model' has no keys starting with {STUDENT_PREFIX!r}")

    _check_state(student, state, error=UsageError,
                 subject=f"checkpoint {path} for student {student.spec.name} at {student.img_size} px",
                 hint="config['student'] (name, img_size, overrides) must describe the trained student")
    return state


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], *, error: type[Exception], subject: str,
                 hint: str) -> None:
    """Raise `error` naming the first missing, unexpected and mis-shaped keys of `state` for `model`."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    problems = {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "shape": [f"{key} {list(state[key].shape)} != {list(shape)}"
                  for key, shape in expected.items() if key in state and state[key].shape != shape],
    }

    listed = []
    for label, keys in problems.items():
        if keys:
            more = " ..." if len(keys) > 5 else ""
            listed.append(f"{label}: {', '.join(keys[:5])}{more}")
    if listed:
        raise error(f"{subject} does not match the architecture ({'; '.join(listed)}); {hint}")


def vit_timm_call(spec: StudentSpec, img_size: int, *, keep_rel_pos_bias: bool,
                  keep_layer_scale_gamma: bool) -> TimmCall:
    """Return the timm call whose model loads the converted ViT weights with strict=True."""
    init_values = spec.layer_scale_init if keep_layer_scale_gamma else None
    if keep_rel_pos_bias:
        kwargs = beit_kwargs(spec, img_size) | {"init_values": init_values}
        return TimmCall("timm.models.beit", "Beit", kwargs)

    kwargs = {
        "img_size": img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
        "qkv_bias": True,
        "init_values": init_values,
        "num_classes": 0,
        "global_pool": "token",
    }
    return TimmCall("timm.models.vision_transformer", "VisionTransformer", kwargs)


def convert_vit_state(state: dict[str, torch.Tensor], *, keep_rel_pos_bias: bool,
                      keep_layer_scale_gamma: bool) -> dict[str, torch.Tensor]:
    """Convert a ViT student state dict to the keys of `vit_timm_call`'s model (see module docstring)."""
    state = {key: value for key, value in state.items() if key != "mask_token"}
    block_prefixes = sorted({key.split(".attn.")[0] + "." for key in state if ".attn.qkv.weight" in key})

    if not keep_rel_pos_bias:
        _drop_rel_pos_bias(state)
    for prefix in block_prefixes:
        if not keep_layer_scale_gamma:
            _fold_layer_scale(state, prefix)
        if not keep_rel_pos_bias:
            _rename_layer_scale(state, prefix)
            _fuse_qkv_bias(state, prefix)
    return state


def _drop_rel_pos_bias(state: dict[str, torch.Tensor]) -> None:
    tables = [key for key in state if key.endswith("relative_position_bias_table")]
    max_bias = max((state.pop(key).abs().max().item() for key in tables), default=0.0)
    if max_bias > 0:
        logger.warning(
            "dropping relative position bias tables with max |bias| = %.4g changes the features of the "
            "extracted VisionTransformer; pass --keep-rel-pos-bias to export a timm Beit that keeps them",
            max_bias,
        )


def _rename_layer_scale(state: dict[str, torch.Tensor], prefix: str) -> None:
    if f"{prefix}gamma_1" not in state:
        return
    state[f"{prefix}ls1.gamma"] = state.pop(f"{prefix}gamma_1")
    state[f"{prefix}ls2.gamma"] = state.pop(f"{prefix}gamma_2")


def _fold_layer_scale(state: dict[str, torch.Tensor], prefix: str) -> None:
    for gamma_key, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
        if f"{prefix}{gamma_key}" not in state:
            continue
        gamma = state.pop(f"{prefix}{gamma_key}").float()
        for name, scale in (("weight", gamma[:, None]), ("bias", gamma)):
            key = f"{prefix}{layer}.{name}"
            state[key] = (state[key].float() * scale).to(state[key].dtype)


def _fuse_qkv_bias(state: dict[str, torch.Tensor], prefix: str) -> None:
    q_bias = state.pop(f"{prefix}attn.q_bias")
    v_bias = state.pop(f"{prefix}attn.v_bias")
    state[f"{prefix}attn.qkv.bias"] = torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))


def save_weights(state: dict[str, torch.Tensor], path: Path, output_format: OutputFormat, call: TimmCall) -> None:
    """Write `state` as safetensors (with the call and timm version as metadata) or as a .pt state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in state.items()}
    if output_format == "pt":
        torch.save(state, path)
        return
    metadata = {METADATA_KEY: call.to_json(), "timm_version": timm.__version__}
    save_file(state, path, metadata=metadata)


def read_timm_call(path: str | Path) -> TimmCall:
    """Read the timm call stored in the metadata of an extracted safetensors file."""
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
    if METADATA_KEY not in metadata:
        raise UsageError(f"{path} has no {METADATA_KEY!r} metadata; it was not written by extract-student")
    return TimmCall.from_json(metadata[METADATA_KEY])


def load_extracted(path: str | Path, call: TimmCall | None = None) -> nn.Module:
    """Build the timm model for extracted weights at `path` and load them with strict=True.

    Safetensors files store their call. A torch.save file (a zip archive) has no metadata, so it
    needs `call`, the one extract-student returned.
    """
    path = Path(path)
    is_pt = zipfile.is_zipfile(path)
    if call is None:
        if is_pt:
            raise UsageError(f"{path} is a torch.save state dict without metadata; "
                             "pass the timm call that extract-student printed")
        call = read_timm_call(path)

    model = build_timm_model(call)
    state = torch.load(path, map_location="cpu", weights_only=True) if is_pt else load_file(path)
    model.load_state_dict(state, strict=True)
    return model
