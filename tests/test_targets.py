import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError
from pipeline.targets import (
    TARGET_NORM_EPS,
    TargetNorm,
    apply_target_norm,
    normalize_targets,
    parse_target_norm,
)


def _targets(shape=(2, 5, 32), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 3 + 7


def test_normalize_targets_zero_mean_unit_variance():
    normalized = normalize_targets(_targets())

    assert normalized.shape == (2, 5, 32)
    assert torch.allclose(normalized.mean(dim=-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(normalized.var(dim=-1, unbiased=False), torch.ones(2, 5), atol=1e-4)


def test_normalize_targets_matches_formula():
    targets = _targets()
    mean = targets.mean(dim=-1, keepdim=True)
    variance = targets.var(dim=-1, unbiased=False, keepdim=True)
    expected = (targets - mean) / torch.sqrt(variance + TARGET_NORM_EPS)

    assert torch.allclose(normalize_targets(targets), expected, atol=1e-5)


def test_normalize_targets_has_no_affine():
    targets = _targets()
    layer_norm = F.layer_norm(targets, (32,), weight=None, bias=None, eps=1e-6)

    assert torch.equal(normalize_targets(targets), layer_norm)


def test_normalize_targets_invariant_per_patch_affine():
    targets = _targets()
    scale = torch.rand(2, 5, 1) + 0.5
    shift = torch.randn(2, 5, 1)

    transformed = targets * scale + shift

    assert torch.allclose(normalize_targets(transformed), normalize_targets(targets), atol=1e-4)


def test_normalize_targets_half_input_returns_float32():
    normalized = normalize_targets(_targets().half())

    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, normalize_targets(_targets()), atol=1e-2)


def test_normalize_targets_constant_patch_is_zero():
    targets = torch.full((1, 2, 8), 5.0)

    assert torch.equal(normalize_targets(targets), torch.zeros(1, 2, 8))


def test_apply_target_norm_none_keeps_values():
    targets = _targets().double()
    result = apply_target_norm(targets, "none")

    assert result.dtype == torch.float32
    assert torch.equal(result, targets.float())


def test_apply_target_norm_layernorm():
    targets = _targets()

    assert torch.equal(apply_target_norm(targets, TargetNorm.LAYERNORM), normalize_targets(targets))
    assert torch.equal(apply_target_norm(targets, "layernorm"), normalize_targets(targets))


def test_parse_target_norm_valid_strings():
    assert parse_target_norm("layernorm") is TargetNorm.LAYERNORM
    assert parse_target_norm("none") is TargetNorm.NONE
    assert parse_target_norm(TargetNorm.NONE) is TargetNorm.NONE


def test_parse_target_norm_invalid_lists_choices():
    with pytest.raises(UsageError) as raised:
        parse_target_norm("batchnorm")

    assert "'batchnorm'" in str(raised.value)
    assert "layernorm, none" in str(raised.value)
