import pytest
import torch

from pipeline.errors import UsageError
from pipeline.heads import FcHead, VitHead, build_head, tokens_to_target_grid
from pipeline.students import Student, build_student

TARGET_DIM = 24
TINY_HEAD = {"depth": 1, "width": 32, "num_heads": 2}


def tiny_vit() -> Student:
    torch.manual_seed(0)
    return build_student("vit_tiny_patch16", 64, overrides={"embed_dim": 64, "depth": 1, "num_heads": 2}).eval()


def tiny_swin() -> Student:
    torch.manual_seed(0)
    overrides = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}
    return build_student("swin_tiny_patch4", 64, overrides=overrides).eval()


@pytest.mark.parametrize("kind", ["fc", "vit"])
@pytest.mark.parametrize("make_student", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_head_output_shape(kind, make_student):
    student = make_student()
    head = build_head(kind, student, TARGET_DIM, **TINY_HEAD)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True

    predictions = head(student(torch.randn(2, 3, 64, 64), mask))

    assert predictions.shape == (2, 16, TARGET_DIM)
    assert torch.isfinite(predictions).all()


@pytest.mark.parametrize("kind", ["fc", "vit"])
def test_head_kind_class(kind):
    head = build_head(kind, tiny_vit(), TARGET_DIM, **TINY_HEAD)

    assert isinstance(head, FcHead if kind == "fc" else VitHead)
    assert head.target_dim == TARGET_DIM


def test_head_swin_predicts_four_cells_per_token():
    head = build_head("fc", tiny_swin(), TARGET_DIM)

    assert head.out_stride_ratio == 2
    assert head.proj.out_features == 4 * TARGET_DIM
    assert head.num_tokens == 4


def test_fc_head_drops_class_token():
    head = build_head("fc", tiny_vit(), TARGET_DIM)
    features = torch.randn(2, 17, 64)
    changed = features.clone()
    changed[:, 0] += 5.0

    with torch.no_grad():
        predictions = head(features)
        predictions_changed = head(changed)
        expected = head.proj(head.norm(features[:, 1:]))

    assert torch.equal(predictions, predictions_changed)
    assert torch.allclose(predictions, expected)


def test_fc_head_swin_token_covers_its_cells():
    head = build_head("fc", tiny_swin(), TARGET_DIM)
    features = torch.randn(1, 4, 256)
    changed = features.clone()
    changed[:, 1] += 5.0  # output token (row 0, column 1) covers target rows 0-1, columns 2-3

    with torch.no_grad():
        difference = (head(features) - head(changed)).abs().sum(-1).reshape(4, 4)

    changed_cells = difference > 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(changed_cells, expected)


def test_vit_head_mixes_tokens():
    head = build_head("vit", tiny_vit(), TARGET_DIM, **TINY_HEAD).eval()
    features = torch.randn(1, 17, 64)
    changed = features.clone()
    changed[:, 0] += 5.0

    with torch.no_grad():
        difference = (head(features) - head(changed)).abs().sum(-1)

    assert (difference > 0).all()


def test_tokens_to_target_grid_order():
    height, width, ratio = 2, 3, 2
    tokens = torch.arange(height * width * ratio * ratio, dtype=torch.float32).reshape(1, height * width, ratio * ratio)

    cells = tokens_to_target_grid(tokens, (height, width), ratio)

    assert cells.shape == (1, height * ratio * width * ratio, 1)
    grid = cells.reshape(height * ratio, width * ratio)
    for token_row in range(height):
        for token_col in range(width):
            for i in range(ratio):
                for j in range(ratio):
                    expected = tokens[0, token_row * width + token_col, i * ratio + j]
                    assert grid[token_row * ratio + i, token_col * ratio + j] == expected


def test_tokens_to_target_grid_ratio_one_is_identity():
    tokens = torch.randn(2, 6, 5)

    assert torch.equal(tokens_to_target_grid(tokens, (2, 3), 1), tokens)


@pytest.mark.parametrize("kind", ["fc", "vit"])
def test_head_every_parameter_gets_gradient(kind):
    student = tiny_swin().train()
    head = build_head(kind, student, TARGET_DIM, **TINY_HEAD)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True

    head(student(torch.randn(2, 3, 64, 64), mask)).square().mean().backward()

    assert all(parameter.grad is not None for parameter in head.parameters())
    assert all(parameter.grad is not None for parameter in student.parameters())


def test_vit_head_no_weight_decay_names_exist():
    head = build_head("vit", tiny_vit(), TARGET_DIM, **TINY_HEAD)
    parameter_names = {name for name, _ in head.named_parameters()}

    assert head.no_weight_decay() <= parameter_names


def test_head_rejects_wrong_token_count():
    head = build_head("fc", tiny_vit(), TARGET_DIM)

    with pytest.raises(ValueError, match=r"\[B, 17, C\]"):
        head(torch.randn(1, 16, 64))


def test_build_head_unknown_kind_raises():
    with pytest.raises(UsageError, match="'mlp'.*fc, vit"):
        build_head("mlp", tiny_vit(), TARGET_DIM)


def test_build_head_width_not_divisible_raises():
    with pytest.raises(UsageError, match="width 30"):
        build_head("vit", tiny_vit(), TARGET_DIM, width=30, num_heads=4)


def test_build_head_nonpositive_target_dim_raises():
    with pytest.raises(UsageError, match="target_dim"):
        build_head("fc", tiny_vit(), 0)
