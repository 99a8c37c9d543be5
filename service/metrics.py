"""Application metrics, all in one place, with units in the names.

Defined with `ray.serve.metrics`, so Ray tags them per deployment and replica and exports them
on each node's metrics port (8080 under `make serve`), prefixed `ray_`: `convserve_images_total`
is scraped as `ray_convserve_images_total`.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

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
        self._inflight = 0

    @property
    def inflight(self) -> int:
        """Requests in this replica right now (reading, decoding, batched or computing)."""
        return self._inflight

    def request_started(self) -> None:
        self._inflight += 1
        self.inflight_requests.set(self._inflight)

    def request_finished(self, endpoint: str, status: int) -> None:
        self._inflight -= 1
        self.inflight_requests.set(self._inflight)
        self.count_answer(endpoint, status)

    def count_answer(self, endpoint: str, status: int) -> None:
        """One HTTP answer; alone for requests answered before their route ran (refusals)."""
        self.requests_total.inc(tags={"endpoint": endpoint, "status": str(status)})

    def batch_done(self, size: int, inference_s: float, queue_waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)
        for wait in queue_waits_s:
            self.queue_wait_seconds.observe(wait)
        if self.device == "cuda":
            import torch

            self.gpu_memory_allocated_bytes.set(torch.cuda.memory_allocated())
        else:
            self.gpu_memory_allocated_bytes.set(0)  # exported on CPU replicas too, so dashboards resolve
