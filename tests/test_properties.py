"""Property-based tests (hypothesis): hostile bytes and JSON never escape as anything but ApiError 4xx.

- service.decode.decode_image_bytes: arbitrary bytes, and real JPEG/PNG/GIF bytes with random
  mutations (flipped bytes, truncation, insertions), give a uint8 [3, H, W] tensor or ApiError 400/413.
- service.inputs._json_images: any JSON value (and any bytes) gives an ImageRequest or ApiError 4xx.
- service.inputs._multipart_images: any bytes under a multipart Content-Type, likewise.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from service.config import Limits
from service.decode import decode_image_bytes
from service.errors import ApiError
from service.inputs import ImageRequest, _json_images, _multipart_images
from service.predictor import ItemError
from tests.images import animated_gif, encode, noise, palette_png, real_jpeg, smooth

# Small enough that a mutated header declaring a big image is refused (413) instead of decoded slowly.
MAX_PIXELS = 1_000_000
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS = {
    "cifar_jpeg": real_jpeg(),
    "jpeg": encode(smooth(48, 32), "JPEG", quality=90),
    "png": encode(noise(16, 12), "PNG"),
    "palette_png": palette_png(),
    "gif": animated_gif(),
}


def check_decode(data: bytes) -> None:
    try:
        out = decode_image_bytes(data, MAX_PIXELS)
    except ApiError as e:
        assert e.status in (400, 413), (e.status, e.code, e.message)
        assert "Traceback" not in e.message
        return
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    assert out.dim() == 3 and out.shape[0] == 3 and out.shape[1] * out.shape[2] <= MAX_PIXELS


@SETTINGS
@given(st.binary(max_size=4096))
def test_decode_arbitrary_bytes(data):
    check_decode(data)


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)).map(SEEDS.get), st.binary(min_size=0, max_size=12))
def test_decode_real_signature_then_garbage(seed, tail):
    """A real file's first bytes (its signature and header) followed by garbage."""
    check_decode(seed[: 8 + len(tail) * 3] + tail)


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 16))]
    return bytes(data)


@SETTINGS
@given(mutated_image())
def test_decode_mutated_real_images(data):
    check_decode(data)


# --- request parsing -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
base64_like = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=%", max_size=40)
image_docs = st.fixed_dictionaries(
    {"images": st.lists(base64_like | json_values, max_size=70)},
    optional={"top_k": json_values, "extra": json_values},
)
LIMITS = Limits()


def check_json(body: bytes) -> None:
    try:
        req = _json_images(body, LIMITS)
    except ApiError as e:
        assert 400 <= e.status < 500, (e.status, e.code)
        return
    assert isinstance(req, ImageRequest) and req.multi
    assert 1 <= len(req.images) <= LIMITS.max_images_per_request
    assert all(isinstance(i, bytes | ItemError) for i in req.images)
    assert req.top_k is None or (isinstance(req.top_k, int) and not isinstance(req.top_k, bool))


@SETTINGS
@given(json_values | image_docs)
def test_json_images_any_json_value(value):
    check_json(orjson.dumps(value))


@SETTINGS
@given(st.binary(max_size=512))
def test_json_images_any_bytes(body):
    check_json(body)


def _multipart_request(boundary: str) -> Request:
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers})


@st.composite
def multipart_bodies(draw) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["xx", "----b0undary", "a b"]))
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(["image", "other", "", 'im"age']))
        filename = draw(st.sampled_from(['; filename="a.jpg"', "", '; filename=""']))
        payload = draw(st.binary(max_size=64))
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode())
        parts.append(payload + b"\r\n")
    tail = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", draw(st.binary(max_size=32))]))
    return boundary, b"".join(parts) + tail


@SETTINGS
@given(multipart_bodies() | st.tuples(st.just("xx"), st.binary(max_size=512)))
def test_multipart_any_body(case):
    boundary, body = case
    try:
        images = asyncio.run(_multipart_images(_multipart_request(boundary), body, LIMITS))
    except ApiError as e:
        assert 400 <= e.status < 500, (e.status, e.code)
        return
    assert 1 <= len(images) <= LIMITS.max_images_per_request
    assert all(isinstance(i, bytes | ItemError) for i in images)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_valid_images(name):
    assert decode_image_bytes(SEEDS[name], MAX_PIXELS).shape[0] == 3
