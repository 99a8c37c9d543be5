"""A batch of encoded JPEGs -> uint8 [3, S, S] images at the model's input size, on the model's device.

Why: a photo costs milliseconds of a CPU core to decode and resize (640x480 about 2 ms, 1280x960
8 to 11 ms on the 2-core development machine: `python -m loadtests.microbench decode`), and nvjpeg
on the model's GPU decodes a whole batch in one `torchvision.io.decode_jpeg` call, resized there too.
A 32x32 CIFAR-10 JPEG costs about 0.05 ms on a CPU: for those the GPU's fixed cost per call may well
lose, and nvjpeg's chroma upsampling differs enough to flip a few predictions at that size
(tests/test_cuda.py), so measure before routing small images here. On a CPU device this is
libjpeg-turbo one image at a time, bit-identical to the CPU path: that is how it is tested.

Only plain JPEGs are taken: `sniff_format` says JPEG, the frame header is readable, declares a pixel
count within the limit and 1 (gray) or 3 (YCbCr) components, and an end-of-image marker follows the
first scan (nvjpeg is not relied on to refuse a truncated file). Everything else, and every JPEG the
decoder refuses, comes back as None: the caller decodes that item on the CPU with
`service.decode.decode_image_bytes`, which decodes it (CMYK through Pillow, say) or answers the
right 4xx. torchvision returns no partial results when one image of a batch fails, so a refused batch
is decoded again one image at a time; only the images that fail alone are None.

EXIF orientation: `decode_jpeg` applies it on the CPU only (with device="cuda" its
`apply_exif_orientation` is ignored, torchvision 0.29). So it is read here from the first APP1
segment exactly as torchvision's CPU decoder reads it (csrc/io/image/cpu/exif.h) and applied with
flips and transposes on the device, on every device: the code tested on a CPU is the code that runs
on CUDA.

Everything that goes back to the CPU is counted in FALLBACKS by reason, and the first of each reason
is logged: a batch path quietly declining every image would otherwise show up only in a profile.
"""

from __future__ import annotations

import collections
import logging
import warnings

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from model.presets import EvalPreset
from service.decode import check_pixels, is_start_of_frame, jpeg_segments, jpeg_size, sniff_format
from service.errors import ApiError

log = logging.getLogger(__name__)

# Images left to the CPU decoder, by reason: "not_jpeg", "no_frame_header", "image_too_large",
# "invalid_image" (a declared size of 0), "components_<n>" (CMYK/YCCK), "no_end_of_image", and
# "refused_<exception class>" for those the batch decoder refused alone. "batch_retried" counts
# batches decoded again image by image because one image failed the batch call.
FALLBACKS: collections.Counter[str] = collections.Counter()

# (flip dims, transpose first) per EXIF orientation, as torchvision's exif_orientation_transform.
_ORIENTATIONS = {2: ((-1,), False), 3: ((-2, -1), False), 4: ((-2,), False), 5: ((), True),
                 6: ((-1,), True), 7: ((-2, -1), True), 8: ((-2,), True)}  # fmt: skip


def decode_batch(
    datas: list[bytes], preset: EvalPreset, device: torch.device, max_pixels: int
) -> list[torch.Tensor | None]:
    """Per item, in order: uint8 [3, S, S] at `preset`'s input size on `device`, or None where this
    path does not take it (not a JPEG, no frame header, over `max_pixels`, CMYK, no end-of-image
    marker, or the decoder refused it alone); the caller decodes a None item on the CPU with
    `decode_image_bytes`, which answers the right 4xx. Works on any device decode_jpeg takes."""
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(datas)
    taken = [(i, orientation) for i, data in enumerate(datas) if (orientation := _admit(data, max_pixels))]
    if not taken:
        return out
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i, _ in taken]
    for (i, orientation), image in zip(taken, _decode_all(encoded, device), strict=True):
        if image is not None:
            out[i] = preset.to_model_size(_orient(image, orientation).contiguous())
    return out


