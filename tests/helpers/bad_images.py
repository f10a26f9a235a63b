"""Builders of odd and broken image files, and a folder that contains one of each.

End-to-end tests use `write_bad_image_folder` to run a stage over messy input and compare its
counts of indexed, decoded and skipped files with the ones returned here. The folder uses
symlinks, so it needs a POSIX file system.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"

ORIENTATION_TAG = 0x0112


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    """Encode `image` in `image_format` ("JPEG", "PNG", ...) with Pillow save options."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def gradient_image(width: int, height: int) -> Image.Image:
    """Smooth RGB image: red grows left to right, green top to bottom, blue is constant."""
    red = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    green = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    blue = np.full((height, width), 96.0)
    return Image.fromarray(np.rint(np.stack([red, green, blue], axis=-1)).astype(np.uint8))


def corner_marked_image(width: int, height: int) -> Image.Image:
    """Blue RGB image with a red square in its top-left corner, for orientation checks."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    side = max(1, min(width, height) // 4)
    image.paste((255, 0, 0), (0, 0, side, side))
    return image


def with_orientation(image: Image.Image, orientation: int, image_format: str = "JPEG") -> bytes:
    """Encode `image` with the EXIF Orientation tag set. The pixels are stored as given."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return encode(image, image_format, exif=exif.tobytes())


def rotated_jpeg() -> bytes:
    """JPEG whose viewer shows a 32x48 image with a red top-left corner (stored 48x32, Orientation 6).

    Orientation 6 means the stored pixels are rotated 90 degrees clockwise for display, so the
    stored image is the displayed one rotated 90 degrees counter-clockwise.
    """
    displayed = corner_marked_image(32, 48)
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    return with_orientation(stored, 6)


def ramp16_png(width: int = 256, height: int = 4) -> bytes:
    """16-bit gray PNG whose columns ramp from 0 to 65535."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (height, 1))), "PNG")


def palette_transparent_png() -> bytes:
    """4x4 palette PNG: left half palette index 0 (transparent), right half index 1 (opaque red)."""
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (2, 0, 4, 4))
    return encode(image, "PNG", transparency=0)


def rgba_png(alpha: int = 128) -> bytes:
    """4x4 pure red RGBA PNG with the given alpha everywhere."""
    return encode(Image.new("RGBA", (4, 4), (255, 0, 0, alpha)), "PNG")


def gray_alpha_png(gray: int = 0, alpha: int = 0) -> bytes:
    """4x4 LA PNG with one gray level and one alpha everywhere."""
    return encode(Image.new("LA", (4, 4), (gray, alpha)), "PNG")


def one_bit_png() -> bytes:
    """8x8 1-bit PNG: left half black, right half white."""
    image = Image.new("1", (8, 8), 0)
    image.paste(1, (4, 0, 8, 8))
    return encode(image, "PNG")


def cmyk_jpeg(color: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """16x16 CMYK JPEG of one color, pure red by default."""
    return encode(Image.new("CMYK", (16, 16), color), "JPEG", quality=95)


def animated_gif(colors: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> bytes:
    """8x8 animated GIF with one solid frame per color."""
    frames = [Image.new("RGB", (8, 8), color) for color in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def truncated_jpeg() -> bytes:
    """A 64x64 JPEG cut halfway through its scan: the header is complete, the pixel data ends early."""
    data = encode(gradient_image(64, 64), "JPEG", quality=90)
    start_of_scan = data.index(b"\xff\xda")
    return data[: start_of_scan + (len(data) - start_of_scan) // 2]


def bomb_png(width: int, height: int) -> bytes:
    """Tiny PNG whose header claims width x height 8-bit gray pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class BadImageFolder:
    """A folder written by `write_bad_image_folder` and what a correct pipeline makes of it."""

    path: Path  # the folder to index
    good: int  # files that index and decode into RGB views
    skipped_at_index: int  # entries that open_source records in ImageSource.skipped
    skipped_at_decode: int  # indexed files that load_image or the first crop rejects

    @property
    def indexed(self) -> int:
        return self.good + self.skipped_at_decode

    @property
    def skipped(self) -> int:
        return self.skipped_at_index + self.skipped_at_decode


def write_bad_image_folder(directory: Path) -> BadImageFolder:
    """Write `directory`/images with good, odd and broken inputs, and return the expected counts.

    A symlink target folder is written beside it, at `directory`/linked_target.
    """
    root = directory / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    target = directory / "linked_target"
    target.mkdir()

    good_files = {
        "plain.jpg": encode(gradient_image(48, 32), "JPEG", quality=90),
        "nested/deeper/plain.png": encode(gradient_image(20, 30), "PNG"),
        "gray.png": encode(Image.new("L", (10, 10), 77), "PNG"),
        "palette_transparent.png": palette_transparent_png(),
        "rgba.png": rgba_png(),
        "gray_alpha.png": gray_alpha_png(),
        "one_bit.png": one_bit_png(),
        "ramp16.png": ramp16_png(),
        "cmyk.jpg": cmyk_jpeg(),
        "rotated.jpg": rotated_jpeg(),
        "animated.gif": animated_gif(),
        "webp_named.jpg": encode(gradient_image(24, 24), "WEBP"),
        "with space.JPG": encode(gradient_image(16, 16), "JPEG"),
        "ünïcödé.png": encode(gradient_image(16, 16), "PNG"),
        "many.dots.in.name.png": encode(gradient_image(16, 16), "PNG"),
        "tiny_8x3.png": encode(gradient_image(8, 3), "PNG"),
        "wide_2000x20.png": encode(gradient_image(2000, 20), "PNG"),
    }
    for name, data in good_files.items():
        (root / name).write_bytes(data)
    (target / "inside.jpg").write_bytes(encode(gradient_image(16, 16), "JPEG"))
    (root / "linked").symlink_to(target, target_is_directory=True)
    good = len(good_files) + 1

    try:
        with open(os.path.join(os.fsencode(root), b"raw\xff\xfe.png"), "wb") as file:
            file.write(encode(gradient_image(16, 16), "PNG"))
        good += 1
    except OSError:  # file systems that require UTF-8 names (macOS) reject undecodable bytes
        pass

    index_time = {".DS_Store": b"\x00\x00\x00\x01Bud1", "Thumbs.db": b"junk", "desktop.ini": b"[.ShellClassInfo]"}
    index_time |= {"._plain.jpg": b"\x00\x05\x16\x07", "empty.jpg": b"", "notes.txt": b"labels are elsewhere\n"}
    for name, data in index_time.items():
        (root / name).write_bytes(data)
    (root / "dangling.jpg").symlink_to(directory / "does_not_exist.jpg")
    (root / "nested" / "loop").symlink_to(root, target_is_directory=True)
    skipped_at_index = len(index_time) + 2

    decode_time = {
        "truncated.jpg": truncated_jpeg(),
        "html.jpg": HTML_PAGE,
        "bomb.png": bomb_png(20000, 20000),
        "garbage.png": bytes(range(7, 256)) * 4,
    }
    for name, data in decode_time.items():
        (root / name).write_bytes(data)

    return BadImageFolder(root, good, skipped_at_index, len(decode_time))
