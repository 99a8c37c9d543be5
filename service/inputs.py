"""HTTP request -> encoded images and parameters, with every limit enforced.

Three ways to send images: a raw body (one image), `multipart/form-data` with parts named
`image`, or JSON `{"images": ["<base64>", ...], "top_k": 3}`. Whole-request problems raise
ApiError (the request fails); a single bad image in a multi-image request is returned as an
`ItemError` so that only its own entry fails.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.config import Limits
from service.errors import ApiError, bad_request, too_large, unprocessable, unsupported_media_type
from service.predictor import ItemError

RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream"}
)
MULTIPART = "multipart/form-data"
JSON = "application/json"


@dataclass
class ImageRequest:
    images: list[bytes | ItemError]  # encoded images, or the error that one of them already has
    multi: bool  # multipart/JSON (answer with "results") rather than a raw body
    top_k: int | None = None  # from a JSON body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing with 413 as soon as it is known to exceed `max_bytes`."""
    return await read_limited(request.headers.get("content-length"), request.stream(), max_bytes)


async def read_limited(declared: str | None, chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """`chunks` joined, refusing with 413 as soon as the declared Content-Length or what has
    arrived exceeds `max_bytes` (the routes' bodies, and service/fast_classify.py's)."""
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise too_large("body_too_large", f"request body of {declared} bytes exceeds the limit of {max_bytes}")
        except ValueError:
            raise bad_request("invalid_header", "Content-Length is not an integer") from None
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise too_large("body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def read_images(request: Request, limits: Limits) -> ImageRequest:
    kind = media_type(request)
    if kind not in RAW_IMAGE_TYPES and kind not in (MULTIPART, JSON):
        shown = kind or "none"
        raise unsupported_media_type(
            f"Content-Type {shown!r} is not supported: send a raw image (image/jpeg, image/png, image/webp, "
            "image/gif, image/bmp, image/tiff or application/octet-stream), multipart/form-data with parts "
            "named 'image', or application/json {\"images\": [<base64>, ...]}"
        )
    body = await read_body(request, limits.max_body_bytes)
    if kind in RAW_IMAGE_TYPES:
        return ImageRequest(images=[body], multi=False)
    if kind == MULTIPART:
        return ImageRequest(images=await _multipart_images(request, body, limits), multi=True)
    return _json_images(body, limits)


async def _multipart_images(request: Request, body: bytes, limits: Limits) -> list[bytes | ItemError]:
    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=limits.max_images_per_request, max_fields=limits.max_images_per_request
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many" in str(e):
            raise too_large(
                "too_many_images", f"at most {limits.max_images_per_request} images per request ({e})"
            ) from None
        raise unprocessable("malformed_multipart", f"cannot parse multipart body: {e}") from None
    parts = form.getlist("image")
    if not parts:
        raise bad_request("no_image", "multipart request has no part named 'image'")
    images: list[bytes | ItemError] = []
    for part in parts:
        if isinstance(part, UploadFile):
            images.append(await part.read())
        else:
            images.append(part.encode())  # a text field: decoding will say it is no image
    await form.close()
    return images


def _json_images(body: bytes, limits: Limits) -> ImageRequest:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise unprocessable("malformed_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise unprocessable("invalid_request", 'expected a JSON object {"images": ["<base64>", ...], "top_k": K}')
    encoded = doc["images"]
    if not encoded:
        raise bad_request("no_image", "'images' is empty")
    if len(encoded) > limits.max_images_per_request:
        raise too_large(
            "too_many_images", f"{len(encoded)} images; at most {limits.max_images_per_request} per request"
        )
    top_k = doc.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise bad_request("invalid_parameter", "top_k must be an integer")
    images: list[bytes | ItemError] = []
    for i, item in enumerate(encoded):
        if not isinstance(item, str):
            images.append(ItemError("invalid_base64", f"images[{i}] is not a base64 string"))
            continue
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            images.append(ItemError("invalid_base64", f"images[{i}] is not valid base64"))
    return ImageRequest(images=images, multi=True, top_k=top_k)


def parse_top_k(value: int | None, default: int, num_classes: int) -> int:
    if value is None:
        return min(default, num_classes)
    if not 1 <= value <= num_classes:
        raise bad_request("invalid_parameter", f"top_k must be between 1 and {num_classes}, got {value}")
    return value


def single_image(req: ImageRequest) -> bytes:
    """The one image of a feature-map request."""
    if len(req.images) != 1:
        raise bad_request("one_image_only", f"this endpoint takes exactly one image, got {len(req.images)}")
    image = req.images[0]
    if isinstance(image, ItemError):
        raise ApiError(image.status, image.code, image.message)
    return image
