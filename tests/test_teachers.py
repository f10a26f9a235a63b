import hashlib
import json
import logging
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from open_clip.constants import IMAGENET_MEAN, INCEPTION_MEAN, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from helpers.tiny_clip import tiny_overrides, write_tiny_clip_checkpoint
from helpers.tiny_runs import free_port
from pipeline.errors import UsageError, WeightsUnavailableError
from pipeline.teachers import (
    PIXEL_TEACHER,
    TEACHERS,
    build_teacher,
    get_teacher_spec,
    patchify,
    teacher_input_size,
    unpatchify,
)
from pipeline.teachers.clip import check_spec_against_open_clip
from pipeline.teachers.weights import hub_file_candidates, resolve_published_weights, sha256_file

STUDENT_IMG = 64  # a 4x4 grid with /16 student patches
TINY = tiny_overrides()
TINY_14 = tiny_overrides(patch_size=14)

# name: (patch size, width, input size for a 224 px /16 student)
REAL_SIZES = {
    "clip_vit_base_patch32": (32, 768, 448),
    "clip_vit_base_patch16": (16, 768, 224),
    "clip_vit_large_patch14": (14, 1024, 196),
    "openclip_vit_base_patch32": (32, 768, 448),
    "openclip_vit_large_patch14": (14, 1024, 196),
    "openclip_vit_huge_patch14": (14, 1280, 196),
    "openclip_vit_giant_patch14": (14, 1408, 196),
    "pixel": (16, 768, 224),
}


def build_tiny(weights, name="clip_vit_base_patch16", overrides=TINY):
    """Build teacher `name` with a tiny image tower for the 64 px student."""
    return build_teacher(name, weights, student_img_size=STUDENT_IMG, overrides=overrides)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny QuickGELU CLIP checkpoint with /16 patches on the 4x4 grid of a 64 px student."""
    return write_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", image_size=STUDENT_IMG)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_checkpoint):
    return build_tiny(str(tiny_checkpoint))


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def manual_tokens(teacher, images):
    """Run the image tower by hand up to the last block: [B, 1 + L, D], class token first."""
    visual = teacher.visual
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)

    x = visual.conv1((images - mean) / std)
    x = x.flatten(2).transpose(1, 2)
    class_token = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = block(x)
    return x


def capture_conv_input(teacher, images):
    """Return the tensor that reaches the patch embedding, after the teacher's normalization."""
    captured = []
    handle = teacher.visual.conv1.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        teacher(images)
    finally:
        handle.remove()
    return captured[0]


def constant_images(value, size, batch=2):
    return torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def write_hub_cache_entry(cache, repo_id, filename, source):
    """Lay out `source` as a file of `repo_id` in a Hugging Face Hub cache, as a download does."""
    commit = "0" * 40
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    target = snapshot / filename
    target.write_bytes(source.read_bytes())
    return target


def test_input_size_matches_student_grid():
    assert teacher_input_size(TEACHERS["clip_vit_large_patch14"], 224, 16) == 196
    assert teacher_input_size(TEACHERS["clip_vit_base_patch16"], 224, 16) == 224
    assert teacher_input_size(TEACHERS["clip_vit_base_patch32"], 224, 16) == 448
    assert teacher_input_size(TEACHERS["clip_vit_large_patch14"], 224, 14) == 224
    assert teacher_input_size(TEACHERS["pixel"], 224, 14) == 224


def test_input_size_rejects_partial_patch():
    with pytest.raises(UsageError, match="225 is not a multiple of the student patch size 16"):
        teacher_input_size(TEACHERS["clip_vit_base_patch16"], 225, 16)


def test_registry_names():
    assert set(TEACHERS) == set(REAL_SIZES)


def test_unknown_teacher_lists_names():
    with pytest.raises(UsageError) as error:
        build_teacher("clip_vit_tiny")
    assert "'clip_vit_tiny'" in str(error.value)
    for name in TEACHERS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", sorted(set(TEACHERS) - {PIXEL_TEACHER}))
