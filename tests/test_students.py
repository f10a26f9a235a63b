import pytest
import torch
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer

from pipeline.errors import UsageError
from pipeline.students import STUDENTS, Student, SwinStudent, VitStudent, build_student
from pipeline.students.swin import upsample_mask

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_SWIN = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}

# name -> (target grid side, target patch size, out_dim, out_stride_ratio) at 224 px
REAL_SIZES = {
    "vit_tiny_patch16": (14, 16, 192, 1),
    "vit_small_patch16": (14, 16, 384, 1),
    "vit_base_patch16": (14, 16, 768, 1),
    "vit_large_patch16": (14, 16, 1024, 1),
    "vit_huge_patch14": (16, 14, 1280, 1),
    "swin_tiny_patch4": (14, 16, 768, 2),
    "swin_small_patch4": (14, 16, 768, 2),
    "swin_base_patch4": (14, 16, 1024, 2),
    "swin_large_patch4": (14, 16, 1536, 2),
}


def tiny_student(name: str) -> Student:
    """Build `name` at tiny width and depth with a 4 x 4 target grid (64 px, or 56 px for /14)."""
    overrides = TINY_VIT if name.startswith("vit") else TINY_SWIN
    img_size = 4 * STUDENTS[name].target_patch_size
    torch.manual_seed(0)
    return build_student(name, img_size, overrides=overrides).eval()


def test_registry_covers_expected_names():
    assert set(STUDENTS) == set(REAL_SIZES)


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_student_real_size_on_meta(name):
    grid, target_patch_size, out_dim, ratio = REAL_SIZES[name]
    with torch.device("meta"):
        student = build_student(name)

    assert isinstance(student, Student)
    assert student.spec == STUDENTS[name]
    assert student.img_size == 224
    assert student.grid_size == (grid, grid)
    assert student.target_patch_size == target_patch_size
    assert student.out_dim == out_dim
    assert student.out_stride_ratio == ratio
    assert student.out_grid_size == (grid // ratio, grid // ratio)
    assert student.num_prefix_tokens == (1 if name.startswith("vit") else 0)
    assert all(parameter.is_meta for parameter in student.parameters())


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_student_tiny_forward_shapes(name):
    student = tiny_student(name)
    images = torch.randn(2, 3, student.img_size, student.img_size)
    mask = torch.rand(2, *student.grid_size) < 0.4
    num_tokens = student.num_prefix_tokens + student.out_grid_size[0] * student.out_grid_size[1]

    with torch.no_grad():
        unmasked = student(images)
        masked = student(images, mask)

    assert unmasked.shape == (2, num_tokens, student.out_dim)
    assert masked.shape == (2, num_tokens, student.out_dim)
    assert torch.isfinite(masked).all()


def test_vit_tiny_layout():
    student = tiny_student("vit_tiny_patch16")

    assert isinstance(student, VitStudent)
    assert student.grid_size == (4, 4)
    assert student.out_grid_size == (4, 4)
    assert student.mask_token.shape == (1, 1, 64)
    assert len(student.blocks) == 2
    assert student.blocks[0].attn.relative_position_bias_table is not None
    assert torch.all(student.blocks[0].gamma_1 == 0.1)


def test_swin_tiny_layout():
    student = tiny_student("swin_tiny_patch4")

    assert isinstance(student, SwinStudent)
    assert student.grid_size == (4, 4)
    assert student.out_grid_size == (2, 2)
    assert student.out_stride_ratio == 2
    assert student.out_dim == 256
    assert student.mask_token.shape == (1, 1, 32)


def test_vit_unmasked_matches_timm_beit():
    student = tiny_student("vit_tiny_patch16")
    images = torch.randn(2, 3, 64, 64)

    with torch.no_grad():
        ours = student(images)
        timm_features = Beit.forward_features(student, images)

    assert torch.equal(ours, timm_features)


def test_swin_unmasked_matches_timm_swin():
    student = tiny_student("swin_tiny_patch4")
    images = torch.randn(2, 3, 64, 64)

    with torch.no_grad():
        ours = student(images)
        timm_features = SwinTransformer.forward_features(student, images)

    assert torch.equal(ours, timm_features.flatten(1, 2))


def _cell_pixels(image: torch.Tensor, row: int, col: int, cell: int) -> torch.Tensor:
    return image[..., row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "swin_tiny_patch4"])
