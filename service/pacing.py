"""When may the next batch form? Pacing that keeps the forward thread busy and the batches full.

The forward pass runs in one worker thread; the event loop decodes requests meanwhile. Two ways
to lose throughput:

- Tiny batches. `@serve.batch` forms the next batch as soon as the previous one is handed off:
  the first request to arrive mid-forward waits `batch_wait_timeout_s` and leaves with whatever
  came in that time, so a 200 ms forward of 32 images is followed by a forward of 2.
- Idle gaps. If the next batch forms only after the running one has finished, the forward thread
  waits while the event loop answers 32 requests and only then dispatches the next batch: on a
  2-core machine that left about a quarter of the CPU idle at 32 connections.

So requests wait at a gate (`wait_turn`) while the forward thread is busy for longer than
`lead_s`; the gate opens `lead_s` before the running batch is predicted to finish. Everything
that arrived meanwhile then forms the next batch at once, and that batch is already queued in the
worker pool (Ray's `max_concurrent_batches=2`) when the running one ends. Forward durations are
predicted per batch size from the warm-up, then from what was measured (an exponential average).

Pure asyncio: no Ray, no torch. All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time


class ForwardPacer:
    def __init__(self, lead_s: float, seed_durations_s: dict[int, float] | None = None, smoothing: float = 0.2):
        self.lead_s = lead_s
        self.smoothing = smoothing
        self._durations: dict[int, float] = {n: s for n, s in (seed_durations_s or {}).items() if n > 0 and s > 0}
        self._pool: collections.deque[int] = collections.deque()  # sizes of batches handed over, not finished
        self._busy_until = 0.0  # time.monotonic() when the pool is predicted to be free
        self._gate = asyncio.Event()
        self._gate.set()
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

    async def wait_turn(self) -> None:
        """Return when a request should join the next batch."""
        await self._gate.wait()

    def submitted(self, batch_size: int, now: float | None = None) -> None:
        """A batch was handed to the worker pool: it runs after the ones already there."""
        now = time.monotonic() if now is None else now
        self._pool.append(batch_size)
        self._busy_until = max(now, self._busy_until) + self.predict_s(batch_size)
        self._update(now)

    def finished(self, batch_size: int, seconds: float | None, now: float | None = None) -> None:
        """The oldest batch in the pool is done (`seconds` of forward pass; None if it failed)."""
        now = time.monotonic() if now is None else now
        if seconds is not None:
            self.observe(batch_size, seconds)
        self._pool.popleft()
        # Re-base the prediction on what just happened: the next batch in the pool starts now.
        self._busy_until = now + sum(self.predict_s(n) for n in self._pool)
        self._update(now)

    def _update(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Open when the pool is empty, or when only the running batch is left and it ends within
        # lead_s. A batch already waiting in the pool means the next one must wait its turn.
        opens_at = self._busy_until - self.lead_s
        if not self._pool or (len(self._pool) == 1 and now >= opens_at):
            self._gate.set()
            return
        self._gate.clear()
        if len(self._pool) == 1:
            self._timer = asyncio.get_running_loop().call_later(opens_at - now, self._update_now)

    def _update_now(self) -> None:
        self._timer = None
        self._update(time.monotonic())
