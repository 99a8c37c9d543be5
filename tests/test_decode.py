"""Decoding (service/decode.py): every format we take -> uint8 RGB [3, H, W]; everything else a 400/413.

Images are generated in memory with Pillow, except a few real CIFAR-10 JPEGs from the fixtures.
"""

from __future__ import annotations

import io
import random
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features

from service.decode import decode_image_bytes, sniff_format
from service.errors import ApiError
from tests.images import encode, gif_bomb, noise, png_bomb, smooth

MAX_PIXELS = 40_000_000  # the service default (service.config.Limits.max_image_pixels)


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    out = decode_image_bytes(data, max_pixels)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8
    assert out.dim() == 3 and out.shape[0] == 3
    assert out.is_contiguous()
    return out


def rgb_of(img: Image.Image) -> torch.Tensor:
    """What the decoder should return for a lossless RGB-representable image."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def real_jpeg(sample_dir: Path) -> bytes:
    path = sample_dir / "cat" / "0000.jpg"
    if not path.is_file():
        pytest.skip(f"{path} missing (see tests/fixtures/README.md)")
    return path.read_bytes()


def expect_error(data: bytes, status: int, code: str, max_pixels: int = MAX_PIXELS) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image_bytes(data, max_pixels)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    assert "Traceback" not in info.value.message
    return info.value


#############################################
#                 Formats                   #
#############################################


def test_real_cifar_jpeg(real_jpeg):
    out = decode(real_jpeg)
    assert tuple(out.shape) == (3, 32, 32)
    want = rgb_of(Image.open(io.BytesIO(real_jpeg)))
    assert (out.int() - want.int()).abs().max() <= 3  # libjpeg-turbo and Pillow may round IDCT differently


def test_rgb_jpeg_takes_the_libjpeg_turbo_path(real_jpeg, monkeypatch):
    # Pillow is the fallback for JPEGs libjpeg-turbo declines; a plain RGB JPEG must never need it
    # (torchvision 0.29's DeprecationWarning once sent every JPEG there, at 4x the cost).
    import service.decode

    def no_pillow(*_args):
        raise AssertionError("RGB JPEG decoded by Pillow")

    monkeypatch.setattr(service.decode, "_decode_with_pillow", no_pillow)
    assert tuple(decode(real_jpeg).shape) == (3, 32, 32)
    assert tuple(decode(encode(smooth(40, 24), "JPEG", quality=90)).shape) == (3, 24, 40)


def test_jpeg_rgb_keeps_height_width_and_colours():
    img = smooth(40, 24)
    out = decode(encode(img, "JPEG", quality=95))
    assert tuple(out.shape) == (3, 24, 40)
    assert (out.float() - rgb_of(img).float()).abs().mean() < 3


def test_png_rgb_is_lossless():
    img = noise(17, 9)
    assert torch.equal(decode(encode(img, "PNG")), rgb_of(img))


def test_png_rgba_transparent_pixels_become_white():
    arr = np.zeros((6, 8, 4), dtype=np.uint8)  # transparent black
    arr[:, 4:] = (200, 10, 20, 255)  # opaque red on the right
    arr[0, 0] = (0, 0, 255, 128)  # half-transparent blue over white
    out = decode(encode(Image.fromarray(arr, mode="RGBA"), "PNG"))
    assert tuple(out.shape) == (3, 6, 8)
    assert torch.equal(out[:, 1:, :4], torch.full((3, 5, 4), 255, dtype=torch.uint8))  # not black
    assert out[:, :, 4:].reshape(3, -1).unique(dim=1).flatten().tolist() == [200, 10, 20]
    r, g, b = out[:, 0, 0].tolist()
    assert b == 255 and 120 <= r <= 135 and 120 <= g <= 135


def test_png_gray_alpha_transparent_pixels_become_white():
    img = Image.new("LA", (4, 4), (0, 0))
    img.putpixel((3, 3), (50, 255))
    out = decode(encode(img, "PNG"))
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 3, 3].tolist() == [50, 50, 50]


def test_png_palette():
    img = Image.new("P", (5, 3))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([0, 1, 2, 1, 0] * 3)
    out = decode(encode(img, "PNG"))
    assert tuple(out.shape) == (3, 3, 5)
    assert out[:, 0, :3].T.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_png_palette_with_transparency_becomes_white():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    img.putdata([0, 1])
    out = decode(encode(img, "PNG", transparency=0))
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 0, 1].tolist() == [200, 100, 50]


def test_png_grayscale_repeats_the_channel():
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    out = decode(encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert tuple(out.shape) == (3, 6, 8)
    for channel in out:
        assert torch.equal(channel, torch.from_numpy(gray))


def test_png_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on the way in
    out = decode(data)
    assert tuple(out.shape) == (3, 2, 4)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[0, 0].tolist() == [0, 1, 128, 255]
    expected = np.round(values.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert (out[0].int() - torch.from_numpy(expected).int()).abs().max() <= 1


def test_cmyk_jpeg_comes_out_rgb():
    img = Image.new("CMYK", (8, 4), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(encode(img, "JPEG", quality=95))
    assert tuple(out.shape) == (3, 4, 8)
    r, g, b = out.float().mean(dim=(1, 2)).tolist()
    assert r > 230 and g < 25 and b < 25


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))  # stored: 40 wide, 20 high; left half red
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data)
    assert tuple(out.shape) == (3, 40, 20)  # H and W swapped against the stored pixels
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == (20, 40)
    assert (out.float() - rgb_of(shown).float()).abs().mean() < 3
    # Rotated clockwise, the stored left (red) half is now on top and the blue half below.
    top, bottom = out[:, :15].float().mean(dim=(1, 2)), out[:, 25:].float().mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode(data)
    assert tuple(out.shape) == (3, 6, 10)
    assert out.reshape(3, -1).unique(dim=1).flatten().tolist() == [255, 0, 0]


def test_multipage_tiff_gives_the_first_page():
    first = noise(12, 7, seed=1)
    pages = [Image.new("RGB", (30, 30), (0, 255, 0)), Image.new("RGB", (5, 5), (0, 0, 255))]
    data = encode(first, "TIFF", save_all=True, append_images=pages)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert torch.equal(decode(data), rgb_of(first))


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp():
    img = noise(9, 14, seed=2)
    assert torch.equal(decode(encode(img, "WEBP", lossless=True)), rgb_of(img))
    lossy = decode(encode(smooth(32, 32), "WEBP", quality=90))
    assert tuple(lossy.shape) == (3, 32, 32)


def test_bmp():
    img = noise(13, 5, seed=3)
    assert torch.equal(decode(encode(img, "BMP")), rgb_of(img))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_one_pixel(fmt):
    img = Image.new("RGB", (1, 1), (250, 250, 250))
    out = decode(encode(img, fmt))
    assert tuple(out.shape) == (3, 1, 1)
    assert all(abs(v - 250) <= 3 for v in out.flatten().tolist())


def test_very_wide_image():
    img = noise(10000, 10, seed=4)
    out = decode(encode(img, "PNG", compress_level=1))
    assert tuple(out.shape) == (3, 10, 10000)
    assert torch.equal(out, rgb_of(img))


def test_pixel_limit_is_inclusive():
    data = encode(noise(100, 50), "PNG")
    assert tuple(decode(data, max_pixels=5000).shape) == (3, 50, 100)
    expect_error(data, 413, "image_too_large", max_pixels=4999)
    jpeg = encode(smooth(100, 50), "JPEG")
    assert tuple(decode(jpeg, max_pixels=5000).shape) == (3, 50, 100)
    expect_error(jpeg, 413, "image_too_large", max_pixels=4999)


#############################################
#                 Refusals                  #
#############################################


def test_empty_bytes():
    expect_error(b"", 400, "invalid_image")


def test_random_bytes():
    data = random.Random(0).randbytes(2048)
    assert sniff_format(data) is None
    expect_error(data, 400, "invalid_image")


def test_truncated_jpeg(real_jpeg):
    for cut in (len(real_jpeg) // 2, len(real_jpeg) - 60, 200, 3):
        expect_error(real_jpeg[:cut], 400, "invalid_image")


def test_truncated_png():
    data = encode(noise(64, 64), "PNG")
    expect_error(data[: len(data) // 2], 400, "invalid_image")


def _chunks(png: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk in a PNG."""
    out, i = [], 8
    while i < len(png):
        (length,) = struct.unpack(">I", png[i : i + 4])
        out.append((i, png[i + 4 : i + 8]))
        i += 12 + length
    return out


