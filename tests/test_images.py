import io

import numpy as np
import pytest
from helpers.bad_images import (
    HTML_PAGE,
    animated_gif,
    bomb_png,
    cmyk_jpeg,
    corner_marked_image,
    encode,
    gradient_image,
    gray_alpha_png,
    one_bit_png,
    palette_transparent_png,
    ramp16_png,
    rgba_png,
    rotated_jpeg,
    truncated_jpeg,
    with_orientation,
)
from PIL import Image, ImageOps

from pipeline.errors import BadImageError
from pipeline.images import BACKGROUND, describe_non_image, load_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def full_crop(data: bytes, size: int) -> np.ndarray:
    image = load_image(data)
    return pixels(image.crop_resize((0, 0, *image.size), size, Image.Resampling.NEAREST))


def test_load_jpeg_size_and_colors():
    image = load_image(encode(gradient_image(48, 32), "JPEG", quality=95), "a.jpg")
    out = pixels(image.crop_resize((0, 0, 48, 32), 16))

    assert image.size == (48, 32)
    assert image.format == "JPEG"
    assert out.shape == (16, 16, 3)
    assert out[8, 0, 0] < 40  # red grows left to right
    assert out[8, 15, 0] > 215
    assert abs(out[8, 8, 2] - 96) <= 4


def test_load_png_exact_pixels():
    source = gradient_image(20, 10)
    out = full_crop(encode(source, "PNG"), 10)
    reference = pixels(source.resize((10, 10), Image.Resampling.NEAREST))

    assert np.array_equal(out, reference)


def test_load_gray_becomes_rgb():
    out = full_crop(encode(Image.new("L", (6, 6), 77), "PNG"), 4)

    assert out.shape == (4, 4, 3)
    assert np.all(out == 77)


def test_palette_transparency_over_background():
    out = full_crop(palette_transparent_png(), 4)

    assert np.array_equal(out[0, 0], BACKGROUND)  # palette index 0 is transparent green
    assert np.array_equal(out[0, 3], (255, 0, 0))


def test_rgba_half_alpha_blends_background():
    out = full_crop(rgba_png(alpha=128), 4)
    expected = np.rint(np.array([255, 0, 0]) * 128 / 255 + np.array(BACKGROUND) * 127 / 255)

    assert np.all(np.abs(out[0, 0] - expected) <= 1)


def test_rgba_transparent_hides_color():
    out = full_crop(rgba_png(alpha=0), 4)

    assert np.all(out == BACKGROUND)


def test_gray_alpha_transparent_is_background():
    out = full_crop(gray_alpha_png(gray=0, alpha=0), 4)

    assert np.all(out == BACKGROUND)


def test_gray_alpha_opaque_keeps_gray():
    out = full_crop(gray_alpha_png(gray=40, alpha=255), 4)

    assert np.all(out == 40)


def test_one_bit_black_and_white():
    out = full_crop(one_bit_png(), 8)

    assert np.all(out[:, :4] == 0)
    assert np.all(out[:, 4:] == 255)


def test_sixteen_bit_ramp_keeps_range():
    image = load_image(ramp16_png(width=256))
    out = pixels(image.crop_resize((0, 0, 256, 4), 256, Image.Resampling.NEAREST))[0, :, 0]

    assert image.mode.startswith("I")
    assert out.min() == 0
    assert out.max() == 255
    assert np.all(np.diff(out) >= 0)
    assert len(np.unique(out)) > 200  # spread over the 8-bit range, not clipped to a few values


def test_cmyk_jpeg_becomes_red():
    image = load_image(cmyk_jpeg((0, 255, 255, 0)))
    out = pixels(image.crop_resize((0, 0, 16, 16), 8))

    assert image.mode == "CMYK"
    assert np.all(np.abs(out - (255, 0, 0)) <= 8)


def test_exif_rotated_jpeg_is_oriented():
    image = load_image(rotated_jpeg())
    out = pixels(image.crop_resize((0, 0, *image.size), 32, Image.Resampling.NEAREST))

    assert image.orientation == 6
    assert image.size == (32, 48)  # stored 48x32
    assert np.all(np.abs(out[1, 1] - (255, 0, 0)) <= 40)  # red in the oriented top-left
    assert np.all(np.abs(out[-2, -2] - (0, 0, 255)) <= 40)
    assert np.all(np.abs(out[1, -2] - (0, 0, 255)) <= 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_matches_transposed_reference(orientation):
    data = with_orientation(corner_marked_image(40, 24), orientation, "PNG")
    image = load_image(data)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    box = (3.0, 5.0, image.size[0] - 7.5, image.size[1] - 2.0)

    out = image.crop_resize(box, 12)
    expected = reference.resize((12, 12), Image.Resampling.BICUBIC, box=box)

    assert image.size == reference.size
    assert np.abs(pixels(out) - pixels(expected)).max() <= 1


def test_animated_gif_first_frame():
    out = full_crop(animated_gif(((255, 0, 0), (0, 255, 0))), 4)

    assert np.all(np.abs(out - (255, 0, 0)) <= 2)


def test_truncated_jpeg_fails_at_decode():
    image = load_image(truncated_jpeg())

    with pytest.raises(BadImageError, match="truncated"):
        image.crop_resize((0, 0, 64, 64), 32)


def test_truncated_header_rejected():
    data = encode(gradient_image(64, 64), "JPEG")

    with pytest.raises(BadImageError, match="header"):
        load_image(data[:200])


def test_zero_bytes_rejected():
    with pytest.raises(BadImageError, match="empty"):
        load_image(b"", "empty.jpg")


def test_html_named_jpg_rejected():
    with pytest.raises(BadImageError, match="HTML"):
        load_image(HTML_PAGE, "photo.jpg")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n...", "PDF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "heic"),
        (b"label,path\n3,a.jpg\n", "text"),
        (bytes(range(200, 256)), "first bytes: c8 c9"),
    ],
)
def test_describe_non_image_names_kind(data, kind):
    assert kind in describe_non_image(data)


