"""`POST /v1/classify` with one raw image, answered without FastAPI's routing: the hot path.

The FastAPI route answers every form of the request (a raw body, multipart, JSON) and documents it
in /docs. This ASGI middleware takes the commonest form, one raw image (`Content-Type` an image
type or `application/octet-stream`, no query but `top_k=<digits>`), hands it to the same code the
route runs (`ConvServe.classify_raw` -> `ConvServe._classify`) and sends the answer itself: no
routing, dependency solving, exception middleware or Response object per request. Anything else
passes on to the route unchanged. It sits inside the bearer auth and admission control
(service/middleware.py), so both apply as before; the answers, errors included, are the route's
(tests/test_serving.py sends each request both ways and compares).

Why: the replica's event loop shares the CPU with the forward lanes, and each millisecond it spends
per request is one the lanes lose. Measured on the 2-core machine at 128 connections (CPU of the
event-loop thread over 10 s of wrk, from /proc; 2026-12-03): 0.74-0.87 ms per request through
FastAPI (six runs), 0.51-0.58 ms here (five runs); the loop went from 17-19% of one CPU to 12-13%,
and the lanes from 160-166% to 166-170%.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import ClientDisconnect

from service.inputs import RAW_IMAGE_TYPES

CLASSIFY_PATH = "/v1/classify"
_TOP_K_QUERY = re.compile(rb"top_k=(\d{1,9})")

# (Content-Length as sent or None, the body's chunks, top_k or None) -> (status, JSON body, headers),
# or None when the client went away first
Handler = Callable[[str | None, AsyncIterator[bytes], int | None], Awaitable[tuple[int, bytes, dict[str, str]] | None]]


class _Route:
    handler: Handler | None = None  # the replica's ConvServe.classify_raw, set in its constructor


ROUTE = _Route()


def answer_with(handler: Handler | None) -> None:
    """Serve raw-body classify requests with `handler` from now on (None: leave them to FastAPI)."""
    ROUTE.handler = handler


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def raw_classify_top_k(scope) -> tuple[bool, int | None]:
    """Whether the fast path answers this request, and its top_k (None: the default)."""
    if scope["type"] != "http" or scope["path"] != CLASSIFY_PATH or scope.get("method") != "POST":
        return False, None
    content_type = _header(scope, b"content-type") or b""
    if content_type.split(b";", 1)[0].strip().lower().decode("latin-1") not in RAW_IMAGE_TYPES:
        return False, None  # multipart, JSON, or a type the route refuses with its 415
    query = scope.get("query_string", b"")
    if not query:
        return True, None
    match = _TOP_K_QUERY.fullmatch(query)
    return (True, int(match.group(1))) if match else (False, None)  # anything else: FastAPI validates it


async def _chunks(receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class FastClassify:
    def __init__(self, app, route: _Route = ROUTE):
        self.app = app
        self.route = route

    async def __call__(self, scope, receive, send):
        handler = self.route.handler
        taken, top_k = raw_classify_top_k(scope) if handler is not None else (False, None)
        if not taken:
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        answer = await handler(None if length is None else length.decode("latin-1"), _chunks(receive), top_k)
        if answer is None:
            return
        await send_json(send, *answer)


async def send_json(send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """A whole JSON response on an ASGI `send` (this path's answers, the middlewares' refusals)."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
