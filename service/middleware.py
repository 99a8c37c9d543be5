"""Two small ASGI middlewares in front of the routes: bearer-token auth and overload shedding.

Both answer on their own, with convserve's JSON error body, before a request body is read:

- `BearerAuth`: when a token is configured (`auth_token` / `auth_token_file`, or the
  CONVSERVE_AUTH_TOKEN / CONVSERVE_AUTH_TOKEN_FILE environment variables), every `/v1/*` request
  must carry `Authorization: Bearer <token>`; otherwise 401 `unauthorized` with
  `WWW-Authenticate: Bearer`. `/healthz`, `/readyz`, `/docs`, `/openapi.json` stay open. The
  same holds for the Open Inference Protocol's `/v2/*`, except its `/v2/health/*`.
- `OverloadGuard`: admission control for the inference routes. A request is admitted while fewer
  than `admission_batches x max_batch_size` requests are in the replica (4 x 32 = 128 by default;
  at least 64 whatever the batch size), so an admitted request waits about `admission_batches`
  batch durations at most, whatever the device. Beyond that it is answered at once with 503
  `overloaded` and `Retry-After: 1`, so that past capacity latency stays bounded and refusals are
  fast, instead of every request waiting in a queue that only grows. The count stays a little
  below the deployment's `max_ongoing_requests` (240 of 256), so that requests do not wait in
  Ray's own queue, where this guard cannot see them.

On `/v2/*` their error bodies take the protocol's shape, `{"error": "<message>"}`.

Both are installed on the FastAPI app at import (`install(api)`) and configured from the
replica's ServeConfig in `ConvServe.__init__` (`configure(config)`); unconfigured, they pass
everything through.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from service.config import ServeConfig
from service.fast_classify import FastClassify, send_json

OVERLOADED_RETRY_AFTER_S = 1
# HAProxy's gate (service/haproxy_gate.py) sends the first refusal of an overload on to the replica
# with this header, so that the replica starts refusing and shedding at the same moment.
OVERLOAD_SIGNAL_HEADER = b"x-convserve-overload"
GUARDED_PATHS = ("/v1/classify", "/v1/feature-maps", "/v1/explain")
PROTECTED_PREFIX = "/v1/"
COUNTED_ENDPOINTS = {
    "/v1/classify": "classify",
    "/v1/feature-maps": "feature-maps",
    "/v1/explain": "explain",
    "/v1/kernels": "kernels",
    "/v1/model": "model",
}
V2_PREFIX = "/v2"


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(path: str, code: str, message: str) -> dict:
    """convserve's `{"error": {"code", "message"}}`, or on /v2/* the Open Inference Protocol's
    `{"error": "<message>"}`: one rule for the middlewares and the app's error handlers."""
    return {"error": message if is_v2(path) else {"code": code, "message": message}}


def is_protected(path: str) -> bool:
    """/v1/*, and /v2 except the protocol's health routes (probes carry no token)."""
    return path.startswith(PROTECTED_PREFIX) or (is_v2(path) and not path.startswith("/v2/health/"))


def is_guarded(path: str) -> bool:
    """The routes that run the model, and so are subject to admission control."""
    return path in GUARDED_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def endpoint_of(path: str) -> str:
    """The `endpoint` label of a request: a fixed set, so that clients cannot grow the metric."""
    if path in COUNTED_ENDPOINTS:
        return COUNTED_ENDPOINTS[path]
    if is_v2(path):
        if path.endswith("/infer"):
            return "v2/infer"
        return "v2/" + ("stats" if path.endswith("/stats") else "ready" if path.endswith("/ready") else "metadata")
    return "other"


class AuthConfigError(ValueError):
    """auth_token_file names a file that cannot be read, or holds no token."""


def resolve_auth_token(config: ServeConfig) -> str | None:
    """The configured bearer token: `auth_token`, else the first line of `auth_token_file`, else None."""
    if config.auth_token is not None and config.auth_token.get_secret_value():
        return config.auth_token.get_secret_value()
    if config.auth_token_file:
        try:
            token = Path(config.auth_token_file).read_text().strip()
        except OSError as e:
            raise AuthConfigError(f"auth_token_file {config.auth_token_file}: cannot read ({e.strerror})") from None
        if not token:
            raise AuthConfigError(f"auth_token_file {config.auth_token_file}: empty")
        return token
    return None


# --- admission control ------------------------------------------------------------------------