def test_mask_hides_masked_pixels(name):
    student = tiny_student(name)
    cell = student.target_patch_size
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    _cell_pixels(changed, 1, 2, cell).normal_()
    _cell_pixels(changed, 3, 0, cell).normal_()
    mask = torch.zeros(1, *student.grid_size, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[0, 3, 0] = True

    with torch.no_grad():
        masked_original = student(images, mask)
        masked_changed = student(changed, mask)
        unmasked_original = student(images)
        unmasked_changed = student(changed)

    assert torch.equal(masked_original, masked_changed)
    assert not torch.allclose(unmasked_original, unmasked_changed)


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "swin_tiny_patch4"])
def test_mask_token_enters_only_where_masked(name):
    student = tiny_student(name)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, *student.grid_size, dtype=torch.bool)
    mask[0, 0, 0] = True
    no_mask = torch.zeros_like(mask)

    with torch.no_grad():
        before_masked = student(images, mask)
        before_unmasked = student(images, no_mask)
        student.mask_token.add_(1.0)
        after_masked = student(images, mask)
        after_unmasked = student(images, no_mask)
        without_mask = student(images)

    assert not torch.allclose(before_masked, after_masked)
    assert torch.equal(before_unmasked, after_unmasked)
    assert torch.equal(before_unmasked, without_mask)


def test_vit_masked_patches_equal_mask_token():
    student = tiny_student("vit_tiny_patch16")
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2, 1] = True
    captured = {}
    student.blocks[0].register_forward_pre_hook(lambda module, args: captured.update(tokens=args[0]))

    with torch.no_grad():
        student(torch.randn(1, 3, 64, 64), mask)

    tokens = captured["tokens"] - student.pos_embed  # [1, 1 + 16, D]
    masked_index = 1 + 2 * 4 + 1
    assert torch.allclose(tokens[0, masked_index], student.mask_token[0, 0], atol=1e-6)
    assert not torch.allclose(tokens[0, masked_index + 1], student.mask_token[0, 0], atol=1e-3)


def test_swin_masked_patches_equal_mask_token():
    student = tiny_student("swin_tiny_patch4")
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 3] = True
    captured = {}
    student.layers[0].register_forward_pre_hook(lambda module, args: captured.update(tokens=args[0]))

    with torch.no_grad():
        student(torch.randn(1, 3, 64, 64), mask)

    patches = captured["tokens"]  # [1, 16, 16, C]
    masked_block = patches[0, 4:8, 12:16]
    neighbour_block = patches[0, 4:8, 8:12]
    assert torch.equal(masked_block, student.mask_token[0, 0].expand(4, 4, -1))
    assert not torch.allclose(neighbour_block, student.mask_token[0, 0].expand(4, 4, -1), atol=1e-3)


def test_upsample_mask_repeats_cells():
    mask = torch.tensor([[[True, False], [False, True]]])

    patch_mask = upsample_mask(mask, 4)

    assert patch_mask.shape == (1, 8, 8)
    assert patch_mask[0, :4, :4].all()
    assert not patch_mask[0, :4, 4:].any()
    assert not patch_mask[0, 4:, :4].any()
    assert patch_mask[0, 4:, 4:].all()


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "swin_tiny_patch4"])
def test_mask_token_gets_gradient(name):
    student = tiny_student(name).train()
    mask = torch.zeros(2, *student.grid_size, dtype=torch.bool)
    mask[:, 0, :2] = True

    student(torch.randn(2, 3, 64, 64), mask).square().mean().backward()

    assert student.mask_token.grad is not None
    assert student.mask_token.grad.abs().sum() > 0
    assert all(parameter.grad is not None for parameter in student.parameters())


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "swin_tiny_patch4"])
def test_no_weight_decay_names_exist(name):
    student = tiny_student(name)
    parameter_names = {parameter_name for parameter_name, _ in student.named_parameters()}

    names = student.no_weight_decay()

    assert names <= parameter_names
    assert "mask_token" in names
    assert any(name.endswith("relative_position_bias_table") for name in names)