def test_png_with_corrupted_idat_data():
    data = bytearray(encode(noise(32, 32), "PNG", compress_level=9))
    offset = next(o for o, kind in _chunks(bytes(data)) if kind == b"IDAT")
    for i in range(offset + 8 + 20, offset + 8 + 60):  # garble compressed bytes inside IDAT
        data[i] ^= 0xA5
    expect_error(bytes(data), 400, "invalid_image")


def test_png_with_corrupted_header_crc():
    data = bytearray(encode(noise(8, 8), "PNG"))
    data[29] ^= 0xFF  # first byte of the IHDR CRC (8 signature + 4 length + 4 type + 13 data)
    expect_error(bytes(data), 400, "invalid_image")


def test_text_labelled_as_an_image():
    expect_error(b"This is a plain text file, sent with Content-Type: image/jpeg.\n", 400, "invalid_image")


def test_zip_file():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("image.png", encode(noise(4, 4), "PNG"))
    expect_error(buf.getvalue(), 400, "invalid_image")


def test_html_page():
    html = b"<!DOCTYPE html>\n<html><head><title>x</title></head><body><img src='a.png'></body></html>\n"
    expect_error(html, 400, "invalid_image")


def test_text_starting_like_a_bmp():
    """'BM' is a short signature: such text is sniffed as BMP and refused by the decoder."""
    data = b"BMW sells cars. This is not a bitmap, though it starts like one." * 4
    assert sniff_format(data) == "bmp"
    expect_error(data, 400, "invalid_image")


