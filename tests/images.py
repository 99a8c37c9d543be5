"""Image builders shared by the decoding tests (test_decode.py) and the HTTP tests (test_reliability.py).

Everything is generated in memory with Pillow, except `real_jpeg()`, a CIFAR-10 fixture.
`bad_inputs()` are bodies the service must refuse with a 4xx; `odd_but_valid()` are images it must take.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cifar10-val-sample"


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def smooth(width: int, height: int) -> Image.Image:
    """A gradient: survives JPEG compression closely, unlike noise."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 90)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), mode="RGB")


def real_jpeg() -> bytes:
    """A CIFAR-10 validation JPEG (32x32) from the fixtures."""
    return (FIXTURES / "cat" / "0000.jpg").read_bytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# --- decompression bombs: tiny files declaring huge images -------------------------------------


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A 1x1 PNG whose (valid-CRC) header declares width x height."""
    small = encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    ihdr = bytearray(small[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return small[:8] + png_chunk(b"IHDR", bytes(ihdr)) + small[33:]


def gif_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A GIF whose logical screen and single frame declare width x height."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x80, 0, 0)  # logical screen, 2-colour global table
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0)  # image descriptor
        + b"\x02\x02\x4c\x01\x00"  # LZW minimum code size 2, one tiny data block
        + b"\x3b"
    )


# --- bodies that are not images -----------------------------------------------------------------


def broken_crc_png() -> bytes:
    data = bytearray(encode(noise(8, 8), "PNG"))
    data[29] ^= 0xFF  # first byte of the IHDR CRC (8 signature + 4 length + 4 type + 13 data)
    return bytes(data)


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("image.png", encode(noise(4, 4), "PNG"))
    return buf.getvalue()


def bad_inputs() -> dict[str, bytes]:
    """name -> a body that must be refused with 400 invalid_image (sent as image/jpeg)."""
    jpeg = real_jpeg()
    return {
        "empty": b"",
        "random": random.Random(0).randbytes(2048),
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "broken_crc_png": broken_crc_png(),
        "text": b"This is a plain text file, sent with Content-Type: image/jpeg.\n",
        "html": b"<!DOCTYPE html>\n<html><head><title>x</title></head><body><img src='a.png'></body></html>\n",
        "zip": zip_file(),
    }


# --- unusual images that must be accepted -------------------------------------------------------


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def palette_png() -> bytes:
    img = Image.new("P", (5, 3))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([0, 1, 2, 1, 0] * 3)
    return encode(img, "PNG")


def png_16_bit() -> bytes:
    values = np.array([[0, 256, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    return encode(Image.fromarray(values), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (30, 30), (0, 255, 0)), Image.new("RGB", (5, 5), (0, 0, 255))]
    return encode(noise(12, 7, seed=1), "TIFF", save_all=True, append_images=pages)


def odd_but_valid() -> dict[str, bytes]:
    """name -> an unusual but valid image that must be classified (200)."""
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[:, 4:] = (200, 10, 20, 255)
    return {
        "grayscale_png": encode(Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5, mode="L"), "PNG"),
        "palette_png": palette_png(),
        "rgba_png": encode(Image.fromarray(rgba, mode="RGBA"), "PNG"),
        "png_16_bit": png_16_bit(),
        "cmyk_jpeg": encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=95),
        "exif_rotated_jpeg": exif_rotated_jpeg(),
        "animated_gif": animated_gif(),
        "multipage_tiff": multipage_tiff(),
        "one_pixel_png": encode(Image.new("RGB", (1, 1), (250, 250, 250)), "PNG"),
        "wide_10000x10_png": encode(noise(10000, 10, seed=4), "PNG", compress_level=1),
    }
