"""A small HTTP load generator for the reliability tests: open loop (fixed arrival rate) and closed loop.

One asyncio event loop, no thread per request. Every request records (scheduled start, latency,
status); a status is an int, "timeout" when the client timeout passed, or the exception's class
name when the connection failed.

The closed loop uses aiohttp (a Ray Serve dependency). The open loop speaks HTTP/1.1 itself over
asyncio protocols, with each request's bytes built once: it shares the service's two cores, and
at 8x capacity (about 2,000 requests/s) aiohttp's per-request work took CPU the service needed
(goodput measured at 8x counted the load generator's cost as the service's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp


@dataclass
class Sample:
    start_s: float  # when the request was due, from the start of the run
    latency_s: float
    status: int | str
    body: bytes = b""


async def _one(session, url, body, headers, timeout_s, start_s, keep_body) -> Sample:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            data = await resp.read()
            return Sample(start_s, time.perf_counter() - t0, resp.status, data if keep_body(resp.status) else b"")
    except TimeoutError:
        return Sample(start_s, time.perf_counter() - t0, "timeout")
    except aiohttp.ClientError as e:
        return Sample(start_s, time.perf_counter() - t0, type(e).__name__)


def _keep_errors(status: int) -> bool:
    return status >= 400


class _Http11(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, driven by callbacks (no task or
    timer per request): enough parsing for a status, a Content-Length or chunked body, and
    `Connection: close`. `on_answer(conn, status, body, keep)` or `on_lost(conn)` ends a request."""

    def __init__(self, on_answer: Callable, on_lost: Callable):
        self.on_answer, self.on_lost = on_answer, on_lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.sample: Sample | None = None  # the request in flight
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.busy:
            self.busy = False
            self.on_lost(self)

    def send(self, data: bytes) -> None:
        self.buffer.clear()
        self.busy = True
        self.sent_at = time.perf_counter()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or not self.busy:
            return
        head = bytes(self.buffer[:end]).lower()
        body = self.buffer[end + 4 :]
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
            if len(body) < length:
                return
            body = body[:length]
        elif b"transfer-encoding: chunked" in head and not body.endswith(b"0\r\n\r\n"):
            return
        self.busy = False
        self.on_answer(self, int(head[9:12]), bytes(body), b"\r\nconnection: close" not in head)


async def _open_loop(url, bodies, headers, rate, seconds, timeout_s) -> list[Sample]:
    """Requests leave at i / rate whatever the answers take; each on an idle keep-alive connection,
    or a new one. A sweep every 50 ms ends requests older than `timeout_s` (their connection is
    closed, never reused)."""
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    host, port = parts.hostname, parts.port or 80
    head = f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    idle: list[_Http11] = []
    opened: list[_Http11] = []
    pending = 0  # requests not answered yet, connecting ones included
    all_sent = False
    finished = loop.create_future()

    def done(sample: Sample) -> None:
        nonlocal pending
        samples.append(sample)
        pending -= 1
        if all_sent and pending == 0 and not finished.done():
            finished.set_result(None)

    def on_answer(conn: _Http11, status: int, body: bytes, keep: bool) -> None:
        sample, conn.sample = conn.sample, None
        sample.latency_s, sample.status = time.perf_counter() - conn.sent_at, status
        sample.body = body if _keep_errors(status) else b""
        if keep and not conn.closed:
            idle.append(conn)
        else:
            conn.transport.close()
        done(sample)

    def on_lost(conn: _Http11) -> None:
        sample, conn.sample = conn.sample, None
        sample.latency_s, sample.status = time.perf_counter() - conn.sent_at, "ServerDisconnectedError"
        done(sample)

    async def connect_and_send(data: bytes, sample: Sample) -> None:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(lambda: _Http11(on_answer, on_lost), host, port)
        except (OSError, TimeoutError) as e:
            sample.latency_s = time.perf_counter() - t0
            sample.status = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
            done(sample)
            return
        opened.append(conn)
        conn.sample = sample
        conn.send(data)
        conn.sent_at = t0  # the connection's setup is part of this request's latency

    def sweep() -> None:
        now = time.perf_counter()
        for conn in opened:
            if conn.busy and now - conn.sent_at > timeout_s:
                sample, conn.sample, conn.busy = conn.sample, None, False
                sample.latency_s, sample.status = now - conn.sent_at, "timeout"
                conn.transport.close()
                done(sample)
        if not finished.done():
            loop.call_later(0.05, sweep)

    sweep()
    total, start, i = int(rate * seconds), time.perf_counter(), 0
    while i < total:
        now = time.perf_counter() - start
        while i < total and i / rate <= now:  # every request due by now
            sample = Sample(i / rate, 0.0, "unsent")
            pending += 1
            while idle and idle[-1].closed:
                idle.pop()
            if idle:
                conn = idle.pop()
                conn.sample = sample
                conn.send(requests[i % len(requests)])
            else:
                loop.create_task(connect_and_send(requests[i % len(requests)], sample))
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    all_sent = True
    try:
        if pending:
            await finished
    finally:
        for conn in opened:
            if conn.transport is not None:
                conn.transport.close()
    return sorted(samples, key=lambda s: s.start_s)


async def _closed_loop(url, bodies, headers, concurrency, seconds, timeout_s) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        end = start + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                due = time.perf_counter() - start
                body = bodies[i % len(bodies)]
                samples.append(await _one(session, url, body, headers, timeout_s, due, _keep_errors))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return samples, time.perf_counter() - start


def open_loop(
    url: str, bodies: Sequence[bytes], headers: dict, rate: float, seconds: float, timeout_s: float = 30.0
) -> list[Sample]:
    """`rate` requests per second for `seconds`, whatever the answers take (no coordinated omission)."""
    return asyncio.run(_open_loop(url, bodies, headers, rate, seconds, timeout_s))


def closed_loop(
    url: str, bodies: Sequence[bytes], headers: dict, concurrency: int, seconds: float, timeout_s: float = 30.0
) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request when the previous one is answered."""
    return asyncio.run(_closed_loop(url, bodies, headers, concurrency, seconds, timeout_s))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))  # ceil(p/100 * n)
    return ordered[rank - 1]


def summarize(samples: Sequence[Sample]) -> dict:
    """Per status: count, p50/p99/max latency in ms."""
    by_status: dict[str, list[float]] = {}
    for s in samples:
        by_status.setdefault(str(s.status), []).append(s.latency_s)
    return {
        status: {
            "n": len(lat),
            "p50_ms": round(percentile(lat, 50) * 1000, 1),
            "p99_ms": round(percentile(lat, 99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1),
        }
        for status, lat in sorted(by_status.items())
    }