def test_webp_named_jpg_decodes():
    image = load_image(encode(gradient_image(24, 16), "WEBP", lossless=True), "photo.jpg")
    out = image.crop_resize((0, 0, 24, 16), 8)

    assert image.format == "WEBP"
    assert image.size == (24, 16)
    assert out.mode == "RGB"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_rejected_from_header():
    data = bomb_png(12000, 12000)  # 144 M pixels: above max_pixels, below Pillow's own limit

    with pytest.raises(BadImageError, match=r"12000x12000 = 144000000 pixels, above the limit"):
        load_image(data)


def test_bomb_beyond_pillow_limit_rejected():
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(bomb_png(100_000, 100_000))


def test_max_pixels_applies_to_small_image():
    data = encode(gradient_image(40, 30), "PNG")

    with pytest.raises(BadImageError, match="1200 pixels"):
        load_image(data, max_pixels=1000)
    assert load_image(data, max_pixels=1200).size == (40, 30)


def test_tiny_image_crop_upscales():
    image = load_image(encode(gradient_image(8, 3), "PNG"))
    out = image.crop_resize((0, 0, 8, 3), 224)

    assert out.size == (224, 224)
    assert out.mode == "RGB"


def test_extreme_aspect_crop():
    image = load_image(encode(gradient_image(2000, 20), "PNG"))
    out = pixels(image.crop_resize((990, 0, 1010, 20), 224))

    assert out.shape == (224, 224, 3)
    assert abs(out[:, :, 0].mean() - 127.5) < 3  # the center of a left-to-right red ramp


def test_crop_box_outside_rejected():
    image = load_image(encode(gradient_image(20, 10), "PNG"), "small.png")

    with pytest.raises(ValueError, match="outside"):
        image.crop_resize((0, 0, 21, 10), 8)
    with pytest.raises(ValueError, match="empty"):
        image.crop_resize((5, 0, 5, 10), 8)


def test_draft_mode_decodes_reduced():
    data = encode(gradient_image(1600, 1200), "JPEG", quality=92)
    image = load_image(data)
    out = image.crop_resize((0, 0, 1600, 1200), 160)

    # 1200 / 8 = 150 < 160 output pixels, 1200 / 4 = 300 >= 160: a quarter-size decode.
    assert image.decoded_sizes == {4: (400, 300)}

    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((160, 160), Image.Resampling.BICUBIC)
    assert np.abs(pixels(out) - pixels(reference)).mean() < 2.0


def test_draft_mode_small_crop_needs_full_decode():
    image = load_image(encode(gradient_image(800, 600), "JPEG"))
    image.crop_resize((100, 100, 300, 300), 224)

    assert image.decoded_sizes == {1: (800, 600)}


def test_draft_mode_with_orientation():
    stored = gradient_image(1200, 800)
    data = with_orientation(stored, 8)
    image = load_image(data)
    out = image.crop_resize((100, 200, 500, 600), 100)

    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    expected = reference.resize((100, 100), Image.Resampling.BICUBIC, box=(100, 200, 500, 600))
    assert image.size == (800, 1200)
    assert image.decoded_sizes == {4: (300, 200)}
    assert np.abs(pixels(out) - pixels(expected)).mean() < 2.0


def test_crop_resize_many_decodes_once(monkeypatch):
    data = encode(gradient_image(900, 700), "JPEG")
    image = load_image(data)
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    student, teacher = image.crop_resize_many((0, 0, 700, 700), [224, 196])
    again = image.crop_resize((0, 0, 600, 600), 224)  # the same reduction reuses the decode

    assert len(opened) == 1
    assert student.size == (224, 224)
    assert teacher.size == (196, 196)
    assert again.size == (224, 224)
    assert image.decoded_sizes == {2: (450, 350)}


def test_crop_independent_of_earlier_crops():
    data = encode(gradient_image(900, 700), "JPEG")
    fresh = load_image(data).crop_resize((0, 0, 700, 700), 196)
    used = load_image(data)
    used.crop_resize((10, 10, 200, 200), 224)  # caches a full-resolution decode first

    assert np.array_equal(pixels(used.crop_resize((0, 0, 700, 700), 196)), pixels(fresh))
