"""Ingress-side grouping: many requests' items -> one call to the model deployment.

A DeploymentHandle call costs an RPC, a scheduling decision and a task on the model replica, so
the `split` topology's ingress replica must not make one call per image at thousands of images
a second. The Grouper collects what its requests hand it and makes one call per group:

- a group leaves at once when no call of this grouper is in flight (an idle pipeline has nothing
  to amortise against: waiting would only add latency, as for a lone request);
- otherwise it waits up to `wait_s` for company, or until it holds `max_items` items;
- a request's items stay together (a 32-image request is one call, never split across groups);
- a request that gave up (its deadline passed, its client left) before its group left is dropped
  from the group; once sent, its answer is discarded.

The model replica's `@serve.batch` then groups the calls of every ingress replica into forward
passes: two levels of batching (service/batcher.py).

Pure asyncio: no Ray, no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Grouper(Generic[T, R]):
    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], max_items: int, wait_s: float):
        self.send = send
        self.max_items = max(1, max_items)
        self.wait_s = wait_s
        self.in_flight = 0  # calls sent and not answered
        self.calls = 0  # calls sent since the start (for tests and metrics)
        self._group: list[tuple[list[T], asyncio.Future]] = []
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, items: list[T]) -> list[R]:
        """The results for `items`, in order, from the group they joined."""
        if not items:
            return []
        if self._group and self._count + len(items) > self.max_items:
            self._flush()  # no room: the open group leaves now, these start the next
        future = asyncio.get_running_loop().create_future()
        self._group.append((items, future))
        self._count += len(items)
        if self._count >= self.max_items or self.in_flight == 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group = [(items, f) for items, f in self._group if not f.done()]  # done: cancelled by its caller
        self._group, self._count = [], 0
        if group:
            self.in_flight += 1
            self.calls += 1
            asyncio.get_running_loop().create_task(self._call(group))

    async def _call(self, group: list[tuple[list[T], asyncio.Future]]) -> None:
        try:
            sent = [item for items, _ in group for item in items]
            results = await self.send(sent)
            if len(results) != len(sent):
                raise RuntimeError(f"the model answered {len(results)} results for {len(sent)} items")
        except BaseException as e:  # noqa: BLE001 - every caller in the group gets the failure
            for _, f in group:
                if not f.done():
                    f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            self.in_flight -= 1
            if self._group and self.in_flight == 0:
                self._flush()  # the pipeline went idle with a group waiting for company: send it
        start = 0
        for items, f in group:
            if not f.done():
                f.set_result(results[start : start + len(items)])
            start += len(items)
