"""service/middleware.py without Ray: bearer auth, admission control, the queue deadline, and
server.preflight; plus the security checks that need no service (no pickle on the load path)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest

from model import DEFAULT_BUNDLE
from service.config import ServeConfig
from service.middleware import (
    AdmissionGate,
    AuthConfigError,
    BearerAuth,
    OverloadGuard,
    _Settings,
    configure,
    resolve_auth_token,
)

REPO = Path(__file__).resolve().parent.parent


def call(app, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Run one ASGI request through `app`; (status, headers, body)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# --- bearer auth ---------------------------------------------------------------------------------


def auth(token: str | None) -> BearerAuth:
    settings = _Settings()
    settings.token = token.encode() if token else None
    return BearerAuth(ok_app, settings)


def test_auth_off_passes_everything():
    assert call(auth(None), "/v1/classify")[0] == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}, {"Authorization": "Bearer"}],
)
def test_auth_refuses_missing_or_wrong_token(headers):
    status, hdrs, body = call(auth("s3cret"), "/v1/classify", headers)
    assert status == 401
    assert hdrs["www-authenticate"] == "Bearer" and hdrs["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert error["code"] == "unauthorized" and "s3cret" not in error["message"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_auth_accepts_the_token(scheme):
    assert call(auth("s3cret"), "/v1/feature-maps", {"Authorization": f"{scheme} s3cret"})[0] == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/openapi.json", "/redoc"])
def test_auth_leaves_health_and_docs_open(path):
    assert call(auth("s3cret"), path)[0] == 200


def test_auth_token_from_env_or_file(tmp_path):
    assert resolve_auth_token(ServeConfig()) is None
    cfg = ServeConfig.from_env(environ={"CONVSERVE_AUTH_TOKEN": "t0ken"})
    assert resolve_auth_token(cfg) == "t0ken"
    assert "t0ken" not in repr(cfg) and "t0ken" not in str(cfg.model_dump())
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert resolve_auth_token(ServeConfig.from_env(environ={"CONVSERVE_AUTH_TOKEN_FILE": str(token_file)})) == (
        "from-file"
    )
    with pytest.raises(AuthConfigError, match="cannot read"):
        resolve_auth_token(ServeConfig(auth_token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthConfigError, match="empty"):
        resolve_auth_token(ServeConfig(auth_token_file=str(tmp_path / "empty")))


# --- admission control -----------------------------------------------------------------------------


def test_gate_admits_a_number_of_batches_whatever_the_rate():
    gate = AdmissionGate(max_batch_size=32, batches=4, cap=240)
    assert gate.limit == 128
    assert all(gate.try_enter() for _ in range(128)) and not gate.try_enter()
    gate.leave()
    assert gate.in_flight == 127 and gate.try_enter()


def test_a_closed_loop_within_the_limit_is_never_refused():
    # 128 clients that each send again when answered: the in-flight count never passes 128, so
    # no client is refused (a rate-based limit refused them into a retry storm, issue 15).
    gate = AdmissionGate(max_batch_size=32, batches=4, cap=240)
    assert all(gate.try_enter() for _ in range(128))
    for _ in range(1000):
        gate.leave()
        assert gate.try_enter()


def test_once_refusing_the_gate_holds_fewer_until_a_second_passes_without_refusals():
    now = [0.0]
    gate = AdmissionGate(max_batch_size=32, batches=4, cap=240, overloaded_batches=2.5, clock=lambda: now[0])
    assert (gate.normal_limit, gate.overloaded_limit, gate.limit) == (128, 80, 128)
    assert all(gate.try_enter() for _ in range(128)) and not gate.try_enter()  # open loop past capacity
    assert gate.overloaded and gate.limit == 80
    for _ in range(48):  # completions: nothing is admitted until fewer than 80 are in
        gate.leave()
        now[0] += 0.01
        assert not gate.try_enter()
    gate.leave()
    assert gate.in_flight == 79 and gate.try_enter() and not gate.try_enter()
    now[0] += 0.99
    assert gate.overloaded  # refused 0.99 s ago
    now[0] += 0.02
    assert not gate.overloaded and gate.limit == 128 and gate.try_enter()
    # never above the normal limit, whatever is configured
    assert AdmissionGate(max_batch_size=32, batches=2, cap=240, overloaded_batches=3).overloaded_limit == 64


def test_an_overload_start_sheds_what_was_admitted_beyond_the_overloaded_limit():
    now = [0.0]
    gate = AdmissionGate(max_batch_size=32, batches=4, cap=240, overloaded_batches=2, clock=lambda: now[0])
    sheds = []
    gate.on_overload = sheds.append
    assert all(gate.try_enter() for _ in range(128))
    assert not gate.try_enter() and sheds == [64]  # the first refusal: 64 beyond the overloaded limit
    now[0] += 0.5
    assert not gate.try_enter() and sheds == [64]  # still the same overload: nothing more
    for _ in range(70):
        gate.leave()
    now[0] += 1.01  # a second without refusals: the next refusal starts a new overload
    assert gate.in_flight == 58 and not gate.overloaded
    assert all(gate.try_enter() for _ in range(70)) and not gate.try_enter()
    assert sheds == [64, 64]
    gate.in_flight, now[0] = 60, now[0] + 2
    gate.refused()  # HAProxy refused (its signal): nothing admitted beyond 64, nothing to shed
    assert sheds == [64, 64] and gate.overloaded


def test_the_overloaded_limit_has_a_floor_of_its_own():
    # 1.5 batches are 48 (the normal limit's floor of 64 is for closed loops, which never see it)
    assert AdmissionGate(max_batch_size=32, batches=4, cap=240, overloaded_batches=1.5).overloaded_limit == 48
    tiny = AdmissionGate(max_batch_size=1, batches=4, cap=240, overloaded_batches=2)
    assert (tiny.normal_limit, tiny.overloaded_limit) == (64, AdmissionGate.OVERLOADED_FLOOR)


def test_the_guard_acts_on_haproxys_signal_only_with_the_services_token():
    def guarded(signal: bytes | None) -> tuple[OverloadGuard, AdmissionGate, list[int]]:
        gate = AdmissionGate(max_batch_size=32, batches=4, cap=240, overloaded_batches=2)
        gate.in_flight = 100  # within the normal limit, beyond the overloaded one
        sheds: list[int] = []
        gate.on_overload = sheds.append
        settings = _Settings()
        settings.gate, settings.overload_signal = gate, signal
        return OverloadGuard(ok_app, settings), gate, sheds

    app, gate, sheds = guarded(b"t0ken")
    status, _, body = call(app, "/v1/classify", {"X-Convserve-Overload": "t0ken"})
    assert status == 503 and orjson.loads(body)["error"]["code"] == "overloaded"  # HAProxy refused it
    assert sheds == [36] and gate.overloaded and gate.in_flight == 100
    app, gate, sheds = guarded(b"t0ken")
    assert call(app, "/v1/classify", {"X-Convserve-Overload": "guess"})[0] == 200  # not HAProxy's
    assert sheds == [] and not gate.overloaded
    app, gate, sheds = guarded(None)  # no HAProxy gate in front: the header means nothing
    assert call(app, "/v1/classify", {"X-Convserve-Overload": "t0ken"})[0] == 200 and sheds == []


def test_gate_limit_follows_a_live_batch_size_change_and_is_capped():
    gate = AdmissionGate(max_batch_size=32, batches=2.5, cap=100)
    assert gate.limit == 80
    gate.resize(8)
    assert gate.limit == AdmissionGate.FLOOR == 64  # 20 would refuse an ordinary closed loop of 32
    gate.resize(64)
    assert gate.limit == 100  # capped below max_ongoing_requests
    assert AdmissionGate(max_batch_size=1, batches=4, cap=30).limit == 30  # the cap wins over the floor


def guard(gate: AdmissionGate | None) -> OverloadGuard:
    settings = _Settings()
    settings.gate = gate
    return OverloadGuard(ok_app, settings)


def test_guard_rejects_fast_with_json_503_and_retry_after():
    gate = AdmissionGate(max_batch_size=2, batches=1, cap=2)
    gate.in_flight = 2
    status, hdrs, body = call(guard(gate), "/v1/classify")
    assert status == 503 and hdrs["retry-after"] == "1" and hdrs["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    assert gate.in_flight == 2
    # health checks and model info are never shed
    assert call(guard(gate), "/healthz")[0] == 200 and call(guard(gate), "/v1/model")[0] == 200


def test_the_inference_protocol_is_guarded_and_refused_in_its_own_shape():
    gate = AdmissionGate(max_batch_size=2, batches=1, cap=2)
    gate.in_flight = 2
    for path in ("/v2/models/m/infer", "/v2/models/m/versions/1/infer"):
        status, hdrs, body = call(guard(gate), path)
        assert status == 503 and hdrs["retry-after"] == "1"
        assert isinstance(orjson.loads(body)["error"], str)  # {"error": "<message>"}, as the protocol says
    assert call(guard(gate), "/v2/models/m")[0] == 200 and call(guard(gate), "/v2/health/ready")[0] == 200
    status, _, body = call(auth("s3cret"), "/v2/models/m/infer")
    assert status == 401 and "bearer token" in orjson.loads(body)["error"]
    assert call(auth("s3cret"), "/v2/health/live")[0] == 200 and call(auth("s3cret"), "/v2")[0] == 401


def test_guard_counts_admitted_requests_in_and_out():
    gate = AdmissionGate(max_batch_size=2, batches=1, cap=2)
    assert call(guard(gate), "/v1/feature-maps")[0] == 200
    assert gate.in_flight == 0
    assert call(guard(None), "/v1/classify")[0] == 200  # admission_batches = 0: no guard


def test_configure_sizes_the_gate_from_the_config():
    from service import middleware

    configure(ServeConfig(admission_batches=3, admission_batches_overloaded=2.5), max_ongoing_requests=128)
    gate = middleware.SETTINGS.gate
    assert gate.limit == 96 and gate.cap == 120 and gate.overloaded_limit == 80
    middleware.resize_admission(64)  # reconfigure: the limit follows max_batch_size
    assert gate.limit == 120
    configure(ServeConfig(admission_batches=0))
    assert middleware.SETTINGS.gate is None and middleware.SETTINGS.token is None
    with pytest.raises(RuntimeError, match="max_ongoing_requests"):
        configure(ServeConfig())  # outside a replica: no deployment config to read, and no guessing
    configure(ServeConfig(), max_ongoing_requests=256)  # back to the defaults for whatever runs next


def test_preflight_passes_the_embedded_bundle():
    from service.server import preflight

    preflight(ServeConfig())


def test_preflight_refuses_missing_or_corrupted_bundles(tmp_path):
    from service.server import preflight

    with pytest.raises(SystemExit, match=r"cannot serve the model bundle .*bundle\.json: missing"):
        preflight(ServeConfig(bundle_path=str(tmp_path / "nope")))
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="SHA-256 mismatch"):
        preflight(ServeConfig(bundle_path=str(bundle)))
    with pytest.raises(SystemExit, match="auth_token_file"):
        preflight(ServeConfig(auth_token_file=str(tmp_path / "no-token")))


# --- no pickle on the load path ------------------------------------------------------------------------


def _unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for code (not comments or docstrings) that unpickles."""
    import io
    import tokenize

    tokens = [
        t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type in (tokenize.NAME, tokenize.OP)
    ]
    found = []
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string in ("pickle", "cloudpickle", "dill", "joblib"):
            found.append((tok.start[0], tok.string))
        nxt = [t.string for t in tokens[i + 1 : i + 3]]
        if tok.string == "torch" and nxt == [".", "load"]:
            found.append((tok.start[0], "torch.load"))
        if tok.string == "weights_only" and nxt == ["=", "False"]:
            found.append((tok.start[0], "weights_only=False"))
        if tok.string == "allow_pickle" and nxt == ["=", "True"]:
            found.append((tok.start[0], "allow_pickle=True"))
    return found