def test_jpeg_signature_without_a_frame():
    expect_error(b"\xff\xd8\xff\xe0" + b"\x00" * 100, 400, "invalid_image")


#############################################
#       Decompression bombs: 413 early      #
#############################################


def _assert_refused_cheaply(data: bytes, size: str) -> None:
    # CPU time, not wall time: this machine may be busy, but decoding 400M+ pixels costs many CPU seconds.
    start = time.process_time()
    error = expect_error(data, 413, "image_too_large")
    assert time.process_time() - start < 1.0
    assert size in error.message


def test_png_declaring_a_huge_size_is_refused_before_decoding():
    bomb = png_bomb(20000, 20000)
    assert bomb[12:16] == b"IHDR"
    assert len(bomb) < 100
    # The patched header is consistent (valid CRC): Pillow would really try to decode it.
    assert Image.open(io.BytesIO(bomb)).size == (20000, 20000)
    _assert_refused_cheaply(bomb, "20000x20000")


def test_gif_declaring_a_huge_size_is_refused_before_decoding():
    width = height = 30000
    bomb = gif_bomb(width, height)
    assert Image.open(io.BytesIO(bomb)).size == (width, height)
    _assert_refused_cheaply(bomb, "30000x30000")


def test_jpeg_declaring_a_huge_size_is_refused_before_decoding(real_jpeg):
    data = bytearray(real_jpeg)
    i = 2
    while not (0xC0 <= data[i + 1] <= 0xC3):  # walk the markers to the start-of-frame
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    data[i + 5 : i + 9] = struct.pack(">HH", 30000, 30000)  # height, width
    _assert_refused_cheaply(bytes(data), "30000x30000")


