import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from pipeline.errors import UsageError
from pipeline.extract import TimmCall, build_timm_model, extract_student, load_extracted, read_timm_call
from pipeline.heads import build_head
from pipeline.students import Student, build_student
from stages.extract_student import ExtractStudentConfig, run_extract_student

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_SWIN = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}
IMG_SIZE = 64


def perturbed_vit(*, zero_rel_pos_bias: bool) -> Student:
    """Tiny ViT student with non-trivial q/v biases, layer scale and (optionally) rel pos tables."""
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16", IMG_SIZE, overrides=TINY_VIT).eval()
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(("q_bias", "v_bias")):
                parameter.normal_(0.0, 0.5)
            elif name.endswith("relative_position_bias_table"):
                parameter.zero_() if zero_rel_pos_bias else parameter.normal_(0.0, 0.5)
    return student


def perturbed_swin() -> Student:
    torch.manual_seed(0)
    student = build_student("swin_tiny_patch4", IMG_SIZE, overrides=TINY_SWIN).eval()
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_(0.0, 0.5)
    return student


def write_checkpoint(path: Path, student: Student, overrides: dict, **extra) -> Path:
    """Save a checkpoint laid out like the trainer's: prefixed student and head weights plus config."""
    head = build_head("fc", student, 8)
    model = {f"student.{key}": value for key, value in student.state_dict().items()}
    model |= {f"head.{key}": value for key, value in head.state_dict().items()}
    student_config = {"name": student.spec.name, "img_size": student.img_size, "overrides": overrides,
                      "drop_path_rate": 0.1}
    torch.save({"model": model, "config": {"student": student_config}, "step": 7, **extra}, path)
    return path


def student_features(student: Student, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(images)


def timm_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(images)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1))


def test_extract_vit_folded_layer_scale(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=True)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / "vit.safetensors")
    model = load_extracted(tmp_path / "vit.safetensors")
    state = load_file(tmp_path / "vit.safetensors")

    assert call.module == "timm.models.vision_transformer"
    assert call.class_name == "VisionTransformer"
    assert call.kwargs["init_values"] is None
    assert isinstance(model, VisionTransformer)
    assert not any("gamma" in key for key in state)
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_extract_vit_kept_layer_scale(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=True)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / "vit.safetensors", keep_layer_scale_gamma=True)
    model = load_extracted(tmp_path / "vit.safetensors")
    state = load_file(tmp_path / "vit.safetensors")

    assert call.class_name == "VisionTransformer"
    assert call.kwargs["init_values"] == 0.1
    assert torch.equal(state["blocks.1.ls2.gamma"], student.blocks[1].gamma_2.detach())
    assert torch.equal(state["blocks.0.attn.proj.weight"], student.blocks[0].attn.proj.weight.detach())
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_extract_beit_keeps_rel_pos_bias(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=False)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / "beit.safetensors", keep_rel_pos_bias=True,
                           keep_layer_scale_gamma=True)
    model = load_extracted(tmp_path / "beit.safetensors")

    assert call.module == "timm.models.beit"
    assert call.class_name == "Beit"
    assert call.kwargs["use_rel_pos_bias"] is True
    assert call.kwargs["init_values"] == 0.1
    assert isinstance(model, Beit)
    assert model.blocks[0].attn.relative_position_bias_table.abs().max() > 0
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_extract_beit_folded_layer_scale(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=False)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / "beit.safetensors", keep_rel_pos_bias=True)
    model = load_extracted(tmp_path / "beit.safetensors")

    assert call.class_name == "Beit"
    assert call.kwargs["init_values"] is None
    assert model.blocks[0].gamma_1 is None
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_extract_vit_fuses_qkv_bias(tmp_path):
    student = perturbed_vit(zero_rel_pos_bias=True)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    extract_student(checkpoint, tmp_path / "vit.safetensors")
    qkv_bias = load_file(tmp_path / "vit.safetensors")["blocks.0.attn.qkv.bias"]

    attention = student.blocks[0].attn
    assert torch.equal(qkv_bias[:64], attention.q_bias.detach())
    assert torch.equal(qkv_bias[64:128], torch.zeros(64))
    assert torch.equal(qkv_bias[128:], attention.v_bias.detach())


