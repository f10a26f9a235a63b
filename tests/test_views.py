import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.bad_images import encode, gradient_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from pipeline.errors import UsageError
from pipeline.images import load_image
from pipeline.views import (
    PARAM_DIM,
    PARAM_NAMES,
    AugmentConfig,
    ViewParams,
    pil_to_tensor,
    render_views,
    sample_crop_box,
    sample_view_params,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

NO_JITTER = dict(brightness=1.0, contrast=1.0, saturation=1.0, jitter_order=(0, 1, 2))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def source_image(width: int = 320, height: int = 240):
    return load_image(encode(gradient_image(width, height), "PNG"))


def test_augment_config_dict_round_trip():
    config = AugmentConfig(scale=[0.2, 0.9], hflip_prob=0.0, interpolation="bilinear")
    fields = json.loads(json.dumps(config.to_dict()))

    assert fields["scale"] == [0.2, 0.9]
    assert AugmentConfig.from_dict(fields) == config
    assert config.scale == (0.2, 0.9)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"scale": (0.5, 0.1)}, "scale"),
        ({"scale": (0.1, 1.5)}, "scale"),
        ({"scale": (0.1,)}, "scale"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"contrast": -0.1}, "contrast"),
        ({"interpolation": "cubic"}, "interpolation"),
    ],
)
def test_augment_config_rejects_invalid(fields, name):
    with pytest.raises(UsageError, match=name):
        AugmentConfig(**fields)


def test_augment_config_from_dict_unknown_field():
    with pytest.raises(UsageError, match="hue"):
        AugmentConfig.from_dict({"hue": 0.1})


def test_view_params_array_round_trip():
    params = ViewParams(1.0, 2.0, 30.0, 40.0, True, 0.8, 1.1, 1.3, (2, 0, 1))
    array = params.to_array()

    assert array.dtype == np.float64
    assert array.shape == (PARAM_DIM,)
    assert len(PARAM_NAMES) == PARAM_DIM
    assert array[PARAM_NAMES.index("flip")] == 1.0
    assert ViewParams.from_array(array) == params


def test_view_params_from_array_rejects_invalid():
    good = ViewParams(1.0, 2.0, 30.0, 40.0, False, 0.8, 1.1, 1.3, (2, 0, 1)).to_array()
    bad_order = good.copy()
    bad_order[8:11] = (0, 0, 1)
    bad_flip = good.copy()
    bad_flip[4] = 0.5

    with pytest.raises(ValueError, match="shape"):
        ViewParams.from_array(good[:-1])
    with pytest.raises(ValueError, match="jitter_order"):
        ViewParams.from_array(bad_order)
    with pytest.raises(ValueError, match="flip"):
        ViewParams.from_array(bad_flip)


def test_sample_view_params_deterministic():
    config = AugmentConfig()
    first = sample_view_params((640, 480), 7, 123, 1, config)
    np.random.seed(999)  # global RNG state must not matter
    random.seed(999)
    np.random.rand(10)
    second = sample_view_params((640, 480), 7, 123, 1, config)

    assert first == second


def test_sample_view_params_same_in_subprocess():
    config = AugmentConfig()
    expected = [sample_view_params((640, 480), 7, index, 2, config).to_array().tolist() for index in range(5)]
    script = (
        "import json; from pipeline.views import AugmentConfig, sample_view_params; "
        "print(json.dumps([sample_view_params((640, 480), 7, i, 2, AugmentConfig()).to_array().tolist() "
        "for i in range(5)]))"
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=True
    )

    assert json.loads(result.stdout) == expected


def test_sample_view_params_differ_by_index():
    config = AugmentConfig()
    base = sample_view_params((640, 480), 0, 5, 0, config)

    assert sample_view_params((640, 480), 0, 5, 1, config) != base
    assert sample_view_params((640, 480), 0, 6, 0, config) != base
    assert sample_view_params((640, 480), 1, 5, 0, config) != base


def test_sample_view_params_jitter_ranges():
    config = AugmentConfig(brightness=0.4, contrast=0.0, saturation=0.2)
    samples = [sample_view_params((64, 64), 3, index, 0, config) for index in range(200)]
    brightness = np.array([params.brightness for params in samples])
    flips = np.array([params.flip for params in samples])

    assert brightness.min() >= 0.6
    assert brightness.max() <= 1.4
    assert brightness.std() > 0.1
    assert all(params.contrast == 1.0 for params in samples)
    assert all(0.8 <= params.saturation <= 1.2 for params in samples)
    assert 60 < flips.sum() < 140
    assert len({params.jitter_order for params in samples}) == 6


def test_sample_view_params_crop_independent_of_jitter():
    plain = sample_view_params((640, 480), 4, 9, 0, AugmentConfig())
    other_scale = sample_view_params((640, 480), 4, 9, 0, AugmentConfig(scale=(0.5, 0.6)))

    assert other_scale.flip == plain.flip
    assert other_scale.brightness == plain.brightness
    assert other_scale.box != plain.box


def test_sample_view_params_rejects_negative_index():
    with pytest.raises(ValueError, match="image_index"):
        sample_view_params((64, 64), 0, -1, 0, AugmentConfig())


