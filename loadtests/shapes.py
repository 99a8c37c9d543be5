"""Load shapes as plain functions of time: no locust import, so tests can check them directly.

`loadtests/locustfile.py` wraps the chosen one in a `LoadTestShape`. Each shape answers, for the
seconds since the test started, `(users, spawn_rate)`, or None when the test should end.

- steady: `users` from the start (spawned at `spawn_rate` per second) for `time_s`.
- step:   `steps` equal steps up to `users` (`users/steps`, `2*users/steps`, ...), each
          `time_s/steps` long.
- spike:  a baseline of a quarter of `users` (at least 1); in the middle fifth of the run
          (40%..60% of `time_s`) all `users`, spawned within a second; then the baseline again.
- none:   no shape; locust's own `-u/-r/--run-time` drive the test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SHAPES = ("none", "steady", "step", "spike")


@dataclass(frozen=True)
class Shape:
    users: int
    spawn_rate: float
    time_s: float

    def tick(self, t: float) -> tuple[int, float] | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Steady(Shape):
    def tick(self, t: float) -> tuple[int, float] | None:
        return (self.users, self.spawn_rate) if t < self.time_s else None


@dataclass(frozen=True)
class Step(Shape):
    steps: int = 4

    def tick(self, t: float) -> tuple[int, float] | None:
        if t >= self.time_s:
            return None
        k = min(int(t * self.steps / self.time_s), self.steps - 1)
        return max(1, math.ceil(self.users * (k + 1) / self.steps)), self.spawn_rate


@dataclass(frozen=True)
class Spike(Shape):
    spike_start: float = 0.4  # fractions of time_s
    spike_end: float = 0.6

    @property
    def baseline(self) -> int:
        return max(1, self.users // 4)

    def tick(self, t: float) -> tuple[int, float] | None:
        if t >= self.time_s:
            return None
        if self.spike_start * self.time_s <= t < self.spike_end * self.time_s:
            # Sudden: every spike user within about a second, however low the configured rate.
            return self.users, max(self.spawn_rate, float(self.users))
        # Back to the baseline just as fast; before the spike, the configured ramp.
        after = t >= self.spike_end * self.time_s
        return self.baseline, (max(self.spawn_rate, float(self.users)) if after else self.spawn_rate)


def make_shape(name: str, users: int, spawn_rate: float, time_s: float) -> Shape | None:
    """The named shape, or None for 'none'."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    if users < 1 or spawn_rate <= 0 or time_s <= 0:
        raise ValueError(f"need users >= 1, spawn_rate > 0 and time > 0 (got {users}, {spawn_rate}, {time_s})")
    if name == "none":
        return None
    return {"steady": Steady, "step": Step, "spike": Spike}[name](users, spawn_rate, time_s)


_TIMESPAN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_timespan(text: str) -> int:
    """Seconds in a locust-style time span: '30', '30s', '2m', '1h30m', '1m30s'."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    match = _TIMESPAN.match(text)
    if not text or not match:
        raise ValueError(f"invalid time span {text!r} (examples: 30s, 2m, 1h30m)")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return h * 3600 + m * 60 + s
