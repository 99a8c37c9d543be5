"""service/fast_classify.py as an ASGI middleware: which requests it takes, and what it sends.
(tests/test_serving.py sends the same requests through it and through the FastAPI route.)"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from service.fast_classify import FastClassify, _Route, raw_classify_top_k


def scope(path="/v1/classify", method="POST", content_type: bytes | None = b"image/jpeg", query=b"", length=None):
    headers = [] if content_type is None else [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "path": path, "method": method, "headers": headers, "query_string": query}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (True, None)),
        ({"query": b"top_k=3"}, (True, 3)),
        ({"query": b"top_k=0"}, (True, 0)),  # the handler refuses it with the route's 400
        ({"content_type": b"IMAGE/PNG; q=1"}, (True, None)),
        ({"content_type": b"application/octet-stream"}, (True, None)),
        # everything else is the route's: its validation, its 415, its 405, its other forms
        ({"query": b"top_k=abc"}, (False, None)),
        ({"query": b"top_k=-1"}, (False, None)),
        ({"query": b"top_k=3&x=1"}, (False, None)),
        ({"query": b"top_k=1234567890"}, (False, None)),
        ({"content_type": b"multipart/form-data; boundary=x"}, (False, None)),
        ({"content_type": b"application/json"}, (False, None)),
        ({"content_type": b"text/plain"}, (False, None)),
        ({"content_type": None}, (False, None)),
        ({"method": "GET"}, (False, None)),
        ({"path": "/v1/feature-maps"}, (False, None)),
    ],
)
def test_which_requests_the_fast_path_takes(kwargs, expected):
    assert raw_classify_top_k(scope(**kwargs)) == expected


class Downstream:
    """The ASGI app behind the middleware (FastAPI's routes in the service)."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def run(app, scope, messages):
    sent, queue = [], list(messages)

    async def receive():
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_a_raw_request_is_answered_by_the_handler_with_its_status_body_and_headers():
    seen = {}

    async def handler(length, chunks, top_k):
        seen["length"], seen["top_k"] = length, top_k
        seen["body"] = b"".join([c async for c in chunks])
        return 400, b'{"error":{}}', {"Retry-After": "1"}

    downstream = Downstream()
    route = _Route()
    route.handler = handler
    sent = run(
        FastClassify(downstream, route),
        scope(query=b"top_k=2", length=6),
        [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.request", "body": b"def"}],
    )
    assert seen == {"length": "6", "top_k": 2, "body": b"abcdef"}
    assert downstream.calls == 0
    assert sent[0]["status"] == 400
    assert dict(sent[0]["headers"]) == {
        b"content-length": b"12",
        b"content-type": b"application/json",
        b"retry-after": b"1",
    }
    assert sent[1] == {"type": "http.response.body", "body": b'{"error":{}}'}


def test_other_requests_and_an_unconfigured_replica_go_to_the_route():
    async def handler(length, chunks, top_k):
        raise AssertionError("not for the fast path")

    downstream = Downstream()
    route = _Route()
    route.handler = handler
    run(FastClassify(downstream, route), scope(content_type=b"application/json"), [])
    route.handler = None
    run(FastClassify(downstream, route), scope(), [])
    assert downstream.calls == 2


def test_a_client_gone_mid_body_gets_nothing_sent():
    async def handler(length, chunks, top_k):
        try:
            async for _ in chunks:
                pass
        except ClientDisconnect:
            return None
        raise AssertionError("the disconnect must reach the handler")

    route = _Route()
    route.handler = handler
    sent = run(
        FastClassify(Downstream(), route),
        scope(),
        [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}],
    )
    assert sent == []
