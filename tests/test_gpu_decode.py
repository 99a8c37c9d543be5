"""Batched JPEG decode (service/gpu_decode.py) on the CPU device: the same code that runs on CUDA
(tests/test_cuda.py checks nvjpeg against it there).

On a CPU, decode_batch must give exactly what the CPU path gives, `to_model_size(decode_image_bytes(...))`:
both decode with libjpeg-turbo and resize with the same interpolation, so the tolerance is zero
(measured: the 200 fixture JPEGs and the photo payloads are bit-identical at sizes 32 and 224).
"""

from __future__ import annotations

import collections
import io
import struct
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import service.gpu_decode as gpu_decode
from model.presets import CIFAR10_MEAN, CIFAR10_STD, EvalPreset
from service.decode import decode_image_bytes
from service.errors import ApiError
from service.gpu_decode import decode_batch
from tests.images import encode, noise, smooth

MAX_PIXELS = 40_000_000  # the service default (service.config.Limits.max_image_pixels)
CPU = torch.device("cpu")
PAYLOADS = Path(__file__).resolve().parent.parent / "loadtests" / "payloads"
PHOTOS = ["photo-cat-224x224.jpg", "photo-ship-640x480.jpg", "photo-horse-1280x960.jpg"]


def preset(size: int = 32) -> EvalPreset:
    return EvalPreset(size, CIFAR10_MEAN, CIFAR10_STD)


def cpu_path(data: bytes, size: int = 32) -> torch.Tensor:
    """What a replica does today, one image at a time."""
    return preset(size).to_model_size(decode_image_bytes(data, MAX_PIXELS))