def test_extract_warns_on_nonzero_rel_pos_bias(tmp_path, images, caplog):
    student = perturbed_vit(zero_rel_pos_bias=False)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)
    max_bias = max(block.attn.relative_position_bias_table.abs().max().item() for block in student.blocks)

    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        extract_student(checkpoint, tmp_path / "vit.safetensors")
    model = load_extracted(tmp_path / "vit.safetensors")

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"max |bias| = {max_bias:.4g}" in warnings[0]
    assert "--keep-rel-pos-bias" in warnings[0]
    assert not torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-3)


def test_extract_zero_rel_pos_bias_no_warning(tmp_path, caplog):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_vit(zero_rel_pos_bias=True), TINY_VIT)

    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        extract_student(checkpoint, tmp_path / "vit.safetensors")

    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_extract_swin_round_trip(tmp_path, images):
    student = perturbed_swin()
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_SWIN)

    call = extract_student(checkpoint, tmp_path / "swin.safetensors")
    model = load_extracted(tmp_path / "swin.safetensors")

    assert call.module == "timm.models.swin_transformer"
    assert call.class_name == "SwinTransformer"
    assert call.kwargs["depths"] == (1, 1, 1, 1)
    assert isinstance(model, SwinTransformer)
    assert torch.allclose(timm_features(model, images).flatten(1, 2), student_features(student, images), atol=1e-5)


def test_extract_drops_training_only_keys(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_swin(), TINY_SWIN)

    extract_student(checkpoint, tmp_path / "swin.safetensors")
    keys = set(load_file(tmp_path / "swin.safetensors"))

    assert "mask_token" not in keys
    assert not any(key.startswith(("head.", "student.")) for key in keys)


@pytest.mark.parametrize(("file_name", "output_format"), [("vit.pt", None), ("vit.pth", None), ("vit.bin", None), ("vit.bin", "pt")])
def test_extract_pt_output(tmp_path, images, file_name, output_format):
    student = perturbed_vit(zero_rel_pos_bias=True)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / file_name, output_format=output_format)
    state = torch.load(tmp_path / file_name, map_location="cpu", weights_only=True)
    model = build_timm_model(call)
    model.load_state_dict(state, strict=True)
    loaded = load_extracted(tmp_path / file_name, call)

    assert isinstance(state, dict)
    assert isinstance(loaded, VisionTransformer)
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_extract_safetensors_metadata(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_swin(), TINY_SWIN)

    call = extract_student(checkpoint, tmp_path / "out" / "swin.safetensors")
    with safe_open(str(tmp_path / "out" / "swin.safetensors"), framework="pt") as weights:
        metadata = weights.metadata()

    assert read_timm_call(tmp_path / "out" / "swin.safetensors") == call
    assert metadata["timm_version"] == timm.__version__


def test_timm_call_string_builds_model(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=True)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)

    call = extract_student(checkpoint, tmp_path / "vit.safetensors")
    model = eval(str(call), {"timm": timm})
    model.load_state_dict(load_file(tmp_path / "vit.safetensors"), strict=True)

    assert str(call).startswith("timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=16,")
    assert torch.allclose(timm_features(model, images), student_features(student, images), atol=1e-5)


def test_timm_call_json_round_trip():
    call = TimmCall("timm.models.swin_transformer", "SwinTransformer", {"depths": (1, 2), "window_size": 7})

    assert TimmCall.from_json(call.to_json()) == call


def test_build_timm_model_rejects_other_modules():
    with pytest.raises(UsageError, match="'os' is not part of timm"):
        build_timm_model(TimmCall("os", "system", {}))


def test_stage_run_returns_loading_snippet(tmp_path, images):
    student = perturbed_vit(zero_rel_pos_bias=False)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_VIT)
    config = ExtractStudentConfig(checkpoint, tmp_path / "beit.pt", keep_rel_pos_bias=True, keep_layer_scale_gamma=True)

    snippet = run_extract_student(config)
    namespace: dict = {}
    exec(snippet, namespace)

    assert "timm.models.beit.Beit(" in snippet.splitlines()[1]
    assert isinstance(namespace["model"], Beit)
    assert torch.allclose(timm_features(namespace["model"], images), student_features(student, images), atol=1e-5)


