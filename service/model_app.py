"""The `split` topology's model deployment, and the ingress's client for it.

`topology: split` (service/config.py) runs two deployments in one application:

    HTTP/gRPC -> ConvServe (ingress: routes, auth, admission, body limits, decode, resize to the
                 model's size; CPU only, as many replicas as the decode needs)
              -> DeploymentHandle -> ConvModel (ModelBatcher: @serve.batch, pacing, the forward
                 pass; one replica per GPU, or a fraction of one)

What travels is what the model needs: uint8 [3, S, S] images (3 KB for a CIFAR image; objects
under 100 KiB go inline in Ray's RPC), never a float copy four times larger, and as NumPy arrays,
not torch tensors: pickle serialises a torch tensor through torch.save and torch.load on each
side, a NumPy array as its raw buffer. Each ingress
replica groups its requests' items into one call (service/grouping.py); the model replica's
`@serve.batch` groups the calls of every ingress replica into forward passes.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from ray import serve

from model import DEFAULT_BUNDLE, load_bundle
from service.batcher import ModelBatcher, make_predictor
from service.config import MAX_BATCH_SIZE_LIMIT, BatchingConfig, ServeConfig
from service.grouping import Grouper
from service.lanes import claim_threads
from service.metrics import ServiceMetrics
from service.predictor import ItemError, ItemResult, WorkItem, keep_large_allocations

log = logging.getLogger("convserve")


# Defaults when the Serve config has no `deployments` entry named ConvModel (which then sets them).
# No access log: a line per call cost model-replica CPU (as for ConvServe in deploy/serve_config.yaml).
@serve.deployment(
    name="ConvModel",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    logging_config={"enable_access_log": False},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class ConvModel:
    def __init__(self, config: dict | None = None):
        self.config = ServeConfig.from_env(config)
        # the forward lanes' threads; one for everything else (service/lanes.py)
        self.config = self.config.model_copy(update={"torch_threads": claim_threads(self.config.torch_threads)})
        keep_large_allocations()  # the forward thread reuses activation memory (service/predictor.py)
        self.bundle = load_bundle(self.config.bundle_path or DEFAULT_BUNDLE)
        predictor = make_predictor(self.config, self.bundle)
        self.metrics = ServiceMetrics(MAX_BATCH_SIZE_LIMIT, predictor.device.type)
        self.batcher = ModelBatcher(self.config, self.metrics, predictor)
        self.calls = 0  # infer() calls and the items they carried: what the ingress's grouping saves
        self.items = 0

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate({**self.config.batching.model_dump(), **(user_config or {})})
        self.config = self.config.model_copy(update={"batching": batching})
        self.batcher.apply(batching)

    async def check_health(self) -> None:
        await self.batcher.check_health()

    async def infer(self, items: list[WorkItem]) -> list[ItemResult | ItemError]:
        """One result per item; items from any number of requests and ingress replicas."""
        self.calls += 1
        self.items += len(items)
        now = time.perf_counter()
        for item in items:
            if item.image is not None:  # None: an encoded JPEG, decoded with its batch (WorkItem.encoded)
                item.image = torch.from_numpy(item.image)  # no copy
            item.enqueued_at = now  # the ingress's perf_counter means nothing in this process
        results = await self.batcher.run(items)
        for r in results:
            if isinstance(r, ItemResult) and r.feature_maps:
                r.feature_maps = {name: m.numpy() for name, m in r.feature_maps.items()}
        return results

    async def describe(self) -> dict:
        """What the ingress reports about the model (GET /v1/model): where it runs, and what this
        replica received (calls, items) and computed (batches, images)."""
        t = self.metrics.totals
        return {
            "device": self.batcher.predictor.device.type,
            "precision": self.batcher.predictor.precision,
            "calls": self.calls,
            "items": self.items,
            "batches": t["batches"],
            "images": t["images"],
            "inference_ns": t["inference_ns"],
            "queue_ns": t["queue_ns"],
            "last_inference_ms": self.metrics.last_inference_ms,
        }


class RemoteModel:
    """The ingress's side: `run(items, budget_s)` through a Grouper and the handle."""

    def __init__(self, handle, max_items: int, wait_s: float | None):
        """`wait_s` None: no grouping, one call per request (to measure what grouping buys)."""
        self.handle = handle
        self.grouper: Grouper[WorkItem, ItemResult | ItemError] | None = (
            None if wait_s is None else Grouper(self._send, max_items, wait_s)
        )

    async def _send(self, items: list[WorkItem]) -> list[ItemResult | ItemError]:
        wire = [dataclasses.replace(i, image=None if i.image is None else i.image.numpy()) for i in items]
        results = await self.handle.infer.remote(wire)
        for r in results:
            if isinstance(r, ItemResult) and r.feature_maps:
                r.feature_maps = {name: torch.from_numpy(m) for name, m in r.feature_maps.items()}
        return results

    async def run(self, work: list[WorkItem], budget_s: float) -> list[ItemResult | ItemError]:
        expires_at = time.time() + budget_s
        for item in work:
            item.expires_at = expires_at  # the model replica skips it if it queues past this
        return await (self._send(work) if self.grouper is None else self.grouper.submit(work))

    def resize(self, max_items: int) -> None:
        if self.grouper is not None:
            self.grouper.max_items = max(1, max_items)
