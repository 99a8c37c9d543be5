"""Application metrics, all in one place, with units in the names.

Defined with `ray.serve.metrics`, so Ray tags them per deployment and replica and exports them
on each node's metrics port (8080 under `make serve`), prefixed `ray_`: `convserve_images_total`
is scraped as `ray_convserve_images_total`.

Requests record into plain Python counters and lists; a timer on the event loop hands them to
Ray's metrics every `FLUSH_S`. Each call into `ray.serve.metrics` costs tens of microseconds of
Python (tag checks and merges), about eight calls per request: off the request's path, a
single-image request on an idle replica is answered sooner. Ray exports every few seconds
anyway, so nothing is lost but a fraction of a second of freshness.
"""

from __future__ import annotations

import asyncio
import collections
import time

from ray.serve.metrics import Counter, Gauge, Histogram

from service.decode import FALLBACKS

FLUSH_S = 0.5  # how long recorded values wait before they are handed to Ray's metrics

# 0.5 ms to 10 s, roughly x2 per bucket.
LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


def batch_size_buckets(max_batch_size: int) -> list[float]:
    """One bucket per power of two up to the max batch size (and the max itself)."""
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch_size))
    return buckets


class ServiceMetrics:
    def __init__(self, max_batch_size_limit: int, device: str):
        self.device = device
        # Buckets cover every batch size the config allows, since user_config can change it live.
        self.batch_size = Histogram(
            "convserve_batch_size",
            description="Images per executed batch.",
            boundaries=batch_size_buckets(max_batch_size_limit),
        )
        self.queue_wait_seconds = Histogram(
            "convserve_queue_wait_seconds",
            description="Time a request waited for its batch to start.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.inference_seconds = Histogram(
            "convserve_inference_seconds",
            description="Forward-pass time per batch.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("device",),
        )
        self.inference_seconds.set_default_tags({"device": device})
        self.preprocess_seconds = Histogram(
            "convserve_preprocess_seconds",
            description="Decode and resize time per image.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.requests_total = Counter(
            "convserve_requests_total",
            description="HTTP requests answered, by endpoint and status code.",
            tag_keys=("endpoint", "status"),
        )
        self.images_total = Counter(
            "convserve_images_total", description="Images received, by endpoint.", tag_keys=("endpoint",)
        )
        self.inflight_requests = Gauge(
            "convserve_inflight_requests", description="Requests being handled by this replica right now."
        )
        # Ray's node metrics (ray_node_gpus_utilization, ray_node_gram_used) cover the whole GPU;
        # this is what this replica's PyTorch holds.
        self.gpu_memory_allocated_bytes = Gauge(
            "convserve_gpu_memory_allocated_bytes",
            description="GPU memory held by this replica's tensors (0 on CPU replicas).",
        )
        self.decode_fallbacks_total = Counter(
            "convserve_decode_fallbacks_total",
            description="JPEGs that libjpeg-turbo declined and Pillow decoded instead (slower), by exception class.",
            tag_keys=("reason",),
        )
        self._fallbacks_flushed: collections.Counter[str] = collections.Counter()
        self.shed_total = Counter(
            "convserve_shed_total",
            description="Requests admitted just before an overload began and refused (503 overloaded) before "
            "they reached a batch.",
        )
        self._shed = 0
        # Running totals since the replica started, for the Open Inference Protocol's statistics
        # (GET /v2/models/<name>/stats): counts and nanoseconds, as Triton reports them.
        self.totals: collections.Counter[str] = collections.Counter()
        self.answers_total: collections.Counter[str] = collections.Counter()  # success/fail (+ _ns), timed routes
        self.last_inference_ms = 0.0  # wall clock, ms since the epoch, of the last batch
        self._inflight = 0
        self._answers: collections.Counter[tuple[str, str]] = collections.Counter()
        self._images: collections.Counter[str] = collections.Counter()
        self._preprocess_s: list[float] = []
        self._batches: list[tuple[int, float, list[float]]] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    @property
    def inflight(self) -> int:
        """Requests in this replica right now (reading, decoding, batched or computing)."""
        return self._inflight

    def request_started(self) -> None:
        self._inflight += 1
        self._soon()

    def request_finished(self, endpoint: str, status: int | str, seconds: float | None = None) -> None:
        """`status`: the HTTP status, or a gRPC call's status code name ("OK", "INVALID_ARGUMENT")."""
        self._inflight -= 1
        self.count_answer(endpoint, status)
        if seconds is not None:
            outcome = "success" if status in (200, "OK") else "fail"
            self.answers_total[outcome] += 1
            self.answers_total[outcome + "_ns"] += int(seconds * 1e9)

    def count_answer(self, endpoint: str, status: int | str) -> None:
        """One HTTP answer; alone for requests answered before their route ran (refusals)."""
        self._answers[(endpoint, str(status))] += 1
        self._soon()

    def count_shed(self, n: int) -> None:
        self._shed += n
        self._soon()

    def count_images(self, endpoint: str, n: int) -> None:
        self._images[endpoint] += n

    def observe_preprocess(self, seconds: float) -> None:
        self._preprocess_s.append(seconds)
        self.totals["preprocess_ns"] += int(seconds * 1e9)

    def batch_done(self, size: int, inference_s: float, queue_waits_s: list[float]) -> None:
        self._batches.append((size, inference_s, queue_waits_s))
        self.totals["batches"] += 1
        self.totals["images"] += size
        self.totals["inference_ns"] += int(inference_s * 1e9)
        self.totals["queue_ns"] += int(sum(queue_waits_s) * 1e9)
        self.last_inference_ms = time.time() * 1000
        self._soon()

    def _soon(self) -> None:
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a direct call): hand over at once
            self.flush()
            return
        self._flush_timer = loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Hand what was recorded since the last flush to Ray's metrics."""
        self._flush_timer = None
        answers, self._answers = self._answers, collections.Counter()
        images, self._images = self._images, collections.Counter()
        preprocess, self._preprocess_s = self._preprocess_s, []
        batches, self._batches = self._batches, []
        for (endpoint, status), n in answers.items():
            self.requests_total.inc(n, tags={"endpoint": endpoint, "status": status})
        for endpoint, n in images.items():
            self.images_total.inc(n, tags={"endpoint": endpoint})
        for seconds in preprocess:
            self.preprocess_seconds.observe(seconds)
        for size, inference_s, waits in batches:
            self.batch_size.observe(size)
            self.inference_seconds.observe(inference_s)
            for wait in waits:
                self.queue_wait_seconds.observe(wait)
        shed, self._shed = self._shed, 0
        if shed:
            self.shed_total.inc(shed)
        for reason, n in (FALLBACKS - self._fallbacks_flushed).items():
            self.decode_fallbacks_total.inc(n, tags={"reason": reason})
        self._fallbacks_flushed = FALLBACKS.copy()
        self.inflight_requests.set(self._inflight)
        if self.device == "cuda":
            import torch

            self.gpu_memory_allocated_bytes.set(torch.cuda.memory_allocated())
        else:
            self.gpu_memory_allocated_bytes.set(0)  # exported on CPU replicas too, so dashboards resolve
        if self._inflight:  # keep the gauge current while requests are in
            self._soon()