def photo(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


@pytest.fixture(autouse=True)
def fallbacks(monkeypatch) -> collections.Counter:
    """A fresh FALLBACKS counter per test (the module's is process-wide)."""
    counter: collections.Counter[str] = collections.Counter()
    monkeypatch.setattr(gpu_decode, "FALLBACKS", counter)
    return counter


@pytest.fixture(scope="module")
def fixture_jpegs(sample_dir: Path) -> list[bytes]:
    paths = sorted(sample_dir.rglob("*.jpg"))
    assert len(paths) == 200, "tests/fixtures/cifar10-val-sample: 200 JPEGs expected"
    return [p.read_bytes() for p in paths]


def corrupt(data: bytes) -> bytes:
    """Scrambled entropy-coded data, headers and end-of-image marker intact: it passes every header
    check, and libjpeg-turbo refuses it ("Unsupported marker type")."""
    _, _, scan = gpu_decode._jpeg_segments(data)
    start = scan + 10_000
    return data[:start] + bytes(b ^ 0x55 for b in data[start : start + 200]) + data[start + 200 :]


def exif_jpeg(orientation: int, byte_order: str = "II") -> bytes:
    """An asymmetric gradient (red grows rightwards, green downwards) with an EXIF orientation,
    the TIFF header in Intel ("II") or Motorola ("MM") byte order."""
    fmt = "<" if byte_order == "II" else ">"
    entry = struct.pack(fmt + "HHI", 0x0112, 3, 1) + struct.pack(fmt + "H", orientation) + b"\0\0"
    tiff = byte_order.encode() + struct.pack(fmt + "HI", 0x2A, 8) + struct.pack(fmt + "H", 1) + entry + b"\0" * 4
    return encode(smooth(48, 36), "JPEG", quality=95, exif=b"Exif\0\0" + tiff)


#############################################
#      Same pixels as the CPU path          #
#############################################


@pytest.mark.parametrize("size", [32, 224])
def test_fixture_jpegs_and_photos_equal_the_cpu_path_in_one_batch(fixture_jpegs, fallbacks, size):
    datas = fixture_jpegs + [photo(name) for name in PHOTOS]
    out = decode_batch(datas, preset(size), CPU, MAX_PIXELS)
    assert len(out) == len(datas)
    assert not fallbacks, fallbacks  # every one decoded here: torchvision's DeprecationWarning is no failure
    for data, got in zip(datas, out, strict=True):
        assert got is not None and got.dtype == torch.uint8 and tuple(got.shape) == (3, size, size)
        assert got.device == CPU
        assert torch.equal(got, cpu_path(data, size))


def test_one_decoder_call_for_the_whole_batch(monkeypatch, fixture_jpegs):
    calls = []
    real = gpu_decode.decode_jpeg

    def counting(inputs, **kwargs):
        calls.append(len(inputs))
        return real(inputs, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", counting)
    out = decode_batch(fixture_jpegs[:7] + [photo(PHOTOS[1])], preset(), CPU, MAX_PIXELS)
    assert calls == [8]
    assert all(o is not None for o in out)


def test_device_may_be_given_as_a_string(fixture_jpegs):
    got = decode_batch(fixture_jpegs[:2], preset(), "cpu", MAX_PIXELS)
    assert [torch.equal(g, cpu_path(d)) for g, d in zip(got, fixture_jpegs[:2], strict=True)] == [True, True]


def test_grayscale_and_progressive_jpegs_equal_the_cpu_path(fallbacks):
    gray = encode(Image.open(PAYLOADS / PHOTOS[1]).convert("L"), "JPEG", quality=90)
    progressive = encode(Image.open(PAYLOADS / PHOTOS[1]), "JPEG", quality=90, progressive=True)
    out = decode_batch([gray, progressive], preset(64), CPU, MAX_PIXELS)
    assert torch.equal(out[0], cpu_path(gray, 64))
    assert torch.equal(out[0][0], out[0][1]) and torch.equal(out[0][1], out[0][2])  # gray: 3 equal channels
    assert torch.equal(out[1], cpu_path(progressive, 64))
    assert not fallbacks


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_the_cpu_decoder_applies_it(orientation, byte_order):
    # torchvision ignores apply_exif_orientation on CUDA, so decode_batch reads and applies it itself.
    data = exif_jpeg(orientation, byte_order)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    got = decode_batch([data], preset(24), CPU, MAX_PIXELS)[0]
    assert torch.equal(got, cpu_path(data, 24))
    unrotated = cpu_path(exif_jpeg(1, byte_order), 24)
    assert torch.equal(got, unrotated) == (orientation == 1)  # the tag was not ignored


def test_exif_orientation_out_of_range_or_unreadable_is_ignored():
    bad_value = exif_jpeg(9)
    not_tiff = encode(smooth(48, 36), "JPEG", quality=95, exif=b"Exif\0\0XX\0\x2a" + b"\0" * 20)
    out = decode_batch([bad_value, not_tiff], preset(24), CPU, MAX_PIXELS)
    assert torch.equal(out[0], cpu_path(bad_value, 24))
    assert torch.equal(out[1], cpu_path(not_tiff, 24))
    assert torch.equal(out[0], cpu_path(exif_jpeg(1), 24))


#############################################
#      What goes back to the CPU path       #
#############################################


def test_a_corrupt_jpeg_in_the_middle_of_a_batch_is_none_alone(fixture_jpegs, fallbacks, caplog):
    bad = corrupt(photo(PHOTOS[1]))
    with pytest.raises(ApiError) as e:  # what the CPU path answers for it: the caller's 400
        decode_image_bytes(bad, MAX_PIXELS)
    assert (e.value.status, e.value.code) == (400, "invalid_image")
    datas = [fixture_jpegs[0], photo(PHOTOS[2]), bad, fixture_jpegs[1], photo(PHOTOS[0])]
    with caplog.at_level("WARNING", logger="service.gpu_decode"):
        out = decode_batch(datas, preset(), CPU, MAX_PIXELS)
    assert out[2] is None
    for i in (0, 1, 3, 4):
        assert torch.equal(out[i], cpu_path(datas[i]))
    assert fallbacks == {"batch_retried": 1, "refused_RuntimeError": 1}
    assert [r.levelname for r in caplog.records if "refused_RuntimeError" in r.message] == ["WARNING"]


def test_a_truncated_jpeg_is_none_before_any_decoding(monkeypatch, fixture_jpegs, fallbacks):
    data = photo(PHOTOS[1])
    truncated = data[: len(data) // 2]
    with pytest.raises(ApiError) as e:
        decode_image_bytes(truncated, MAX_PIXELS)
    assert e.value.status == 400
    out = decode_batch([fixture_jpegs[0], truncated, data], preset(), CPU, MAX_PIXELS)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert fallbacks == {"no_end_of_image": 1}  # left to the CPU by its headers: nvjpeg need not notice


def test_a_failing_decoder_warning_counts_as_a_failure(monkeypatch, fixture_jpegs, fallbacks):
    real = gpu_decode.decode_jpeg
    warned = fixture_jpegs[1]

    def warning_for_one(inputs, **kwargs):
        if any(bytes(t.numpy()) == warned for t in inputs):
            warnings.warn("Corrupt JPEG data: premature end of data segment", UserWarning, stacklevel=1)
        warnings.warn("torchvision's image decoders are deprecated", DeprecationWarning, stacklevel=1)
        return real(inputs, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", warning_for_one)
    out = decode_batch(fixture_jpegs[:3], preset(), CPU, MAX_PIXELS)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert fallbacks == {"batch_retried": 1, "refused_UserWarning": 1}


@pytest.mark.parametrize(
    "data",
    [
        encode(noise(8, 8), "PNG"),
        encode(noise(8, 8), "GIF"),
        encode(noise(8, 8), "BMP"),
        b"",
        b"not an image at all",
    ],
    ids=["png", "gif", "bmp", "empty", "text"],
)
def test_anything_but_a_jpeg_is_none(data, fallbacks, monkeypatch):
    monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda *a, **k: pytest.fail("decoder called"))
    assert decode_batch([data, data], preset(), CPU, MAX_PIXELS) == [None, None]
    assert fallbacks == {"not_jpeg": 2}


def test_png_and_webp_payloads_are_none_among_jpegs(fallbacks):
    datas = [photo("photo-ship-640x480.png"), photo(PHOTOS[1]), photo("photo-ship-640x480.webp")]
    out = decode_batch(datas, preset(), CPU, MAX_PIXELS)
    assert out[0] is None and out[2] is None
    assert torch.equal(out[1], cpu_path(datas[1]))
    assert fallbacks == {"not_jpeg": 2}


def test_over_the_pixel_limit_is_none_and_the_cpu_path_answers_413(fallbacks):
    data = photo(PHOTOS[1])  # 640 x 480
    assert decode_batch([data], preset(), CPU, 640 * 480)[0] is not None  # the limit is inclusive
    assert decode_batch([data], preset(), CPU, 640 * 480 - 1) == [None]
    assert fallbacks == {"image_too_large": 1}
    with pytest.raises(ApiError) as e:
        decode_image_bytes(data, 640 * 480 - 1)
    assert (e.value.status, e.value.code) == (413, "image_too_large")


def test_a_jpeg_without_a_frame_header_is_none(fallbacks):
    data = b"\xff\xd8\xff\xe0" + b"\x00" * 100
    assert decode_batch([data], preset(), CPU, MAX_PIXELS) == [None]
    assert fallbacks == {"no_frame_header": 1}
    with pytest.raises(ApiError) as e:
        decode_image_bytes(data, MAX_PIXELS)
    assert e.value.status == 400


def test_a_cmyk_jpeg_is_left_to_the_cpu_path(fallbacks):
    data = encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=95)
    assert decode_batch([data], preset(), CPU, MAX_PIXELS) == [None]
    assert fallbacks == {"components_4": 1}
    assert tuple(decode_image_bytes(data, MAX_PIXELS).shape) == (3, 4, 8)  # which decodes it (Pillow)


def test_empty_batch():
    assert decode_batch([], preset(), CPU, MAX_PIXELS) == []


def test_each_reason_is_logged_once_and_counted(fallbacks, caplog):
    png = encode(noise(4, 4), "PNG")
    with caplog.at_level("INFO", logger="service.gpu_decode"):
        for _ in range(3):
            decode_batch([png], preset(), CPU, MAX_PIXELS)
    assert fallbacks == {"not_jpeg": 3}
    assert len([r for r in caplog.records if "not_jpeg" in r.message]) == 1


#############################################
#      loadtests/microbench.py decode       #
#############################################


def test_microbench_times_cpu_and_batched_decode():
    from loadtests.microbench import BATCH_KINDS, batch_decode_ms

    device, by_kind = batch_decode_ms(repeats=1, batch_sizes=(1, 2))
    assert device in ("cpu", "cuda")
    assert set(by_kind) == set(BATCH_KINDS)
    for row in by_kind.values():
        assert set(row) == {"CPU per image", "batch 1", "batch 2"} and min(row.values()) > 0