def test_no_weight_decay_vit_tokens():
    names = tiny_student("vit_tiny_patch16").no_weight_decay()

    assert "cls_token" in names
    assert "pos_embed" in names
    assert "blocks.1.attn.relative_position_bias_table" in names


def test_forward_rejects_bad_mask_shape():
    student = tiny_student("vit_tiny_patch16")

    with pytest.raises(ValueError, match=r"mask must be \[1, 4, 4\]"):
        student(torch.randn(1, 3, 64, 64), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_forward_rejects_float_mask():
    student = tiny_student("swin_tiny_patch4")

    with pytest.raises(ValueError, match="bool"):
        student(torch.randn(1, 3, 64, 64), torch.zeros(1, 4, 4))


def test_forward_rejects_wrong_image_size():
    student = tiny_student("vit_tiny_patch16")

    with pytest.raises(ValueError, match="images must be"):
        student(torch.randn(1, 3, 32, 32))


def test_build_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match="vit_base_patch16") as error:
        build_student("vit_gigantic_patch16")

    assert "vit_gigantic_patch16" in str(error.value)


def test_build_unknown_override_raises():
    with pytest.raises(UsageError, match="'width'"):
        build_student("vit_tiny_patch16", 64, overrides={"width": 64})


def test_build_swin_override_on_vit_raises():
    with pytest.raises(UsageError, match="'depths'"):
        build_student("vit_tiny_patch16", 64, overrides={"depths": (1, 1)})


def test_build_heads_not_dividing_width_raises():
    with pytest.raises(UsageError, match="not divisible by num_heads 3"):
        build_student("vit_tiny_patch16", 64, overrides={"embed_dim": 64, "depth": 1, "num_heads": 3})


def test_build_swin_stage_count_mismatch_raises():
    with pytest.raises(UsageError, match="one entry per stage"):
        build_student("swin_tiny_patch4", 64, overrides={"depths": (1, 1, 1), "num_heads": (1, 2, 2, 2)})


@pytest.mark.parametrize(("name", "img_size"), [("vit_tiny_patch16", 200), ("vit_huge_patch14", 224 + 16),
                                                ("swin_tiny_patch4", 48)])
def test_build_bad_img_size_raises(name, img_size):
    with torch.device("meta"), pytest.raises(UsageError, match=f"img_size {img_size}"):
        build_student(name, img_size)


def test_build_drop_path_rate_replaces_default():
    student = build_student("vit_tiny_patch16", 64, drop_path_rate=0.25, overrides=TINY_VIT)

    assert student.spec.drop_path_rate == 0.25
    assert student.blocks[-1].drop_path1.drop_prob == pytest.approx(0.25)


def test_build_default_drop_path_from_registry():
    with torch.device("meta"):
        student = build_student("swin_base_patch4")

    assert student.spec.drop_path_rate == 0.3
    assert student.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_build_swin_list_overrides_become_tuples():
    student = build_student("swin_tiny_patch4", 64, overrides={"embed_dim": 32, "depths": [1, 1, 1, 1],
                                                               "num_heads": [1, 2, 2, 2]})

    assert student.spec.depth == (1, 1, 1, 1)
    assert student.spec.num_heads == (1, 2, 2, 2)


def test_build_swin_three_stages_has_ratio_one():
    student = build_student("swin_tiny_patch4", 64, overrides={"embed_dim": 32, "depths": (1, 1, 1),
                                                               "num_heads": (1, 2, 2)})

    assert student.out_stride_ratio == 1
    assert student.out_grid_size == (4, 4)
    assert student(torch.randn(1, 3, 64, 64)).shape == (1, 16, 128)


def test_build_large_layer_scale_init():
    student = build_student("vit_large_patch16", 64, overrides={"embed_dim": 64, "depth": 1, "num_heads": 2})

    assert student.spec.layer_scale_init == 1e-5
    assert torch.allclose(student.blocks[0].gamma_1, torch.full((64,), 1e-5))
