"""A small HTTP load generator for the reliability tests: open loop (fixed arrival rate) and closed loop.

asyncio + aiohttp (a Ray Serve dependency), one event loop in a thread of its own, so that the
test process can fire a few hundred requests per second without a thread per request. Every
request records (scheduled start, latency, status); a status is an int, "timeout" when the client
timeout passed, or the exception's class name when the connection failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

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


async def _open_loop(url, bodies, headers, rate, seconds, timeout_s) -> list[Sample]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            due = i / rate
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[i % len(bodies)]
            tasks.append(asyncio.create_task(_one(session, url, body, headers, timeout_s, due, _keep_errors)))
        return list(await asyncio.gather(*tasks))


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