class AdmissionGate:
    """Admit while fewer than `limit` requests are in the replica. Not thread-safe: one event loop.

    The limit is counted in batches (`batches x max_batch_size`, at most `cap`), so the wait a
    request is admitted to is about `batches` batch durations, on a CPU (a batch of 32 in about
    200 ms) and on a GPU (a few ms) alike, whatever the rate the replica has reached. It does not
    follow the measured completion rate: a rate-based limit fell when refusals took CPU from the
    forward pass, which refused more (the retry storm of issue 15). A closed loop of N clients
    holds at most N requests, so with N <= the limit nobody is refused.

    Overloaded: once it has refused a request, and until it has refused none for `HOLD_S`, the
    limit is `overloaded_batches` batches instead. Under sustained overload the replica is full
    whatever the limit, and every admitted request waits for all the requests ahead of it, so a
    lower limit is a shorter wait at the same goodput, as long as the next batch is ready when a
    lane frees (at overload, requests arrive faster than they finish: it is). A closed loop within
    the normal limit is never refused, so it never sees the lower one: 4 batches leave room for
    bench's 128 connections, while open-loop overload waits for 2 (docs/reliability.md: 1.5
    waited less but served less at 8x). A refusal that starts an overload also sheds what was
    admitted beyond the overloaded limit just before (`refused`, `on_overload`).
    """

    # Whatever the batch size, this many requests are admitted (if the cap allows): with tiny
    # batches (max_batch_size 1, batching off) a limit of a few batches refused an ordinary
    # closed loop of 32 clients into a retry storm (22,246 refusals in 10 s).
    FLOOR = 64
    # The overloaded limit only has to keep the lanes fed (a batch on each, the next one ready); it
    # needs no room for closed loops, which never see it. With tiny batches, this many still come.
    OVERLOADED_FLOOR = 16
    HOLD_S = 1.0  # overloaded for this long after the last refusal

    def __init__(
        self,
        max_batch_size: int,
        batches: float,
        cap: int,
        overloaded_batches: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cap = max(1, cap)
        self.batches = batches
        self.overloaded_batches = batches if overloaded_batches is None else min(batches, overloaded_batches)
        self.max_batch_size = max_batch_size
        self.in_flight = 0
        self.clock = clock
        self._refused_at = -math.inf
        # Called with a count when an overload starts (`refused`); the replica sheds that many of
        # its newest requests not yet in a batch (service/pacing.py, ForwardPacer.shed).
        self.on_overload: Callable[[int], object] | None = None

    def _limit(self, batches: float, floor: int) -> int:
        return max(1, min(self.cap, max(floor, math.ceil(batches * self.max_batch_size))))

    @property
    def overloaded(self) -> bool:
        return self.clock() - self._refused_at < self.HOLD_S

    @property
    def normal_limit(self) -> int:
        return self._limit(self.batches, self.FLOOR)

    @property
    def overloaded_limit(self) -> int:
        return min(self.normal_limit, self._limit(self.overloaded_batches, self.OVERLOADED_FLOOR))

    @property
    def limit(self) -> int:
        """The limit now: the overloaded one while refusing."""
        return self.overloaded_limit if self.overloaded else self.normal_limit

    def resize(self, max_batch_size: int) -> None:
        """A new max_batch_size (live reconfigure): the limit follows it."""
        self.max_batch_size = max_batch_size

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            self.refused()
            return False
        self.in_flight += 1
        return True

    def refused(self) -> None:
        """Count a refusal, this gate's own or HAProxy's in front of it. One that starts an overload
        (none in the last HOLD_S) calls `on_overload` with the requests admitted beyond the
        overloaded limit: under the normal limit just before, they would wait for up to
        `batches` batches ahead of them, where every later one waits for `overloaded_batches`."""
        now = self.clock()
        starts = now - self._refused_at >= self.HOLD_S
        self._refused_at = now
        excess = self.in_flight - self.overloaded_limit
        if starts and excess > 0 and self.on_overload is not None:
            self.on_overload(excess)

    def leave(self) -> None:
        self.in_flight -= 1


class _Settings:
    token: bytes | None = None
    gate: AdmissionGate | None = None
    # The value of HAProxy's OVERLOAD_SIGNAL_HEADER (service/haproxy_gate.py) when its gate is in
    # front of this replica; None: the header means nothing (a client could send it).
    overload_signal: bytes | None = None
    # Called with (endpoint, status) for a request answered before it reached its route, so that
    # `requests_total` counts refusals too (set by the deployment to its metrics).
    on_refused: Callable[[str, int], None] | None = None


def count_refusals_with(counter: Callable[[str, int], None] | None) -> None:
    """Where refusals are counted (the replica's metrics). A function, not SETTINGS itself, for the
    deployment class: Ray ships that class by value, with a copy of whatever object it names."""
    SETTINGS.on_refused = counter


def count_refused(path: str, status: int, settings: _Settings | None = None) -> None:
    """Count a /v1/ request answered by a middleware or a validation handler, not by its route.

    Unknown paths count as endpoint "other": a label per path would let clients grow the metric
    without bound.
    """
    counter = (settings or SETTINGS).on_refused
    if counter is not None and is_protected(path):
        counter(endpoint_of(path), status)


SETTINGS = _Settings()


def configure(config: ServeConfig, max_ongoing_requests: int | None = None) -> None:
    """Apply the replica's settings (call once, in the deployment's constructor)."""
    token = resolve_auth_token(config)
    SETTINGS.token = token.encode() if token else None
    signal = config.overload_signal_token
    SETTINGS.overload_signal = signal.get_secret_value().encode() if signal is not None else None
    if not config.admission_batches:
        SETTINGS.gate = None
        return
    SETTINGS.gate = gate_for(config, max_ongoing_requests or replica_max_ongoing_requests())


def shed_with(shed: Callable[[int], int] | None) -> None:
    """What sheds the replica's newest waiting requests when an overload starts (AdmissionGate.refused):
    the fused replica's batcher (ForwardPacer.shed). Call after `configure`. A function, not
    SETTINGS itself, as for `count_refusals_with`."""
    if SETTINGS.gate is not None:
        SETTINGS.gate.on_overload = shed


def _overload_signalled(scope, signal: bytes) -> bool:
    for key, value in scope.get("headers", ()):
        if key == OVERLOAD_SIGNAL_HEADER:
            return hmac.compare_digest(value, signal)
    return False


def gate_for(config: ServeConfig, max_ongoing_requests: int) -> AdmissionGate:
    """A replica's gate, from its settings and its deployment's max_ongoing_requests."""
    return AdmissionGate(
        max_batch_size=config.batching.max_batch_size,
        batches=config.admission_batches,
        overloaded_batches=config.admission_batches_overloaded,
        # Below max_ongoing_requests: at it, requests would wait in Ray's queue, unseen by this guard,
        # since a request holds a Ray slot for a moment before the guard answers it (measured: at
        # cap = max_ongoing_requests, 4x overload filled Ray's queue and accepted p99 rose 4-fold).
        cap=max(1, max_ongoing_requests - max(4, max_ongoing_requests // 16)),
    )


def resize_admission(max_batch_size: int) -> None:
    """A live change of max_batch_size (the deployment's reconfigure): the admission limit follows."""
    if SETTINGS.gate is not None:
        SETTINGS.gate.resize(max_batch_size)


def admission_gate() -> AdmissionGate | None:
    """The replica's gate, for front ends that are no ASGI request (Ray Serve's gRPC calls)."""
    return SETTINGS.gate


def grpc_token() -> bytes | None:
    """The bearer token gRPC calls must carry in their `authorization` metadata (None: auth off)."""
    return SETTINGS.token


def admission_limit() -> int | None:
    """Requests admitted into this replica at once (None: admission control off)."""
    return SETTINGS.gate.normal_limit if SETTINGS.gate is not None else None


def admission_limit_overloaded() -> int | None:
    """The same while the replica is refusing (AdmissionGate, overloaded)."""
    return SETTINGS.gate.overloaded_limit if SETTINGS.gate is not None else None


def replica_max_ongoing_requests() -> int:
    """The deployment's `max_ongoing_requests`, read from the running replica's config.

    Ray exposes it only through a private field; if a Ray upgrade moves it, say so at start
    rather than guess a cap (this used to fall back to 128 in silence)."""
    from ray import serve

    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception as e:  # noqa: BLE001 - outside a replica, or a Ray without this private field
        raise RuntimeError(
            "admission control needs the deployment's max_ongoing_requests, and this Ray does not expose it "
            f"({type(e).__name__}: {e}); set admission_batches: 0 to run without admission control"
        ) from None


# --- the ASGI middlewares ---------------------------------------------------------------------


async def _send_error(scope, send, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    await send_json(send, status, orjson.dumps(error_body(scope["path"], code, message)), headers)


def _bearer(scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else None
    return None


class BearerAuth:
    def __init__(self, app, settings: _Settings = SETTINGS):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        token = self.settings.token
        if token is None or scope["type"] != "http" or not is_protected(scope["path"]):
            return await self.app(scope, receive, send)
        given = _bearer(scope)
        if given is None or not hmac.compare_digest(given, token):
            message = "missing bearer token" if given is None else "invalid bearer token"
            count_refused(scope["path"], 401, self.settings)
            return await _send_error(
                scope,
                send,
                401,
                "unauthorized",
                f"{message}: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


class OverloadGuard:
    def __init__(self, app, settings: _Settings = SETTINGS):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        gate = self.settings.gate
        if gate is None or scope["type"] != "http" or not is_guarded(scope["path"]):
            return await self.app(scope, receive, send)
        signal = self.settings.overload_signal
        if signal is not None and _overload_signalled(scope, signal):
            gate.refused()  # HAProxy's gate began refusing (its first refusal, sent on marked): so does this one
        if not gate.try_enter():
            count_refused(scope["path"], 503, self.settings)
            return await _send_error(
                scope,
                send,
                503,
                "overloaded",
                f"the service is at capacity ({gate.in_flight} requests in progress); retry after "
                f"{OVERLOADED_RETRY_AFTER_S} s",
                {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            )
        try:
            return await self.app(scope, receive, send)
        finally:
            gate.leave()


def install(api) -> None:
    """Add both middlewares to a FastAPI/Starlette app; auth runs first (outermost). Innermost, behind
    both, the raw-body classify fast path (service/fast_classify.py)."""
    api.add_middleware(FastClassify)
    api.add_middleware(OverloadGuard)
    api.add_middleware(BearerAuth)
