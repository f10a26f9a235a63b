"""Robust decoding of source images into RGB crops.

Every input goes through the same policies:

- Content decides the format. A WebP file named .jpg decodes as WebP. A file that is not an
  image (an HTML error page saved as .jpg) raises BadImageError naming the detected type.
- EXIF orientation is applied. The Orientation tag (or XMP tiff:Orientation, as Pillow reads it)
  turns the stored pixels into the image a viewer shows. `SourceImage.size` and every crop box
  are in that oriented image. Unreadable EXIF counts as orientation 1. A PNG eXIf chunk placed
  after the image data is ignored, because reading it would decode the whole image.
- Pixels become 8-bit RGB. Gray, 1-bit, palette, CMYK and YCbCr go through Pillow's `convert`.
  16-bit gray ("I;16*") keeps its full range by dropping the low byte (value >> 8). 32-bit
  integer gray ("I") is taken as 8-bit when its values fit 0..255, as 16-bit (>> 8) when they
  fit 0..65535, and is otherwise scaled from its min..max. Float gray ("F") in 0..1 is
  multiplied by 255, any other range is scaled from its min..max.
- Transparency (an alpha channel, or palette or tRNS transparency) is composited over white
  (`BACKGROUND`) before resizing, so transparent pixels never leak their hidden color.
- Animated and multi-page files (GIF, WebP, TIFF, MPO) give their first frame.
- Decompression bombs: width x height from the header is checked against `max_pixels` before
  any pixel is decoded.
- `load_image` reads only the header. Broken pixel data, such as a truncated file, raises
  BadImageError when the pixels are first decoded, that is from `crop_resize` or
  `crop_resize_many`. Callers that skip bad images wrap both steps in one `try`.
- JPEGs decode in draft mode: libjpeg scales the DCT by 1/2, 1/4 or 1/8, and the largest
  reduction is chosen that still leaves at least the requested output size on the crop's
  shorter side. Memory for a large JPEG is then bounded by the crop, not the file.
- One decode serves several sizes: `crop_resize_many` cuts every requested size (for example a
  224 student view and a 196 teacher view) from a single decode, chosen for the largest size.
  Decodes are cached on the `SourceImage` per reduction factor, so another crop that needs the
  same reduction reuses it. A crop depends only on the bytes, the box and the largest
  requested size, never on which crops were made before.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.errors import BadImageError

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
"""RGB color that transparent pixels are composited over."""

DRAFT_REDUCTIONS = (8, 4, 2, 1)
"""Scale denominators that libjpeg can decode to directly, largest first."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
"""Exceptions Pillow raises for broken or unsupported files (OSError includes
UnidentifiedImageError). Anything else, a TypeError for example, is a bug and propagates."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "I", "F"} | _ALPHA_MODES | _SIXTEEN_BIT_MODES
)
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})

_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Box = tuple[float, float, float, float]


class SourceImage:
    """An encoded image whose pixels are decoded on demand, at the resolution a crop needs.

    Create it with `load_image`. The encoded bytes stay in memory, together with one decoded
    RGB image per draft reduction used so far.
    """

    def __init__(
        self,
        data: bytes,
        *,
        name: str,
        image_format: str,
        mode: str,
        stored_size: tuple[int, int],
        orientation: int,
    ) -> None:
        self.name = name
        self.format = image_format
        self.mode = mode
        self.orientation = orientation
        self._data = data
        self._stored_size = stored_size
        self._decoded: dict[int, tuple[Image.Image, float]] = {}

        width, height = stored_size
        swaps_axes = orientation in (5, 6, 7, 8)
        self.size: tuple[int, int] = (height, width) if swaps_axes else (width, height)

    @property
    def decoded_sizes(self) -> dict[int, tuple[int, int]]:
        """Size (width, height) of each cached decode, keyed by draft reduction, before orientation."""
        return {reduction: image.size for reduction, (image, _) in self._decoded.items()}

    def crop_resize(
        self,
        box: Box,
        out_size: int,
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> Image.Image:
        """Cut `box` = (left, top, right, bottom), in oriented pixels, into an RGB out_size x out_size image.

        Raises BadImageError when the pixel data cannot be decoded.
        """
        return self.crop_resize_many(box, [out_size], resample)[0]

    def crop_resize_many(
        self,
        box: Box,
        sizes: Sequence[int],
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> list[Image.Image]:
        """Cut one box into square RGB images of each side in `sizes`, from a single decode.

        Each output is resized once from the decoded pixels of the box, with `resample`. The
        decode uses the draft reduction that fits max(sizes). Raises BadImageError when the
        pixel data cannot be decoded.
        """
        box = self._checked_box(box, sizes)
        crop_side = min(box[2] - box[0], box[3] - box[1])
        decoded, scale = self._decode_cached(self._draft_reduction(crop_side, max(sizes)))

        stored_box = _oriented_to_stored_box(box, self.orientation, self._stored_size)
        decoded_box = tuple(coordinate / scale for coordinate in stored_box)

        # Resizing in stored orientation and then transposing the small output gives the same
        # pixels as resizing the oriented image, because the box maps onto the same source
        # pixels and the resampling filters are symmetric.
        transpose = _ORIENTATION_TRANSPOSE.get(self.orientation)
        outputs = []
        for size in sizes:
            output = decoded.resize((size, size), resample, box=decoded_box)
            if transpose is not None:
                output = output.transpose(transpose)
            outputs.append(output)
        return outputs

    def _checked_box(self, box: Box, sizes: Sequence[int]) -> Box:
        """Validate a request and return the box clipped to the image (it may overshoot by float error)."""
        if not sizes or any(int(size) != size or size < 1 for size in sizes):
            raise ValueError(f"output sizes must be positive integers, got {list(sizes)}")

        left, top, right, bottom = box
        width, height = self.size
        tolerance = 1e-6 * max(width, height)
        inside = -tolerance <= left < right <= width + tolerance and -tolerance <= top < bottom <= height + tolerance
        if not inside:
            raise ValueError(f"crop box {box} is empty or outside the {width}x{height} image {self.name!r}")
        return (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))

    def _draft_reduction(self, crop_side: float, out_size: int) -> int:
        """Largest DCT reduction that keeps at least `out_size` pixels on the crop's shorter side."""
        if self.format not in _DRAFT_FORMATS:
            return 1

        for reduction in DRAFT_REDUCTIONS:
            if crop_side / reduction >= out_size:
                return reduction
        return 1

    def _decode_cached(self, reduction: int) -> tuple[Image.Image, float]:
        if reduction not in self._decoded:
            self._decoded[reduction] = self._decode(reduction)
        return self._decoded[reduction]

    def _decode(self, reduction: int) -> tuple[Image.Image, float]:
        """Decode the first frame to RGB, in stored orientation, with the DCT scaled by 1/reduction.

        Returns the image and the actual scale: stored pixel coordinates divided by it give
        coordinates in the decoded image.
        """
        try:
            with Image.open(io.BytesIO(self._data)) as image:
                scale = 1.0
                if reduction > 1:
                    request = (image.width // reduction, image.height // reduction)
                    draft = image.draft(image.mode, request)
                    if draft is not None:
                        scale = self._stored_size[0] / draft[1][2]
                image.load()
                return _to_rgb(image), scale
        except _DECODE_ERRORS as error:
            raise BadImageError(f"failed to decode {self.format} pixel data: {error}") from error


def load_image(data: bytes, name: str = "", *, max_pixels: int = 100_000_000) -> SourceImage:
    """Read an image header and return a SourceImage that decodes its pixels on demand.

    `name` (a file name or tar member) is used only in log messages. Raises BadImageError for
    an empty file, content that is not a supported image, a size of zero or above
    `max_pixels`, or an unsupported pixel mode.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, mode, stored_size = image.format or "unknown", image.mode, image.size
            orientation = _read_orientation(image)
    except Image.UnidentifiedImageError:
        raise BadImageError(describe_non_image(data)) from None
    except Image.DecompressionBombError as error:
        # NOTE: Pillow rejects images above 2 * Image.MAX_IMAGE_PIXELS at open, whatever max_pixels is.
        raise BadImageError(f"image is larger than Pillow's decompression bomb limit: {error}") from error
    except _DECODE_ERRORS as error:
        raise BadImageError(f"failed to read the image header: {error}") from error

    width, height = stored_size
    if width < 1 or height < 1:
        raise BadImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} pixels "
            "(decompression bomb guard)"
        )
    if mode not in _SUPPORTED_MODES:
        raise BadImageError(f"unsupported pixel mode {mode!r} in a {image_format} image")

    _log_extension_mismatch(name, image_format)
    return SourceImage(
        data, name=name, image_format=image_format, mode=mode, stored_size=stored_size, orientation=orientation
    )


def describe_non_image(data: bytes) -> str:
    """Name the kind of content in `data`, which Pillow did not recognize as an image."""
    head = data[:1024]
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()

    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: the content is HTML"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "unsupported image format: SVG (vector graphics cannot be decoded; rasterize it first)"
    if text.startswith(b"<?xml"):
        return "not an image: the content is XML"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return f"unsupported image format: ISO media file (HEIF family) with brand {brand!r}"

    for signature, kind in _NON_IMAGE_SIGNATURES:
        if head.startswith(signature):
            return f"not an image: the content is {kind}"

    if not head.strip(b"\x00"):
        return "not an image: the file starts with only null bytes"
    if _looks_like_text(head):
        return "not an image: the content is text"
    return f"not an image or an unsupported format (first bytes: {head[:8].hex(' ')})"


_NON_IMAGE_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
)


def _looks_like_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(character.isprintable() or character in "\t\r\n" for character in decoded)


def _read_orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8 from the header, 1 when absent, invalid or unreadable."""
    try:
        if image.format == "PNG" and "exif" not in image.info:
            # PngImageFile.getexif decodes the image to reach an eXIf chunk after the pixel
            # data. The base method reads only what the header parse found (tEXt, XMP).
            exif = Image.Image.getexif(image)
        else:
            exif = image.getexif()
        orientation = exif.get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS as error:
        logger.debug("ignoring unreadable EXIF data: %s", error)
        return 1

    if orientation not in range(1, 9):
        return 1
    return int(orientation)


def _oriented_to_stored_box(box: Box, orientation: int, stored_size: tuple[int, int]) -> Box:
    """Map a box in oriented pixels to the same pixels in the stored (un-oriented) image."""
    left, top, right, bottom = box
    width, height = stored_size
    stored_boxes = {
        1: (left, top, right, bottom),
        2: (width - right, top, width - left, bottom),
        3: (width - right, height - bottom, width - left, height - top),
        4: (left, height - bottom, right, height - top),
        5: (top, left, bottom, right),
        6: (top, height - right, bottom, height - left),
        7: (width - bottom, height - right, width - top, height - left),
        8: (width - bottom, left, width - top, right),
    }
    return stored_boxes[orientation]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded frame to 8-bit RGB by the policies in the module docstring."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _gray_to_8bit(image)

    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        composite = Image.new("RGB", rgba.size, BACKGROUND)
        composite.paste(rgba, mask=rgba.getchannel("A"))
        return composite

    return image.convert("RGB")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer or float gray to mode "L" without clipping its range."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray((values >> 8).astype(np.uint8))

    low, high = float(values.min()), float(values.max())
    if image.mode == "I" and low >= 0 and high <= 255:
        return Image.fromarray(values.astype(np.uint8))
    if image.mode == "I" and low >= 0 and high <= 65535:
        return Image.fromarray((values >> 8).astype(np.uint8))
    if image.mode == "F" and low >= 0 and high <= 1:
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))

    span = max(high - low, 1e-12)
    scaled = (values.astype(np.float64) - low) / span * 255
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _log_extension_mismatch(name: str, image_format: str) -> None:
    extension = os.path.splitext(name)[1].lower()
    named_format = Image.registered_extensions().get(extension)
    same = named_format is None or named_format == image_format or {named_format, image_format} == {"JPEG", "MPO"}
    if not same:
        logger.debug("%s: the content is %s although the extension is %s", name, image_format, extension)
