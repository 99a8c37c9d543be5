"""The batching core: work items from many requests -> full forward passes on the lanes.

Everything between "an image is decoded" and "its result is ready", in one object that both
topologies use (service/app.py): the `fused` replica holds one next to its HTTP routes, the
`split` topology's model replica (service/model_app.py) holds one behind a DeploymentHandle.

- `@serve.batch` groups items into batches (Ray's batching utility: a queue on this object);
- the pacer (service/pacing.py) holds items while every lane is busy, so batches fill;
- the lanes (service/lanes.py) compute batches side by side on their share of the cores.

No HTTP here; the only Ray in it is `serve.batch`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from model.bundle import Bundle
from service.config import MAX_FORWARD_LANES, BatchingConfig, ServeConfig
from service.lanes import ForwardLanes, default_lanes
from service.metrics import ServiceMetrics
from service.pacing import ForwardPacer
from service.predictor import BatchedPredictor, ItemError, ItemResult, WorkItem, default_warmup_sizes

log = logging.getLogger("convserve")

PACING_MARGIN_S = 0.003  # the next batch is handed over this long before the forward thread is free
# When an overload starts, the requests that came to the pacer's gate this recently are shed (refused):
# their refusal then comes about as late as one from HAProxy's tarpit (service/haproxy_gate.py).
SHED_WINDOW_S = 0.05


def make_predictor(config: ServeConfig, bundle: Bundle) -> BatchedPredictor:
    """The predictor the service's settings describe (the fused replica's and ConvModel's)."""
    return BatchedPredictor(
        bundle,
        config.device,
        config.amp_dtype,
        config.channels_last,
        config.noop_forward,
        config.limits.max_image_pixels,
        config.cpu_amp_dtype,
    )


class ModelBatcher:
    """`await run(items)`: one result per item, computed in shared batches."""

    def __init__(self, config: ServeConfig, metrics: ServiceMetrics, predictor: BatchedPredictor):
        self.config = config
        self.metrics = metrics
        self.predictor = predictor
        self._calls = 0  # run() calls in progress: when only one is, no other can join its batch
        # Forward lanes: batches compute side by side on their share of the cores, while the event
        # loop keeps decoding (service/lanes.py).
        threads = config.torch_threads or torch.get_num_threads()  # the replica's claim_threads
        lanes = config.forward_lanes or default_lanes(predictor.device.type, threads)
        self.lanes = ForwardLanes(lanes, threads)
        sizes = config.warmup_batch_sizes or default_warmup_sizes(
            config.batching.max_batch_size, every_size=predictor.device.type == "cuda"
        )
        # Warm up on the lanes themselves, with each thread count they will use (OpenMP keeps a
        # team per OS thread; only the wide lane has one of more than a thread, service/lanes.py).
        # The first pass per size pays one-time costs; the second is timed, lanes side by side.
        self.lanes.on_wide_lane(lambda: predictor.warmup(sizes))
        self.lanes.on_every_lane(lambda: predictor.warmup(sizes), threads=self.lanes.shared_threads)
        timings = self.lanes.on_every_lane(lambda: predictor.warmup(sizes), threads=self.lanes.shared_threads)[0]
        if predictor.device.type == "cuda" and config.model_decode != "off":
            # nvjpeg's first call sets up its handles and buffers: not in the first photo's request
            self.lanes.on_every_lane(predictor.warmup_decode, threads=self.lanes.shared_threads)
        log.info(
            "warm-up done on %s, %d lane(s): %s", predictor.device, lanes, {k: round(v, 4) for k, v in timings.items()}
        )
        # Holds requests while every lane is busy, and lets them form the next batch just before
        # one is free (service/pacing.py).
        self.pacer = ForwardPacer(PACING_MARGIN_S, seed_durations_s=timings, lanes=lanes)
        self.apply(config.batching)

    def apply(self, batching: BatchingConfig) -> None:
        """Live batching changes (the deployment's user_config)."""
        self.config = self.config.model_copy(update={"batching": batching})
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._waiting_alone = False
        # The gate opens this long before the forward thread is free: the batch wait, plus a margin
        # for the event loop to hand the batch over.
        self.pacer.lead_s = batching.batch_wait_timeout_s + PACING_MARGIN_S

    def _set_batch_wait(self, alone: bool) -> None:
        """No wait for company when nothing else is on its way: none can join the batch in time
        (a closed-loop client waits for this answer first), so the wait would be pure latency.
        Ray reads the timeout when a batch's first item arrives, so setting it just before
        enqueueing applies to that batch."""
        if alone != self._waiting_alone:
            self._waiting_alone = alone
            self._batched.set_batch_wait_timeout_s(0.0 if alone else self.config.batching.batch_wait_timeout_s)

    def shed(self, at_most: int) -> int:
        """Refuse up to `at_most` of the newest requests waiting for a batch (they raise
        service.pacing.Shed); how many. Called when admission control starts refusing."""
        shed = self.pacer.shed(at_most, SHED_WINDOW_S)
        if shed:
            self.metrics.count_shed(shed)
        return shed

    async def check_health(self) -> None:
        """A tiny forward pass on a lane (never blocking the event loop); raises if the model no
        longer gives valid scores, and Ray replaces the replica after repeated failures."""
        await asyncio.wait_for(asyncio.wrap_future(self.lanes.submit(self.predictor.check_health)), 25)

    # Up to one batch per lane computing, and the next already queued in the lanes' pool, so that
    # it starts the moment a lane is free (service/pacing.py gates how many actually form).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.004, max_concurrent_batches=MAX_FORWARD_LANES + 1)
    async def _batched(self, items: list[WorkItem]) -> list[ItemResult | ItemError]:
        now = time.time()
        expired = [i.expires_at is not None and now > i.expires_at for i in items]
        live = [item for item, late in zip(items, expired, strict=True) if not late]
        results: list[ItemResult | ItemError] = []
        if live:
            token = self.pacer.submitted(len(live))
            seconds = None
            try:
                results, started, seconds = await asyncio.wrap_future(self.lanes.submit(self._timed_predict, live))
            finally:
                self.pacer.finished(token, seconds)
            inference_s = next((r.inference_s for r in results if isinstance(r, ItemResult)), 0.0)
            waits = [started - i.enqueued_at for i in live]
            for r, wait in zip(results, waits, strict=True):
                if isinstance(r, ItemResult):
                    r.queue_s = wait
            self.metrics.batch_done(len(live), inference_s, waits)
        # An item whose caller's deadline passed while it queued is not computed (its caller in the
        # other deployment has answered 504 already); in one replica Ray drops cancelled callers itself.
        done = iter(results)
        late_error = ItemError("timeout", "deadline passed before the batch ran", 504)
        return [late_error if late else next(done) for late in expired]

    def _timed_predict(self, items: list[WorkItem]) -> tuple[list[ItemResult | ItemError], float, float]:
        started = time.perf_counter()
        results = self.predictor.predict(items)
        return results, started, time.perf_counter() - started

    async def run(self, work: list[WorkItem], others_coming: bool | None = None) -> list[ItemResult | ItemError]:
        """Batch `work` with whatever else arrives; raises TimeoutError only through the caller's
        own `asyncio.timeout`. `others_coming`: whether another request may join in time (None:
        whether another run() is in progress)."""
        self._calls += 1
        try:
            await self.pacer.wait_turn()  # join the next batch, not a batch of one (service/pacing.py)
            company = self._calls > 1 if others_coming is None else others_coming
            self._set_batch_wait(alone=self.pacer.idle and not company)
            return list(await asyncio.gather(*(self._batched(w) for w in work)))
        finally:
            self._calls -= 1
