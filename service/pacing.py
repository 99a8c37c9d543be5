"""When may the next batch form? Pacing that keeps the forward thread busy and the batches full.

The forward pass runs in one worker thread; the event loop decodes requests meanwhile. Two ways
to lose throughput:

- Tiny batches. `@serve.batch` forms the next batch as soon as the previous one is handed off:
  the first request to arrive mid-forward waits `batch_wait_timeout_s` and leaves with whatever
  came in that time, so a 200 ms forward of 32 images is followed by a forward of 2.
- Idle gaps. If the next batch forms only after the running one has finished, the forward thread
  waits while the event loop answers 32 requests and only then dispatches the next batch: on a
  2-core machine that left about a quarter of the CPU idle at 32 connections.

So requests wait at a gate (`wait_turn`) while every forward lane (service/lanes.py) is busy for
longer than `lead_s`; the gate opens `lead_s` before the first running batch is predicted to
finish. Everything that arrived meanwhile then forms the next batch at once, and that batch is
already queued for the lanes when a lane frees up. While a lane is free the gate stays open. Forward durations are
predicted per batch size from the warm-up, then from what was measured (an exponential average).

`shed` refuses the newest requests still waiting at the gate: when admission control starts
refusing (service/middleware.py), the requests it admitted just before, under the higher limit,
would otherwise wait behind everything ahead of them (docs/reliability.md, "Overload").

Pure asyncio: no Ray, no torch. All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import time


class Shed(Exception):
    """A request taken off the gate by `ForwardPacer.shed`: answer it 503, it was never computed."""


class ForwardPacer:
    """The gate in front of `lanes` forward threads (lanes: batches that compute side by side).

    `submitted(n)` returns a token for the batch; `finished(token, seconds)` retires it. A batch
    beyond `lanes` waits in the worker pool for the first free lane.
    """

    def __init__(
        self,
        lead_s: float,
        seed_durations_s: dict[int, float] | None = None,
        smoothing: float = 0.2,
        lanes: int = 1,
    ):
        self.lead_s = lead_s
        self.smoothing = smoothing
        self.lanes = max(1, lanes)
        self._durations: dict[int, float] = {n: s for n, s in (seed_durations_s or {}).items() if n > 0 and s > 0}
        # Batches handed over and not finished, in order: token -> [size, predicted end or None while queued].
        self._pool: dict[int, list] = {}
        self._tokens = itertools.count()
        self._open = True
        # Requests held at the closed gate, oldest first: (when they came, the future they await).
        self._waiting: collections.deque[tuple[float, asyncio.Future]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    # --- prediction ---------------------------------------------------------------------

    def predict_s(self, batch_size: int) -> float:
        """Predicted forward seconds for a batch: linear between measured sizes, per image beyond."""
        sizes = sorted(self._durations)
        if not sizes:
            return 0.0
        i = bisect.bisect_left(sizes, batch_size)
        if i < len(sizes) and sizes[i] == batch_size:
            return self._durations[batch_size]
        if i == 0:
            return self._durations[sizes[0]]  # smaller than any measured: no cheaper than that
        if i == len(sizes):
            top = sizes[-1]
            return self._durations[top] * batch_size / top
        lo, hi = sizes[i - 1], sizes[i]
        frac = (batch_size - lo) / (hi - lo)
        return self._durations[lo] + frac * (self._durations[hi] - self._durations[lo])

    def observe(self, batch_size: int, seconds: float) -> None:
        old = self._durations.get(batch_size)
        self._durations[batch_size] = seconds if old is None else old + self.smoothing * (seconds - old)

    # --- the gate -----------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._pool

    @property
    def running(self) -> int:
        """Batches computing now (at most `lanes`)."""
        return sum(1 for _, end in self._pool.values() if end is not None)

    @property
    def waiting(self) -> int:
        """Requests held at the gate now."""
        return sum(1 for _, f in self._waiting if not f.done())

    async def wait_turn(self) -> None:
        """Return when a request should join the next batch; raises Shed if `shed` took it."""
        if self._open:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((time.monotonic(), future))
        await future

    def shed(self, at_most: int, window_s: float, now: float | None = None) -> int:
        """Refuse (Shed) up to `at_most` of the requests held at the gate that came within the last
        `window_s`, newest first; how many. The window bounds how late such a refusal is."""
        now = time.monotonic() if now is None else now
        shed = 0
        while self._waiting and shed < at_most and now - self._waiting[-1][0] <= window_s:
            _, future = self._waiting.pop()
            if not future.done():  # not cancelled by its caller's timeout
                future.set_exception(Shed())
                shed += 1
        return shed

    def _set_open(self, is_open: bool) -> None:
        self._open = is_open
        if is_open:
            waiting, self._waiting = self._waiting, collections.deque()
            for _, future in waiting:
                if not future.done():
                    future.set_result(None)

    def submitted(self, batch_size: int, now: float | None = None) -> int:
        """A batch was handed to the worker pool: it runs on a free lane, or after the first to end."""
        now = time.monotonic() if now is None else now
        token = next(self._tokens)
        self._pool[token] = [batch_size, None]
        self._start_queued(now)
        self._update(now)
        return token

    def finished(self, token: int, seconds: float | None, now: float | None = None) -> None:
        """The batch `token` is done (`seconds` of forward pass; None if it failed)."""
        now = time.monotonic() if now is None else now
        size, _ = self._pool.pop(token)
        if seconds is not None:
            self.observe(size, seconds)
        self._start_queued(now)
        self._update(now)

    def _start_queued(self, now: float) -> None:
        """Queued batches take the free lanes, oldest first; each is predicted to end one forward later."""
        free = self.lanes - self.running
        for entry in self._pool.values():
            if free <= 0:
                break
            if entry[1] is None:
                entry[1] = now + self.predict_s(entry[0])
                free -= 1

    def _update(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Open while a lane is free, or while every lane is busy, none is queued, and the first to
        # end does so within lead_s. A batch already waiting in the pool means the next must wait.
        if len(self._pool) < self.lanes:
            self._set_open(True)
            return
        if len(self._pool) > self.lanes:
            self._set_open(False)
            return
        opens_at = min(end for _, end in self._pool.values()) - self.lead_s
        if now >= opens_at:
            self._set_open(True)
            return
        self._set_open(False)
        self._timer = asyncio.get_running_loop().call_later(opens_at - now, self._update_now)

    def _update_now(self) -> None:
        self._timer = None
        self._update(time.monotonic())