def _decode_all(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One call for the batch; if it fails (one bad image fails the whole call), one call per image."""
    if len(encoded) > 1:
        try:
            return list(_decode(encoded, device))
        except Exception as e:  # noqa: BLE001 - find the image(s) that failed it, below
            _fall_back("batch_retried", e, logging.INFO)
    return [_decode_alone(one, device) for one in encoded]


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as service.decode: a warning while decoding is a failure
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 warns on every call
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _decode_alone(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode([encoded], device)[0]
    except Exception as e:  # noqa: BLE001 - the CPU path decides what this image gets (Pillow or a 4xx)
        _fall_back(f"refused_{type(e).__name__}", e)
        return None


def _admit(data: bytes, max_pixels: int) -> int:
    """The EXIF orientation (1..8) of a JPEG this path takes; 0 (and counted) for the CPU's."""
    if sniff_format(data) != "jpeg":
        return _fall_back("not_jpeg", f"{data[:4]!r}...", logging.INFO)
    size = jpeg_size(data)
    if size is None:
        return _fall_back("no_frame_header", f"{len(data)} bytes", logging.INFO)
    try:
        check_pixels(size[0], size[1], max_pixels)
    except ApiError as e:
        return _fall_back(e.code, e.message, logging.INFO)
    components, app1, scan = _jpeg_segments(data)
    if components not in (1, 3):
        return _fall_back(f"components_{components}", f"{components} colour components", logging.INFO)
    if scan is None or data.find(b"\xff\xd9", scan) < 0:
        return _fall_back("no_end_of_image", "no EOI marker after the first scan (truncated?)", logging.INFO)
    return _exif_orientation(app1) if app1 is not None else 1


def _jpeg_segments(data: bytes) -> tuple[int | None, bytes | None, int | None]:
    """(components in the frame header, payload of the first APP1 segment, offset of the first
    scan's data), from the markers before the first scan (service.decode.jpeg_segments)."""
    components, app1 = None, None
    for marker, i, length in jpeg_segments(data):
        if marker == 0xDA:
            return components, app1, i + 2 + length
        if marker == 0xE1 and app1 is None:
            app1 = data[i + 4 : i + 2 + length]
        if is_start_of_frame(marker) and i + 9 < len(data):
            components = data[i + 9]
    return components, app1, None


def _exif_orientation(app1: bytes) -> int:
    """The orientation tag of IFD0, read as torchvision's CPU decoder reads it (the TIFF header 6
    bytes into the first APP1, Intel order only for "II"); 1 where absent, unreadable or not 1..8."""
    tiff, order = app1[6:], "little" if app1[6:8] == b"II" else "big"

    def u16(at: int) -> int:
        return int.from_bytes(tiff[at : at + 2], order) if at + 1 < len(tiff) else 0xFFFF

    def u32(at: int) -> int:
        return int.from_bytes(tiff[at : at + 4], order) if at + 3 < len(tiff) else 0xFFFF

    if u16(2) != 0x2A:
        return 1
    at = u32(4)  # IFD0: a count, then 12-byte entries (tag, type, count, value)
    count, at = u16(at), at + 2
    for _ in range(count):
        tag = u16(at)
        if tag == 0xFFFF:
            break
        if tag == 0x0112:
            value = u16(at + 8)
            return value if 1 <= value <= 8 else 1
        at += 12
    return 1


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    if orientation not in _ORIENTATIONS:
        return image
    dims, transpose = _ORIENTATIONS[orientation]
    if transpose:
        image = image.transpose(-1, -2)
    return image.flip(dims) if dims else image


def _fall_back(reason: str, detail: object, level: int = logging.WARNING) -> int:
    FALLBACKS[reason] += 1
    if FALLBACKS[reason] == 1:
        log.log(
            level,
            "batched JPEG decode left an image to the CPU decoder (%s: %s); later ones are counted in "
            "service.gpu_decode.FALLBACKS",
            reason,
            detail,
        )
    return 0