def test_unsafe_call_finder_finds_them():
    code = (
        "import pickle\nx = torch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n# pickle in a comment\n"
    )
    assert [what for _, what in _unsafe_calls(code)] == [
        "pickle",
        "torch.load",
        "weights_only=False",
        "allow_pickle=True",
    ]


def test_no_pickle_on_the_load_path():
    """Weights load through safetensors only: no torch.load, pickle or weights_only=False in model/ or service/."""
    found = []
    for path in sorted([*REPO.glob("model/**/*.py"), *REPO.glob("service/**/*.py")]):
        for number, what in _unsafe_calls(path.read_text()):
            found.append(f"{path.relative_to(REPO)}:{number}: {what}")
    assert not found, "unsafe deserialisation on the load path:\n" + "\n".join(found)
    assert list(REPO.glob("model/bundles/*/model.safetensors")), "the embedded bundle should be safetensors"
    assert not [p for p in REPO.glob("model/bundles/**/*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]


def test_refusals_are_counted_by_endpoint_with_unknown_paths_pooled():
    counted: list[tuple[str, int]] = []
    refusing_auth = auth("s3cret")
    refusing_auth.settings.on_refused = lambda endpoint, status: counted.append((endpoint, status))
    call(refusing_auth, "/v1/classify")
    call(refusing_auth, "/v1/no-such-route-1234")  # no label per path: clients cannot grow the metric
    call(refusing_auth, "/healthz")  # open, not refused, not counted
    full = AdmissionGate(max_batch_size=2, batches=1, cap=2)
    full.in_flight = 2
    shedding = guard(full)
    shedding.settings.on_refused = refusing_auth.settings.on_refused
    call(shedding, "/v1/feature-maps")
    assert counted == [("classify", 401), ("other", 401), ("feature-maps", 503)]


def test_a_haproxy_binary_path_that_cannot_run_stops_startup(tmp_path, monkeypatch):
    from service.server import haproxy_binary

    not_executable = tmp_path / "haproxy"
    not_executable.write_text("#!/bin/sh\n")
    for bad in (str(not_executable), str(tmp_path / "missing"), str(tmp_path)):
        monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", bad)
        with pytest.raises(SystemExit, match="not an executable file"):
            haproxy_binary()
    not_executable.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(not_executable))
    assert haproxy_binary() == str(not_executable)


def test_haproxy_in_flight_reads_the_stats_socket_and_says_when_it_cannot(tmp_path, monkeypatch):
    import socket
    import threading

    from service.server import HAProxyUnreachable, haproxy_in_flight, runtime_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(HAProxyUnreachable, match="no stats socket"):
        haproxy_in_flight(8123)
    node = Path(runtime_dir(8123)) / "node1"
    node.mkdir(parents=True)
    path = str(node / "admin.sock")
    stats = (
        "# pxname,svname,scur\nhttp-convserve,FRONTEND,9\nhttp-convserve,BACKEND,3\n"
        "grpc-convserve,BACKEND,1\nstats,BACKEND,5\n"
    )
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_once():
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(stats.encode())
        conn.close()

    thread = threading.Thread(target=answer_once)
    thread.start()
    assert haproxy_in_flight(8123) == 4  # the http- and grpc- backends' current sessions
    thread.join()
    server.close()  # the socket file stays, nobody answers: unknown, not zero
    with pytest.raises(HAProxyUnreachable, match="admin.sock"):
        haproxy_in_flight(8123)


@pytest.mark.parametrize(
    ("declared", "status", "code"), [("12x", 400, "invalid_header"), ("999999", 413, "body_too_large")]
)
def test_read_body_checks_the_declared_length_before_reading(declared, status, code):
    """HAProxy and uvicorn refuse a non-numeric Content-Length themselves; behind another server
    the replica still answers it with its own JSON error, and refuses an oversized body unread."""
    from starlette.requests import Request

    from service.errors import ApiError
    from service.inputs import read_body

    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/classify",
        "headers": [(b"content-length", declared.encode())],
    }
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(Request(scope, receive), max_bytes=1000))
    assert (e.value.status, e.value.code) == (status, code)
    assert not received  # refused from the header alone