def test_extract_missing_config_raises(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no 'config' entry"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_missing_model_raises(tmp_path):
    torch.save({"config": {"student": {"name": "vit_tiny_patch16", "img_size": 64}}}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no 'model' entry"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_missing_student_config_raises(tmp_path):
    torch.save({"model": {}, "config": {"teacher": "pixel"}}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match=r"config\['student'\]"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_missing_img_size_raises(tmp_path):
    torch.save({"model": {}, "config": {"student": {"name": "vit_tiny_patch16"}}}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no student 'img_size'"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_flat_pretrain_config(tmp_path, images):
    student = perturbed_swin()
    model = {f"student.{key}": value for key, value in student.state_dict().items()}
    config = {"student": "swin_tiny_patch4", "img_size": IMG_SIZE, "student_overrides": {**TINY_SWIN, "depths": [1, 1, 1, 1]},
              "drop_path": None}
    torch.save({"model": model, "config": config}, tmp_path / "ckpt.pt")

    call = extract_student(tmp_path / "ckpt.pt", tmp_path / "swin.safetensors")
    extracted = load_extracted(tmp_path / "swin.safetensors")

    assert call.kwargs["depths"] == (1, 1, 1, 1)
    assert torch.allclose(timm_features(extracted, images).flatten(1, 2), student_features(student, images), atol=1e-5)


def test_extract_flat_config_without_img_size_raises(tmp_path):
    torch.save({"model": {}, "config": {"student": "vit_tiny_patch16"}}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no student 'img_size'"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_bare_state_dict_raises(tmp_path):
    torch.save(perturbed_swin().state_dict(), tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no 'model' entry"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_no_student_keys_raises(tmp_path):
    student = perturbed_swin()
    config = {"student": {"name": "swin_tiny_patch4", "img_size": 64, "overrides": TINY_SWIN}}
    torch.save({"model": student.state_dict(), "config": config}, tmp_path / "ckpt.pt")

    with pytest.raises(UsageError, match="no keys starting with 'student.'"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_architecture_mismatch_raises(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_vit(zero_rel_pos_bias=True),
                                  {"embed_dim": 64, "depth": 3, "num_heads": 2})

    with pytest.raises(UsageError, match="missing: blocks.2.") as error:
        extract_student(checkpoint, tmp_path / "out.safetensors")

    assert "vit_tiny_patch16 at 64 px" in str(error.value)


def test_extract_shape_mismatch_raises(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_vit(zero_rel_pos_bias=True),
                                  {"embed_dim": 128, "depth": 2, "num_heads": 2})

    with pytest.raises(UsageError, match=r"shape: .*\[1, 1, 64\] != \[1, 1, 128\]"):
        extract_student(checkpoint, tmp_path / "out.safetensors")


def test_extract_missing_file_raises(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        extract_student(tmp_path / "absent.pt", tmp_path / "out.safetensors")


def test_extract_unreadable_file_raises(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")

    with pytest.raises(UsageError, match="ckpt.pt"):
        extract_student(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")


def test_extract_pickled_object_needs_allow_pickle(tmp_path, images):
    student = perturbed_swin()
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", student, TINY_SWIN, output_dir=tmp_path)

    with pytest.raises(UsageError, match="PosixPath.*--allow-pickle"):
        extract_student(checkpoint, tmp_path / "out.safetensors")
    extract_student(checkpoint, tmp_path / "out.safetensors", allow_pickle=True)

    assert torch.allclose(timm_features(load_extracted(tmp_path / "out.safetensors"), images).flatten(1, 2),
                          student_features(student, images), atol=1e-5)


@pytest.mark.parametrize(("file_name", "output_format", "suggested"), [("out.pt", "safetensors", "pt"),
                                                                      ("out.safetensors", "pt", "safetensors")])
def test_extract_format_conflict_raises(tmp_path, file_name, output_format, suggested):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_swin(), TINY_SWIN)

    with pytest.raises(UsageError, match=f"--format {suggested}$"):
        extract_student(checkpoint, tmp_path / file_name, output_format=output_format)


def test_extract_unknown_format_raises(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_swin(), TINY_SWIN)

    with pytest.raises(UsageError, match="'onnx'"):
        extract_student(checkpoint, tmp_path / "out.onnx", output_format="onnx")


def test_load_extracted_pt_needs_call(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt.pt", perturbed_swin(), TINY_SWIN)
    call = extract_student(checkpoint, tmp_path / "swin.pt")

    with pytest.raises(UsageError, match="timm call"):
        load_extracted(tmp_path / "swin.pt")
    model = load_extracted(tmp_path / "swin.pt", call)

    assert isinstance(model, SwinTransformer)