def test_registry_agrees_with_open_clip(name):
    spec = get_teacher_spec(name)
    pretrained_cfg = check_spec_against_open_clip(spec)
    assert pretrained_cfg["hf_hub"]
    assert tuple(pretrained_cfg["mean"]) == spec.mean


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_every_teacher_builds_on_meta(name):
    patch_size, width, input_size = REAL_SIZES[name]
    weights = None if name == PIXEL_TEACHER else "random"

    teacher = build_teacher(name, weights, student_img_size=224, student_patch_size=16, device="meta")
    targets = teacher(torch.zeros(2, 3, input_size, input_size, device="meta"))

    assert teacher.spec.patch_size == patch_size
    assert teacher.target_dim == width
    assert teacher.input_size == input_size
    assert teacher.grid_size == (14, 14)
    assert targets.shape == (2, 196, width)
    assert targets.dtype == torch.float32


def test_real_size_activation_matches_weights():
    openai = build_teacher("clip_vit_large_patch14", "random", device="meta")
    laion = build_teacher("openclip_vit_large_patch14", "random", device="meta")

    assert openai.describe()["activation"] == "quick_gelu"
    assert laion.describe()["activation"] == "gelu"


def test_published_weights_offline_raises(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        build_teacher("clip_vit_large_patch14", overrides=TINY_14)
    elapsed = time.monotonic() - start

    assert "--teacher-weights" in str(error.value)
    assert "'openai'" in str(error.value)
    assert "clip_vit_large_patch14" in str(error.value)
    assert elapsed < 5


def test_published_weights_unreachable_hub_fails_fast(empty_hub_cache, monkeypatch):
    closed_port = free_port()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        build_teacher("openclip_vit_base_patch32", overrides=tiny_overrides(patch_size=32))
    elapsed = time.monotonic() - start

    assert "--teacher-weights" in str(error.value)
    assert "laion2b_s34b_b79k" in str(error.value)
    assert elapsed < 5


def test_published_weights_from_hub_cache(empty_hub_cache, monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    repo_id = "timm/vit_base_patch16_clip_224.openai"
    cached = write_hub_cache_entry(empty_hub_cache, repo_id, "open_clip_pytorch_model.bin", tiny_checkpoint)

    teacher = build_tiny(None)

    assert teacher.weights.source == "openai"
    assert teacher.weights.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert teacher.describe()["random_weights"] is False


def test_hub_candidates_prefer_safetensors():
    default = hub_file_candidates({"hf_hub": "org/repo/"})
    named = hub_file_candidates({"hf_hub": "org/repo/weights.pth"})
    other = hub_file_candidates({"hf_hub": "org/repo/weights.npz"})

    assert default == ("org/repo", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
    assert named == ("org/repo", ["weights.safetensors", "weights.pth"])
    assert other == ("org/repo", ["weights.npz"])


def test_published_weights_without_hub_raises():
    with pytest.raises(WeightsUnavailableError, match="lists no Hugging Face Hub location"):
        resolve_published_weights({"url": "https://example.invalid/w.pt"}, teacher_name="tiny", tag="openai")


def test_sha256_file_streams_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)

    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_local_checkpoint_loads_weights(tiny_checkpoint, tiny_teacher):
    saved = torch.load(tiny_checkpoint)

    assert torch.equal(tiny_teacher.visual.conv1.weight, saved["visual.conv1.weight"])
    assert torch.equal(tiny_teacher.visual.positional_embedding, saved["visual.positional_embedding"])
    assert torch.equal(
        tiny_teacher.visual.transformer.resblocks[1].mlp.c_fc.weight,
        saved["visual.transformer.resblocks.1.mlp.c_fc.weight"],
    )
    assert tiny_teacher.weights.source == str(tiny_checkpoint.resolve())
    assert tiny_teacher.weights.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


def test_safetensors_checkpoint_loads(tmp_path, tiny_checkpoint):
    path = tmp_path / "tiny.safetensors"
    saved = torch.load(tiny_checkpoint)
    save_file(saved, str(path))

    teacher = build_tiny(str(path))

    assert torch.equal(teacher.visual.conv1.weight, saved["visual.conv1.weight"])


def test_fp16_checkpoint_loads_as_float32(tmp_path):
    path = write_tiny_clip_checkpoint(tmp_path / "half.pt", image_size=STUDENT_IMG, dtype=torch.float16)
    saved = torch.load(path)

    teacher = build_tiny(str(path))

    assert teacher.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(teacher.visual.conv1.weight, saved["visual.conv1.weight"].float())


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(UsageError, match="absent.pt"):
        build_tiny(str(path))


def test_directory_checkpoint_raises(tmp_path):
    with pytest.raises(UsageError, match="is not a file"):
        build_tiny(str(tmp_path))


def test_unreadable_checkpoint_raises(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UsageError, match="could not read teacher checkpoint .*garbage.pt"):
        build_tiny(str(path))


def test_checkpoint_without_image_tower_raises(tmp_path):
    path = tmp_path / "trainer.pt"
    torch.save({"model": torch.zeros(2), "optimizer": torch.zeros(1)}, path)
    with pytest.raises(UsageError) as error:
        build_tiny(str(path))
    assert "trainer.pt" in str(error.value)
    assert "first keys: model, optimizer" in str(error.value)


def test_mismatched_checkpoint_names_keys(tiny_checkpoint):
    wider = tiny_overrides(width=96, heads=2)
    with pytest.raises(UsageError) as error:
        build_tiny(str(tiny_checkpoint), overrides=wider)
    assert str(tiny_checkpoint) in str(error.value)
    assert "visual.conv1.weight [64, 3, 16, 16] vs [96, 3, 16, 16]" in str(error.value)


def test_deeper_model_reports_missing_keys(tiny_checkpoint):
    deeper = tiny_overrides(layers=3)
    with pytest.raises(UsageError, match=r"missing: visual\.transformer\.resblocks\.2\."):
        build_tiny(str(tiny_checkpoint), overrides=deeper)


@pytest.mark.parametrize(("checkpoint_img", "checkpoint_grid"), [(96, 6), (48, 3)])
def test_pos_embed_resampled_to_student_grid(tmp_path, caplog, checkpoint_img, checkpoint_grid):
    path = write_tiny_clip_checkpoint(tmp_path / "other_grid.pt", image_size=checkpoint_img)
    saved = torch.load(path)
    old = saved["visual.positional_embedding"]
    assert old.shape == (checkpoint_grid * checkpoint_grid + 1, 64)

    with caplog.at_level(logging.INFO, logger="pipeline.teachers"):
        teacher = build_tiny(str(path))
    new = teacher.visual.positional_embedding

    old_grid = old[1:].reshape(1, checkpoint_grid, checkpoint_grid, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(old_grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(16, 64)
    assert new.shape == (17, 64)
    assert torch.equal(new[0], old[0])
    assert torch.allclose(new[1:], expected, atol=1e-6)
    assert torch.equal(teacher.visual.conv1.weight, saved["visual.conv1.weight"])
    assert f"from {checkpoint_grid * checkpoint_grid} to 16 patches" in caplog.text


def test_targets_are_last_block_before_ln_post(tiny_teacher):
    images = torch.rand(2, 3, STUDENT_IMG, STUDENT_IMG, generator=torch.Generator().manual_seed(0))

    targets = tiny_teacher(images)
    with torch.no_grad():
        tokens = manual_tokens(tiny_teacher, images)
        normed = tiny_teacher.visual.ln_post(tokens)

    assert torch.allclose(targets, tokens[:, 1:], atol=1e-5)
    assert not torch.allclose(targets, normed[:, 1:], atol=1e-3)
    assert "before ln_post" in tiny_teacher.target_layer


def test_class_token_excluded(tiny_teacher):
    images = torch.rand(2, 3, STUDENT_IMG, STUDENT_IMG, generator=torch.Generator().manual_seed(1))

    targets = tiny_teacher(images)
    with torch.no_grad():
        tokens = manual_tokens(tiny_teacher, images)

    assert targets.shape == (2, 16, 64)
    assert torch.allclose(targets[:, 0], tokens[:, 1], atol=1e-5)
    assert not torch.allclose(targets[:, 0], tokens[:, 0], atol=1e-3)


def test_normalization_uses_clip_constants(tiny_teacher):
    at_mean = capture_conv_input(tiny_teacher, constant_images(OPENAI_DATASET_MEAN, STUDENT_IMG))
    one_std_up = [m + s for m, s in zip(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    at_one_std = capture_conv_input(tiny_teacher, constant_images(one_std_up, STUDENT_IMG))
    at_imagenet_mean = capture_conv_input(tiny_teacher, constant_images(IMAGENET_MEAN, STUDENT_IMG))

    assert tiny_teacher.mean == OPENAI_DATASET_MEAN
    assert tiny_teacher.std == OPENAI_DATASET_STD
    assert torch.allclose(at_mean, torch.zeros_like(at_mean), atol=1e-6)
    assert torch.allclose(at_one_std, torch.ones_like(at_one_std), atol=1e-5)
    assert at_imagenet_mean.abs().max() > 0.01


def test_laion_large_uses_its_tag_constants(tmp_path):
    path = write_tiny_clip_checkpoint(
        tmp_path / "l14.pt", "ViT-L-14", image_size=56, quick_gelu=False, overrides=TINY_14
    )
    teacher = build_tiny(str(path), name="openclip_vit_large_patch14", overrides=TINY_14)

    at_half = capture_conv_input(teacher, constant_images(INCEPTION_MEAN, teacher.input_size))

    assert teacher.input_size == 56
    assert teacher.mean == (0.5, 0.5, 0.5)
    assert torch.allclose(at_half, torch.zeros_like(at_half), atol=1e-6)


def test_quick_gelu_mismatch_raises(tiny_checkpoint, monkeypatch):
    wrong = replace(TEACHERS["clip_vit_base_patch16"], quick_gelu=False)
    monkeypatch.setitem(TEACHERS, "clip_vit_base_patch16", wrong)

    with pytest.raises(UsageError, match="quick_gelu=False but open_clip sets quick_gelu=True"):
        build_tiny(str(tiny_checkpoint))


def test_quick_gelu_on_laion_raises(monkeypatch):
    wrong = replace(TEACHERS["openclip_vit_huge_patch14"], quick_gelu=True)
    monkeypatch.setitem(TEACHERS, "openclip_vit_huge_patch14", wrong)

    with pytest.raises(UsageError, match="quick_gelu=True but open_clip sets quick_gelu=False"):
        build_teacher("openclip_vit_huge_patch14", "random", device="meta")


def test_mean_mismatch_raises(monkeypatch):
    wrong = replace(TEACHERS["openclip_vit_large_patch14"], mean=OPENAI_DATASET_MEAN)
    monkeypatch.setitem(TEACHERS, "openclip_vit_large_patch14", wrong)

    with pytest.raises(UsageError, match="mean="):
        build_teacher("openclip_vit_large_patch14", "random", device="meta")


def test_activation_recorded(tiny_teacher, tmp_path):
    path = write_tiny_clip_checkpoint(tmp_path / "gelu.pt", image_size=STUDENT_IMG, quick_gelu=False)
    laion = build_tiny(str(path), name="openclip_vit_base_patch32")

    assert tiny_teacher.describe()["activation"] == "quick_gelu"
    assert isinstance(tiny_teacher.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert laion.describe()["activation"] == "gelu"
    assert isinstance(laion.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_random_weights_flagged(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.teachers"):
        teacher = build_tiny("random")
    described = teacher.describe()

    assert described["random_weights"] is True
    assert described["weights_source"] == "random"
    assert described["weights_sha256"] is None
    assert "RANDOM weights" in caplog.text


def test_describe_is_json_ready(tiny_teacher, tiny_checkpoint):
    described = json.loads(json.dumps(tiny_teacher.describe()))

    assert described["name"] == "clip_vit_base_patch16"
    assert described["open_clip_model"] == "ViT-B-16"
    assert described["pretrained_tag"] == "openai"
    assert described["weights_source"] == str(tiny_checkpoint.resolve())
    assert described["weights_sha256"] == tiny_teacher.weights.sha256
    assert described["random_weights"] is False
    assert described["input_size"] == STUDENT_IMG
    assert described["grid_size"] == [4, 4]
    assert described["target_dim"] == 64
    assert described["mean"] == list(OPENAI_DATASET_MEAN)
    assert described["std"] == list(OPENAI_DATASET_STD)
    assert described["target_layer"] == tiny_teacher.target_layer


def test_teacher_stays_frozen(tiny_teacher):
    images = torch.rand(1, 3, STUDENT_IMG, STUDENT_IMG, requires_grad=True)

    tiny_teacher.train()
    targets = tiny_teacher(images)

    assert not tiny_teacher.training
    assert not tiny_teacher.visual.training
    assert all(not parameter.requires_grad for parameter in tiny_teacher.parameters())
    assert not targets.requires_grad


def test_forward_rejects_wrong_input(tiny_teacher):
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 64, 64\], got \[1, 3, 56, 56\]"):
        tiny_teacher(torch.rand(1, 3, 56, 56))
    with pytest.raises(ValueError, match="float pixels"):
        tiny_teacher(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_override_raises():
    with pytest.raises(UsageError, match="unknown teacher override keys \\['depth'\\]"):
        build_teacher("clip_vit_base_patch16", "random", device="meta", overrides={"depth": 2})


def test_pixel_targets_are_patch_pixels():
    teacher = build_teacher("pixel", student_img_size=STUDENT_IMG, student_patch_size=16)
    images = torch.rand(2, 3, STUDENT_IMG, STUDENT_IMG, generator=torch.Generator().manual_seed(2))

    targets = teacher(images)

    assert targets.shape == (2, 16, 768)
    assert teacher.target_dim == 768
    assert teacher.input_size == STUDENT_IMG
    assert torch.equal(targets[0, 1], images[0, :, 0:16, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(targets[1, 4], images[1, :, 16:32, 0:16].permute(1, 2, 0).reshape(-1))


def test_pixel_follows_student_patch():
    teacher = build_teacher("pixel", student_img_size=224, student_patch_size=14)

    assert teacher.spec.patch_size == 14
    assert teacher.target_dim == 3 * 14 * 14
    assert teacher.grid_size == (16, 16)
    assert teacher.input_size == 224


def test_pixel_describe_has_no_weights():
    described = build_teacher("pixel", student_img_size=STUDENT_IMG).describe()

    assert described["weights_source"] == "none"
    assert described["weights_sha256"] is None
    assert described["random_weights"] is False
    assert described["activation"] is None


def test_pixel_rejects_weights(tiny_checkpoint):
    with pytest.raises(UsageError, match="pixel teacher has no weights"):
        build_teacher("pixel", str(tiny_checkpoint))
    with pytest.raises(UsageError, match="pixel teacher takes no overrides"):
        build_teacher("pixel", overrides=TINY)


def test_unpatchify_inverts_patchify():
    images = torch.rand(2, 3, 48, 32)

    patches = patchify(images, 16)

    assert patches.shape == (2, 6, 768)
    assert torch.equal(unpatchify(patches, 16, (3, 2)), images)
