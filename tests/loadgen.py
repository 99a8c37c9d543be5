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
from collections.abc import Sequence
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
    """One keep-alive HTTP/1.1 connection, one request at a time: enough parsing for a status,
    a Content-Length or chunked body, and `Connection: close`."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection closed before the answer"))

    def request(self, data: bytes) -> asyncio.Future:
        self.buffer.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).lower()
        body = self.buffer[end + 4 :]
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
            if len(body) < length:
                return
            body = bytes(body[:length])
        elif b"transfer-encoding: chunked" in head:
            if not body.endswith(b"0\r\n\r\n"):
                return
            body = bytes(body)
        status = int(head[9:12])
        keep = b"\r\nconnection: close" not in head
        self.waiter.set_result((status, body, keep))


async def _open_loop(url, bodies, headers, rate, seconds, timeout_s) -> list[Sample]:
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    host, port = parts.hostname, parts.port or 80
    head = f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    loop = asyncio.get_running_loop()
    idle: list[_Http11] = []
    opened: list[_Http11] = []

    async def one(data: bytes, due: float) -> Sample:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                while idle and idle[-1].closed:
                    idle.pop()
                if idle:
                    conn = idle.pop()
                else:
                    _, conn = await loop.create_connection(_Http11, host, port)
                    opened.append(conn)
                status, body, keep = await conn.request(data)
        except TimeoutError:
            return Sample(due, time.perf_counter() - t0, "timeout")
        except OSError as e:
            return Sample(due, time.perf_counter() - t0, type(e).__name__)
        latency = time.perf_counter() - t0
        if keep and not conn.closed:
            idle.append(conn)
        return Sample(due, latency, status, body if _keep_errors(status) else b"")

    tasks, start = [], time.perf_counter()
    try:
        for i in range(int(rate * seconds)):
            due = i / rate
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(requests[i % len(requests)], due)))
        return list(await asyncio.gather(*tasks))
    finally:
        for conn in opened:
            if conn.transport is not None:
                conn.transport.close()


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
