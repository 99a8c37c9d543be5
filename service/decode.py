"""Encoded image bytes -> uint8 tensor [3, H, W], refusing what should not be decoded.

JPEG, the common case, takes torchvision's libjpeg-turbo decoder (with EXIF orientation).
Every other format (PNG, GIF, WebP, BMP, TIFF, and JPEGs libjpeg-turbo cannot take, such as
CMYK) goes through Pillow, which also gives the first frame of animations and multi-page files.
The pixel count is read from the header and checked against the limit before any decoding,
so a small file that declares a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import collections
import io
import logging
import re
import struct
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from service.errors import ApiError, invalid_image, too_large

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit, before decoding, with a 413

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format from the first bytes, or None when it is not one we decode."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    return None


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset, length) of each JPEG segment up to and including the start of scan, in
    order; stops early at anything that is not a marker (a corrupt or truncated header)."""
    i, n = 2, len(data)
    while i + 3 < n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        yield marker, i, length
        if marker == 0xDA:  # start of scan: entropy-coded data follows its header
            return
        i += 2 + length


def is_start_of_frame(marker: int) -> bool:
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)  # SOFn, not DHT/JPG/DAC


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, or None if none is found."""
    for marker, i, _ in jpeg_segments(data):
        if is_start_of_frame(marker):
            if i + 9 >= len(data):
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise invalid_image(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise too_large(
            "image_too_large",
            f"image declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> uint8 [3, H, W] RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit gray: scale, don't clip
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)  # transparent pixels become white, not black
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # a writable copy that torch may own
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


SUPPORTED_FORMATS = "JPEG, PNG, GIF, WebP, BMP, TIFF (first frame or page)"
_PYTHON_INTERNALS = re.compile(r"<[^<>]*>|\b0x[0-9a-fA-F]+\b|\s*\([^()]*BytesIO[^()]*\)")


def cannot_decode(fmt: str | None, reason: str = "") -> ApiError:
    """400 `invalid_image` naming the format and the problem, never a Python object's repr or a
    memory address (Pillow puts `<_io.BytesIO object at 0x...>` in some of its messages)."""
    reason = " ".join(_PYTHON_INTERNALS.sub("", reason).split()).strip(" :;,")
    what = f"this {fmt.upper()} image" if fmt else "this image"
    detail = f" ({reason})" if reason and "identify image file" not in reason else ""
    return invalid_image(
        f"cannot decode {what}: it is corrupt, truncated, or uses an encoding this service does not read"
        f"{detail}; supported formats: {SUPPORTED_FORMATS}"
    )


# What Pillow raises for a corrupt, truncated or hostile file: the exceptions its own fuzz tests
# accept (Pillow's Tests/test_fuzzers.py), plus EOFError and struct.error from truncated headers.
# Any other exception while decoding, and any exception in our conversion to a tensor, is a bug of
# ours, not a bad image: it propagates, and the serving layer answers 500 `internal_error` and logs
# the traceback (service/app.py, ConvServe._prepare).
BAD_IMAGE_ERRORS = (
    OSError,  # UnidentifiedImageError is one
    SyntaxError,
    ValueError,
    NotImplementedError,
    OverflowError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def _decode_with_pillow(data: bytes, max_pixels: int) -> torch.Tensor:
    fmt = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img.width, img.height, max_pixels)
            img.seek(0)  # first frame of an animation or first page of a multi-page file
            img = ImageOps.exif_transpose(img)
            img.load()
    except ApiError:
        raise
    except BAD_IMAGE_ERRORS as e:
        raise cannot_decode(fmt, "" if isinstance(e, UnidentifiedImageError) else str(e)) from None
    return _pil_to_tensor(img)  # the pixels are loaded: an error from here on is ours


def decode_image_bytes(data: bytes, max_pixels: int) -> torch.Tensor:
    """Decode one encoded image to uint8 RGB [3, H, W]; ApiError (400/413) when it cannot be."""
    if not data:
        raise invalid_image("empty image: the request carried no image bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise invalid_image(f"not an image in a supported format ({SUPPORTED_FORMATS})")
    if fmt == "jpeg":
        size = jpeg_size(data)
        if size is None:
            raise invalid_image("cannot decode image: JPEG without a frame header (truncated?)")
        check_pixels(size[0], size[1], max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # libjpeg's "premature end of data" is a failure here
                # torchvision 0.29 deprecates its decoders with a DeprecationWarning on every call;
                # raised as an error it would send every JPEG down the slower Pillow path.
                warnings.simplefilter("ignore", DeprecationWarning)
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True).contiguous()
        except Exception as e:  # noqa: BLE001 - CMYK and other JPEGs libjpeg-turbo declines; Pillow decides below
            note_fallback(type(e).__name__, e)
    return _decode_with_pillow(data, max_pixels)


# JPEGs that libjpeg-turbo declined and Pillow got instead, by exception class. The first of each
# class is logged: a fallback taken for every JPEG (as a DeprecationWarning once caused: 2.6x
# slower) shows up at once in the replica's log instead of only in a profile.
FALLBACKS: collections.Counter[str] = collections.Counter()


def note_fallback(reason: str, error: Exception) -> None:
    FALLBACKS[reason] += 1
    if FALLBACKS[reason] == 1:
        log.warning("JPEG decode fell back to Pillow (%s: %s); later ones are counted in FALLBACKS", reason, error)