#############################################
#                sniff_format               #
#############################################


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\xff\xd8\xff\xdb", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
        (b"GIF87a\x01\x00", "gif"),
        (b"GIF89a\x01\x00", "gif"),
        (b"BM\x36\x00\x00\x00", "bmp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"MM\x00*\x00\x00", "tiff"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"", None),
        (b"\xff\xd8", None),  # too short for the JPEG signature
        (b"\x89PNG", None),
        (b"GIF90a", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),  # a RIFF that is not WebP
        (b"PK\x03\x04", None),
        (b"<html>", None),
        (b"%PDF-1.7", None),
        (b"\x00\x00\x00\x0cjP  ", None),  # JPEG 2000
    ],
)
def test_sniff_format(head, fmt):
    assert sniff_format(head) == fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_sniff_format_of_pillow_output(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    assert sniff_format(encode(noise(4, 4), fmt)) == fmt.lower()


@pytest.mark.parametrize(
    "data",
    [
        b"II*\x00" + b"\x00" * 50,  # a TIFF header alone: Pillow says "cannot identify image file <_io.BytesIO ...>"
        b"MM\x00*" + bytes(range(256)),
        b"\x89PNG\r\n\x1a\n" + b"x" * 20,
        b"GIF89a" + b"\x00" * 3,
        b"BM" + b"\xff" * 40,
    ],
    ids=["tiff-empty", "tiff-garbage", "png-garbage", "gif-short", "bmp-garbage"],
)
def test_undecodable_images_get_a_message_without_python_internals(data):
    with pytest.raises(ApiError) as e:
        decode_image_bytes(data, 10**7)
    message = e.value.message
    assert e.value.status == 400 and e.value.code == "invalid_image"
    assert "BytesIO" not in message and "0x" not in message and "<" not in message, message
    assert sniff_format(data).upper() in message.upper() and "supported formats: JPEG, PNG" in message


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_deflate", "packbits", "jpeg"])
def test_tiff_compressions_decode_to_the_first_page(compression):
    pages = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", compression=compression, save_all=True, append_images=pages[1:])
    out = decode_image_bytes(buf.getvalue(), 10**7)
    assert out.shape == (3, 30, 40)
    assert out[0].float().mean() > 200 and out[2].float().mean() < 60  # red page, not blue or green


def test_tiff_pixel_limit_is_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="TIFF", compression="tiff_deflate")
    with pytest.raises(ApiError) as e:
        decode_image_bytes(buf.getvalue(), 9_999)
    assert e.value.status == 413


def test_a_jpeg_that_takes_the_pillow_fallback_is_counted_and_logged_once(caplog, real_jpeg):
    import service.decode

    truncated = real_jpeg[: len(real_jpeg) * 2 // 3]  # libjpeg-turbo warns "premature end": Pillow decides
    service.decode.FALLBACKS.clear()
    with caplog.at_level("WARNING", logger="service.decode"):
        for _ in range(3):
            with pytest.raises(ApiError):
                decode(truncated)
    assert sum(service.decode.FALLBACKS.values()) == 3
    assert len([r for r in caplog.records if "fell back to Pillow" in r.message]) == 1


def test_a_bug_in_our_conversion_is_not_blamed_on_the_image(monkeypatch):
    """A bad image is a 400; an exception from our own code after Pillow has read the pixels is
    not caught as one: it propagates, and the serving layer answers 500 `internal_error`."""
    import service.decode

    png = encode(smooth(20, 20), "PNG")
    assert decode(png).shape == (3, 20, 20)

    def broken(_img):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(service.decode, "_pil_to_tensor", broken)
    with pytest.raises(TypeError, match="a bug of ours"):
        decode(png)
    with pytest.raises(ApiError) as e:  # a corrupt file still fails as the client's problem
        decode(png[:40])
    assert e.value.status == 400


def test_the_internal_error_handler_answers_json_500_and_logs_the_trace(caplog):
    import asyncio

    import orjson
    from starlette.requests import Request

    from service.app import _internal_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": []})
    try:
        raise RuntimeError("secret detail at /work/main/service/x.py")
    except RuntimeError as exc:
        with caplog.at_level("ERROR", logger="convserve"):
            resp = asyncio.run(_internal_error(request, exc))
    assert resp.status_code == 500 and resp.media_type == "application/json"
    assert orjson.loads(resp.body) == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert [r for r in caplog.records if r.exc_info and "secret detail" in str(r.exc_info[1])]