def test_crop_box_extreme_aspect_falls_back():
    box = sample_crop_box(np.random.default_rng(0), (2000, 20), (0.08, 1.0), (3 / 4, 4 / 3))

    assert box.fallback
    assert (box.left, box.top, box.width, box.height) == (986, 0, 27, 20)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    seed=st.integers(0, 2**32 - 1),
    scale_low=st.floats(0.01, 1.0),
    ratio_low=st.floats(0.2, 1.0),
    ratio_high=st.floats(1.0, 5.0),
)
def test_crop_box_property(width, height, seed, scale_low, ratio_low, ratio_high):
    scale, ratio = (scale_low, 1.0), (ratio_low, ratio_high)
    box = sample_crop_box(np.random.default_rng(seed), (width, height), scale, ratio)

    assert box.width >= 1
    assert box.height >= 1
    assert 0 <= box.left <= width - box.width
    assert 0 <= box.top <= height - box.height
    if not box.fallback:
        # Each side is rounded to whole pixels, so the drawn sides lie within +-0.5 of them.
        assert (box.width + 0.5) / max(box.height - 0.5, 1e-9) >= ratio[0] * (1 - 1e-9)
        assert (box.width - 0.5) / (box.height + 0.5) <= ratio[1] * (1 + 1e-9)
        assert (box.width + 0.5) * (box.height + 0.5) >= scale[0] * width * height * (1 - 1e-9)
        assert (box.width - 0.5) * (box.height - 0.5) <= scale[1] * width * height * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), seed=st.integers(0, 2**63 - 1))
def test_view_params_box_inside_image(width, height, seed):
    params = sample_view_params((width, height), seed, 3, 1, AugmentConfig())
    left, top, right, bottom = params.box

    assert 0 <= left < right <= width
    assert 0 <= top < bottom <= height


def test_render_views_sizes_and_mode():
    image = source_image()
    params = sample_view_params(image.size, 0, 0, 0, AugmentConfig())
    student, teacher = render_views(image, params, [224, 196], AugmentConfig())

    assert student.size == (224, 224)
    assert teacher.size == (196, 196)
    assert student.mode == "RGB"
    assert teacher.mode == "RGB"


def test_render_views_student_teacher_agree():
    image = load_image(encode(gradient_image(1200, 900), "JPEG", quality=95))
    params = ViewParams(100.0, 50.0, 800.0, 700.0, True, 1.2, 0.8, 1.3, (1, 2, 0))
    student, teacher = render_views(image, params, [224, 196], AugmentConfig())
    student_at_teacher_size = student.resize((196, 196), Image.Resampling.BICUBIC)

    assert np.abs(pixels(student_at_teacher_size) - pixels(teacher)).mean() < 2.0


def test_render_views_flip_mirrors():
    image = source_image()
    unflipped = ViewParams(10.0, 20.0, 200.0, 180.0, False, 1.1, 0.9, 1.2, (2, 1, 0))
    flipped = ViewParams(10.0, 20.0, 200.0, 180.0, True, 1.1, 0.9, 1.2, (2, 1, 0))
    (plain,) = render_views(image, unflipped, [64], AugmentConfig())
    (mirrored,) = render_views(image, flipped, [64], AugmentConfig())

    assert np.array_equal(pixels(mirrored), pixels(ImageOps.mirror(plain)))
    assert not np.array_equal(pixels(mirrored), pixels(plain))


def test_render_views_unit_jitter_unchanged():
    image = source_image()
    params = ViewParams(10.0, 20.0, 200.0, 180.0, False, **NO_JITTER)
    (view,) = render_views(image, params, [64], AugmentConfig())
    crop = image.crop_resize(params.box, 64)

    assert np.array_equal(pixels(view), pixels(crop))


def test_render_views_brightness_applied():
    image = source_image()
    params = ViewParams(0.0, 0.0, 320.0, 240.0, False, 0.5, 1.0, 1.0, (0, 1, 2))
    (view,) = render_views(image, params, [32], AugmentConfig())
    crop = image.crop_resize(params.box, 32)

    assert abs(pixels(view).mean() - pixels(crop).mean() * 0.5) < 1.0


def test_render_views_jitter_order_matters():
    image = source_image()
    first = ViewParams(0.0, 0.0, 320.0, 240.0, False, 1.4, 0.6, 1.0, (0, 1, 2))
    second = ViewParams(0.0, 0.0, 320.0, 240.0, False, 1.4, 0.6, 1.0, (1, 0, 2))
    (brightness_first,) = render_views(image, first, [32], AugmentConfig())
    (contrast_first,) = render_views(image, second, [32], AugmentConfig())

    assert not np.array_equal(pixels(brightness_first), pixels(contrast_first))


@pytest.mark.parametrize("size", [(8, 3), (2000, 20), (20, 2000)])
def test_render_views_odd_sizes(size):
    image = load_image(encode(gradient_image(*size), "PNG"))
    config = AugmentConfig()
    params = sample_view_params(image.size, 1, 0, 0, config)
    student, teacher = render_views(image, params, [224, 196], config)

    assert student.size == (224, 224)
    assert teacher.size == (196, 196)
    assert params.box[2] <= size[0]
    assert params.box[3] <= size[1]


def test_pil_to_tensor_layout_and_range():
    image = Image.new("RGB", (5, 3), (255, 0, 51))
    tensor = pil_to_tensor(image)

    assert tensor.shape == (3, 3, 5)
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_pil_to_tensor_converts_gray():
    tensor = pil_to_tensor(Image.new("L", (4, 4), 255))

    assert tensor.shape == (3, 4, 4)
    assert torch.all(tensor == 1.0)
    assert math.isclose(float(tensor.sum()), 48.0)
