"""Integration: reliability and security of the real `python -m service` (issue 6, docs/reliability.md).

One service per module, started with a bearer token (CONVSERVE_AUTH_TOKEN), so every request
here also exercises the auth middleware. Non-slow tests: hostile and odd inputs over HTTP,
decompression bombs, 10,000 multipart parts, auth, error bodies without traces, Schemathesis
against /openapi.json, listening sockets, start-up preflight, and last (it stops the module's
service) graceful shutdown with requests in flight.

Slow tests (`make test-all`, or `pytest -m slow tests/test_reliability.py`), each on a service of
its own: overload at 2x, 4x and 8x capacity, a soak (SOAK_SECONDS, default 20; 600 for the
10-minute run), and the replica actor killed under load. Their figures are printed and written
to runs/reliability/<test>.json.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from loadtests import cpu
from model import DEFAULT_BUNDLE
from service.haproxy_gate import MESSAGE as HAPROXY_MESSAGE
from service.server import haproxy_refusals
from tests.images import bad_inputs, encode, gif_bomb, odd_but_valid, png_bomb, real_jpeg
from tests.loadgen import closed_loop, open_loop, percentile, summarize
from tests.server_process import REPO_ROOT, ServiceProcess, free_port

pytestmark = pytest.mark.integration

TOKEN = "reliability-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "cifar10-val-sample"
RESULTS = REPO_ROOT / "runs" / "reliability"
REPLICA_PROCESS = "ray::ServeReplica:convserve:ConvServe"
LEAKS = ("Traceback", 'File "', str(REPO_ROOT), "/work/", "site-packages")


@pytest.fixture(scope="module")
def service():
    svc = ServiceProcess(env={"CONVSERVE_AUTH_TOKEN": TOKEN}).start()
    yield svc
    svc.stop()


def classify(svc, body: bytes, content_type: str = "image/jpeg", headers=None, **params) -> requests.Response:
    headers = {"Content-Type": content_type, **AUTH, **(headers or {})}
    return requests.post(svc.base + "/v1/classify", data=body, headers=headers, params=params, timeout=60)


def assert_error(resp: requests.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert not [leak for leak in LEAKS if leak in resp.text], resp.text
    if code:
        assert body["error"]["code"] == code, body
    return body


def assert_healthy(svc) -> None:
    assert requests.get(svc.base + "/readyz", timeout=30).status_code == 200
    resp = classify(svc, real_jpeg(), top_k=1)
    assert resp.status_code == 200, resp.text


def fixture_jpegs() -> list[bytes]:
    return [p.read_bytes() for p in sorted(FIXTURES.glob("*/*.jpg"))]


def record(name: str, figures: dict) -> None:
    """Print the measured figures (shown with -s or on failure) and keep them under runs/reliability/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {"test": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": os.getloadavg(), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {json.dumps(figures)}")


# --- bad input over HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_bad_input_is_json_400(service, name):
    assert_error(classify(service, bad_inputs()[name]), 400, "invalid_image")


def test_service_healthy_after_bad_inputs(service):
    assert_healthy(service)


@pytest.mark.parametrize("bomb", [png_bomb(20000, 20000), gif_bomb(20000, 20000)], ids=["png", "gif"])
def test_decompression_bomb_is_413_quickly(service, bomb):
    started = time.monotonic()
    body = assert_error(classify(service, bomb, "application/octet-stream"), 413, "image_too_large")
    assert time.monotonic() - started < 3.0  # decoding 400 M pixels would take many seconds and 1.2 GB
    assert "20000x20000" in body["error"]["message"]


@pytest.mark.parametrize("name", sorted(odd_but_valid()))
def test_odd_but_valid_images_are_classified(service, name):
    resp = classify(service, odd_but_valid()[name], "application/octet-stream", top_k=3)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["predictions"]) == 3


def _multipart(parts: list[bytes], boundary: str = "convserve-boundary") -> tuple[bytes, str]:
    chunks = []
    for i, data in enumerate(parts):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
        chunks += [head.encode(), b"Content-Type: image/jpeg\r\n\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def test_ten_thousand_multipart_parts_is_413_and_harmless(service):
    body, content_type = _multipart([b"x"] * 10_000)
    assert len(body) < 8 * 1024 * 1024  # under the body limit: the part count is what is refused
    started = time.monotonic()
    resp = classify(service, body, content_type)
    elapsed = time.monotonic() - started
    assert_error(resp, 413, "too_many_images")
    assert elapsed < 5.0
    # meanwhile and afterwards, ordinary requests are served
    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(classify, service, body, content_type) for _ in range(3)]
        assert classify(service, real_jpeg()).status_code == 200
        assert all(f.result().status_code == 413 for f in floods)
    assert_healthy(service)


def test_multi_image_request_with_bad_images(service):
    good = fixture_jpegs()[:3]
    images = [good[0], png_bomb(), good[1], real_jpeg()[:300], good[2]]
    payload = {"images": [base64.b64encode(i).decode() for i in images], "top_k": 2}
    resp = requests.post(service.base + "/v1/classify", json=payload, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [("predictions" in r) for r in results] == [True, False, True, False, True]
    assert results[1]["error"]["code"] == "image_too_large"
    assert results[3]["error"]["code"] == "invalid_image"
    assert not [leak for leak in LEAKS if leak in resp.text]
    # the same through multipart
    body, content_type = _multipart(images)
    results = classify(service, body, content_type).json()["results"]
    assert [("predictions" in r) for r in results] == [True, False, True, False, True]


# --- auth -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}])
def test_v1_needs_the_bearer_token(service, headers):
    for method, path in [("POST", "/v1/classify"), ("POST", "/v1/feature-maps"), ("GET", "/v1/model")]:
        resp = requests.request(
            method, service.base + path, data=real_jpeg(), headers={"Content-Type": "image/jpeg", **headers}, timeout=30
        )
        assert_error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"


def test_health_and_docs_stay_open(service):
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert requests.get(service.base + path, timeout=30).status_code == 200, path
    assert requests.get(service.base + "/v1/model", headers=AUTH, timeout=30).status_code == 200


def test_the_inference_protocol_needs_the_token_too(service):
    """Open Inference Protocol, HTTP and gRPC: the same bearer token as /v1/*; health stays open."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    model = "convservenet-cifar10"
    assert requests.get(service.base + "/v2/health/ready", timeout=10).status_code == 200
    for resp in (
        requests.get(service.base + f"/v2/models/{model}", timeout=10),
        requests.post(service.base + f"/v2/models/{model}/infer", data=b"{}", timeout=10),
    ):
        assert resp.status_code == 401 and isinstance(resp.json()["error"], str), resp.text  # the protocol's shape
    x = httpclient.InferInput("image", [1], "BYTES")
    x.set_data_from_numpy(np.array([real_jpeg()], dtype=np.object_))
    http = httpclient.InferenceServerClient(service.base.removeprefix("http://"))
    # a copy: tritonclient adds its own headers to the dict it is given
    assert http.infer(model, [x], headers=dict(AUTH)).as_numpy("probabilities").shape == (1, 10)

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{service.grpc_port}")
    gx = grpcclient.InferInput("image", [1], "BYTES")
    gx.set_data_from_numpy(np.array([real_jpeg()], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        g.infer(model, [gx])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        g.infer(model, [gx], headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    assert g.infer(model, [gx], headers={"authorization": f"Bearer {TOKEN}"}).as_numpy("probabilities").shape == (1, 10)
    assert g.is_server_live()  # health stays open


# --- error bodies ------------------------------------------------------------------------------------------


def test_error_bodies_carry_no_traces_or_paths(service):
    jpeg = real_jpeg()
    cases = [
        (classify(service, jpeg, "text/plain"), 415),
        (classify(service, b"{not json", "application/json"), 422),
        (classify(service, b'{"images": [1, {"a": []}], "top_k": "x"}', "application/json"), 400),
        (classify(service, b"--xx\r\ngarbage", "multipart/form-data; boundary=xx"), 400),
        (classify(service, b"--xx\r\ngarbage", "multipart/form-data"), 422),
        (classify(service, jpeg, top_k="1e9"), 400),
        (requests.get(service.base + "/v1/classify", headers=AUTH, timeout=30), 405),
        (requests.get(service.base + "/no/such/route", timeout=30), 404),
        (requests.post(service.base + "/v1/feature-maps?layer=../../etc", data=jpeg, headers=AUTH, timeout=30), 404),
        (requests.post(service.base + "/v1/feature-maps?format=npy", data=jpeg, headers=AUTH, timeout=30), 400),
    ]
    for resp, status in cases:
        assert resp.status_code == status, (resp.status_code, resp.text[:200])
        assert not [leak for leak in LEAKS if leak in resp.text], resp.text
        # every error body is JSON by contract, whatever the content type or status
        assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] and body["error"]["message"], body


# --- schemathesis: no 5xx for anything the OpenAPI schema allows ----------------------------------------------


def test_schemathesis_finds_no_server_errors(service, tmp_path):
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis not installed (pip install -e '.[dev]')")
    started = time.monotonic()
    run = subprocess.run(
        [str(st), "run", service.base + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "60"]
        + ["--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30", "--seed", "6"]
        + ["--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    cases = re.search(r"(\d+) generated", run.stdout)
    record("schemathesis", {"seconds": round(elapsed, 1), "test_cases": int(cases.group(1)) if cases else None})
    assert elapsed < 60


# --- what listens where --------------------------------------------------------------------------------------


# Ray cannot bind these to loopback (docs/reliability.md): HAProxy's stats and Prometheus frontends
# (Ray's HAProxy config template writes `bind *:PORT`), and each replica's inter-deployment gRPC
# server (ray/serve/_private/replica.py binds "[::]:0").
def haproxy_all_interfaces(svc) -> set[int]:
    """HAProxy's stats and metrics ports: they follow the service's port (service/server.py)."""
    return {svc.port + 404, svc.port + 1101}


def listening(svc) -> list[tuple[str, int, str]]:
    pids = {p.pid: p for p in svc.descendants()}
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = " ".join(pids[conn.pid].cmdline())
            except psutil.Error:
                continue
            found.append((conn.laddr.ip, conn.laddr.port, name))
    return found


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


def test_loopback_host_keeps_ray_off_other_interfaces(service):
    sockets = listening(service)
    assert any(port == service.port and is_loopback(ip) for ip, port, _ in sockets), sockets
    metrics = [ip for ip, port, _ in sockets if port == service.metrics_port]
    assert metrics and all(is_loopback(ip) for ip in metrics), sockets
    exposed = [(ip, port, name) for ip, port, name in sockets if not is_loopback(ip)]
    # Ray's fallback proxy binds its gRPC server on all interfaces whatever the host
    # (ray/serve/_private/grpc_util.py: "[::]:{port}"); convserve puts it at port + 1500
    # (service/server.py). README "Reliability and security" says so; --grpc-port 0 turns gRPC off.
    fallback_grpc = service.port + 1500
    # Classify on the full command line: a long checkout path pushes "haproxy" far to the right.
    unexplained = [
        (ip, port, name[:200])
        for ip, port, name in exposed
        if not ("haproxy" in name and port in haproxy_all_interfaces(service))
        and not (name.startswith(REPLICA_PROCESS) and ip == "::")
        and not (name.startswith("ray::ProxyActor") and port == fallback_grpc)
    ]
    assert not unexplained, f"listening on all interfaces: {unexplained}"
    replicas = [name for _, _, name in exposed if name.startswith(REPLICA_PROCESS)]
    # per replica: its inter-deployment gRPC port and, with gRPC on, its own gRPC server behind
    # HAProxy (direct ingress; Ray binds both on "[::]"), nothing more
    assert len(replicas) <= 2
    record("listening_sockets", {"total": len(sockets), "all_interfaces": exposed})


# --- start-up preflight ---------------------------------------------------------------------------------------


def corrupted_bundle(tmp_path: Path) -> Path:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return bundle


@pytest.mark.parametrize("kind", ["missing", "flipped_byte"])
def test_bad_bundle_stops_startup_with_a_clear_message(tmp_path, kind):
    bundle = tmp_path / "nonexistent" if kind == "missing" else corrupted_bundle(tmp_path)
    expected = "bundle.json: missing" if kind == "missing" else "SHA-256 mismatch"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(bundle), "--port", str(free_port())]
        + ["--metrics-port", str(free_port())],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert f"cannot serve the model bundle {bundle}" in output and expected in output, output
    assert "Traceback" not in output
    assert "ray address" not in output  # it stopped before starting Ray
    assert time.monotonic() - started < 120


# --- graceful shutdown: the last test of the module, it stops the module's service --------------------------


def big_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    return encode(small.resize((640, 480), Image.BILINEAR), "JPEG", quality=90)


def test_a_burst_past_the_admission_limit_is_refused_fast_with_json_503(service):
    """The short variant of the slow overload test (seconds): 300 requests at once against an
    admission limit of 128 in the replica. The excess is refused at once with our JSON 503 and
    Retry-After; the rest are served; nothing else happens, and the service serves right after."""
    url = service.base + "/v1/classify?top_k=1"
    headers = {"Content-Type": "image/jpeg", **AUTH}
    by_haproxy = "ingress haproxy" in service.log_text()
    before = haproxy_refusals(service.port) if by_haproxy else 0
    shed_before = exported_total(service, "ray_convserve_shed_total", at_least=0, timeout_s=0)
    samples = open_loop(url, fixture_jpegs(), headers, rate=3000, seconds=0.1, timeout_s=30)
    counts = statuses(samples)
    refused = [s for s in samples if s.status == 503]
    figures = {"statuses": dict(counts), "p99_refused_ms": round(percentile([s.latency_s for s in refused], 99) * 1000)}
    by_whom = Counter(refused_by(s.body) for s in refused)
    figures["refused_by"] = dict(by_whom)
    record("admission_burst", figures)
    assert set(counts) == {200, 503}, figures
    # the limit's worth is admitted and answered, less those shed as the overload began: admitted
    # beyond the overloaded limit (64) and still waiting for a batch (service/middleware.py)
    assert counts[200] >= 64 and by_whom["shed"] <= 128 - 64, figures
    assert all(json.loads(s.body)["error"]["code"] == "overloaded" for s in refused), figures
    assert max(s.latency_s for s in refused) < max(s.latency_s for s in samples if s.status == 200), figures
    if by_haproxy:
        # HAProxy answered most refusals itself (service/haproxy_gate.py), and counted each; not its
        # first, which it sent on to the replica marked, nor the few a replica's own count (a
        # moment behind or ahead of HAProxy's) refused, nor those the replica shed
        total = haproxy_refusals(service.port)
        assert total - before == by_whom["haproxy"] > by_whom["replica"] + by_whom["shed"], figures
        # and they are exported, though kept out of HAProxy's request log (service/server.py)
        exported = exported_total(service, "ray_convserve_haproxy_refusals_total", at_least=total, timeout_s=40)
        assert exported == total, (exported, total)
    if by_whom["shed"]:  # each shed request is counted (the replica's metrics)
        shed = exported_total(service, "ray_convserve_shed_total", at_least=shed_before + by_whom["shed"], timeout_s=40)
        assert shed - shed_before == by_whom["shed"], (shed, shed_before, figures)
    assert_healthy_with_auth(service)


def refused_by(body: bytes) -> str:
    """Who refused a request, by its 503's message: HAProxy's gate, a replica's gate, or a replica
    shedding a request admitted just before an overload began."""
    message = json.loads(body)["error"]["message"]
    if message == HAPROXY_MESSAGE:
        return "haproxy"
    return "shed" if "while this request waited for a batch" in message else "replica"


def exported_total(service, name: str, at_least: float, timeout_s: float) -> float:
    """The counter `name` as scraped (summed over its series), once it reaches `at_least` (the
    driver polls HAProxy every 5 s, a replica hands its counts over every 0.5 s; Ray exports a few
    seconds later) or when `timeout_s` has passed (scraped at least once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
        value = sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M))
        if value >= at_least or time.monotonic() >= deadline:
            return value
        time.sleep(1)


# Short variants of the slow tests below, on the shared service: seconds each, so that CI runs them.


def rays_408(svc) -> tuple[requests.Response, float]:
    """A request of 64 photos with the client's own x-request-timeout-seconds of 0.3 s (Ray honours
    it): the replica's deadline (request_timeout_s less 1 s) is far off, so Ray answers, in text."""
    body, content_type = _multipart([big_jpeg(i) for i in range(64)])
    started = time.monotonic()
    slow = classify(svc, body, content_type, headers={"x-request-timeout-seconds": "0.3"})
    took_s = time.monotonic() - started
    assert slow.status_code == 408, slow.text
    assert slow.headers["content-type"].startswith("text/plain")
    return slow, took_s


def test_a_client_timeout_header_gets_rays_text_408_quickly(service):
    """Short variant of test_ray_timeout_and_backpressure_answers_are_text: a client's own
    x-request-timeout-seconds, shorter than the work, is cut by Ray with its text 408."""
    slow, took_s = rays_408(service)
    assert took_s < 5, took_s
    assert_healthy_with_auth(service)


def test_a_short_soak_answers_every_request(service):
    """Short variant of test_soak_no_errors_and_flat_memory: 6 s, 8 closed-loop clients."""
    headers = {"Content-Type": "image/jpeg", **AUTH}
    samples, _ = closed_loop(service.base + "/v1/classify?top_k=3", fixture_jpegs(), headers, 8, seconds=6)
    assert len(samples) > 8 and set(statuses(samples)) == {200}, statuses(samples)
    assert_healthy_with_auth(service)


def serve_replicas() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::convserve#ConvServe#")
    ]


def test_a_killed_replica_is_replaced_and_nothing_hangs(service):
    """Short variant of test_replica_killed_under_load_recovers, one client: the requests sent while
    no replica is up are answered (an error, not a hang), and a new replica serves within 90 s."""
    import ray

    address = re.search(r"convserve: ray address (\S+)", service.log_text()).group(1)
    ray.init(address=address, logging_level="ERROR")  # RAY_AUTH_MODE etc. from conftest.py
    try:
        (name,) = serve_replicas()
        replica = ray.get_actor(name, namespace="serve")
        ray.kill(replica, no_restart=False)
        with pytest.raises(ray.exceptions.RayActorError):  # ray.kill returns before the actor is gone
            for _ in range(100):
                ray.get(replica.__ray_ready__.remote(), timeout=10)
                time.sleep(0.1)
        killed_at = time.monotonic()
        answers: list[tuple[float, float, int | str]] = []
        while time.monotonic() - killed_at < 90:
            sent = time.monotonic()
            try:
                status = classify(service, real_jpeg(), top_k=1).status_code
            except requests.RequestException as e:
                status = type(e).__name__
            answers.append((round(sent - killed_at, 2), round(time.monotonic() - sent, 2), status))
            if status == 200:
                break
            time.sleep(0.2)
        after = serve_replicas()
    finally:
        ray.shutdown()
    record("replica_killed_short", {"answers": answers[:5] + answers[-5:], "tries": len(answers), "after": after})
    assert answers[-1][2] == 200, answers[-5:]
    assert after and after != [name], (name, after)
    assert max(took for _, took, _ in answers) < 35, answers  # answered, never hung
    assert_healthy_with_auth(service)


def test_sigterm_lets_in_flight_requests_finish(service):
    body, content_type = _multipart([big_jpeg(i) for i in range(64)])
    assert len(body) < 8 * 1024 * 1024
    started = time.monotonic()
    assert classify(service, body, content_type, top_k=1).status_code == 200
    one = time.monotonic() - started
    answers: list = []

    def send() -> None:
        try:
            resp = classify(service, body, content_type, top_k=1)
            answers.append((resp.status_code, len(resp.json().get("results", []))))
        except requests.RequestException as e:
            answers.append((type(e).__name__, 0))

    clients = [threading.Thread(target=send) for _ in range(4)]
    for c in clients:
        c.start()
    time.sleep(min(1.0, one / 2))  # the requests are in the replica, being decoded or computed
    stop_started = time.monotonic()
    rc = service.stop(signal.SIGTERM)
    stop_s = time.monotonic() - stop_started
    for c in clients:
        c.join(120)
    record("graceful_shutdown", {"one_request_s": round(one, 2), "stop_s": round(stop_s, 1), "answers": answers})
    assert rc == 0, service.log_tail()
    assert answers == [(200, 64)] * 4


# --- slow: overload, soak, replica killed ------------------------------------------------------------------------


@pytest.fixture
def fresh_service():
    started: list[ServiceProcess] = []

    def start(*args: str, **env: str) -> ServiceProcess:
        svc = ServiceProcess(*args, env={"CONVSERVE_AUTH_TOKEN": TOKEN, **env}).start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


def statuses(samples) -> Counter:
    return Counter(s.status for s in samples)


def overload_figures(url, bodies, headers, multiple: float, capacity: float, p99_cap: float, seconds: float) -> dict:
    """Open loop at `multiple` x capacity; what was answered how, and how fast, and where the
    machine's CPU went meanwhile (this process is the load generator; loadtests/cpu.py)."""
    before = cpu.snapshot(load_generators={os.getpid()})
    samples = open_loop(url, bodies, headers, rate=multiple * capacity, seconds=seconds, timeout_s=30)
    after = cpu.snapshot(load_generators={os.getpid()})
    ok = [s.latency_s for s in samples if s.status == 200]
    first = [s.latency_s for s in samples if s.status == 200 and s.start_s < 1]
    later = [s.latency_s for s in samples if s.status == 200 and s.start_s >= 1]
    refused = [s for s in samples if s.status == 503]
    end = max(s.start_s + s.latency_s for s in samples)
    return {
        "multiple": multiple,
        "rate_rps": round(multiple * capacity, 1),
        "statuses": dict(statuses(samples)),
        "goodput_rps": round(len(ok) / end, 1),
        "goodput_over_capacity": round(len(ok) / end / capacity, 2),
        "p99_accepted_ms": round(percentile(ok, 99) * 1000, 1),
        "p99_accepted_over_p99_at_capacity": round(percentile(ok, 99) / p99_cap, 2),
        "p50_accepted_ms": round(percentile(ok, 50) * 1000, 1),
        # the overload's start apart: admitted under the normal limit before the first refusal
        "p99_accepted_first_second_ms": round(percentile(first, 99) * 1000, 1) if first else None,
        "p99_accepted_after_first_second_ms": round(percentile(later, 99) * 1000, 1) if later else None,
        "p99_refused_ms": round(percentile([s.latency_s for s in refused], 99) * 1000, 1),
        "refusals_json": all(s.body[:1] == b"{" for s in refused),
        "cpu_percent": cpu.shares(before, after) if before and after else None,
    }


@pytest.mark.slow
def test_overload_at_two_four_and_eight_times_capacity(fresh_service):
    """Open loop at 2x, 4x, 8x capacity: accepted requests stay fast, the rest are refused fast.

    Capacity and its p99 come from 32 closed-loop clients (one image per request). Targets
    (issue 15): accepted p99 <= 2x the at-capacity p99, refusals p99 < 100 ms, goodput >= 90% of
    capacity, nothing unanswered after 30 s: recorded per run under runs/reliability/overload.json;
    asserted is what holds on the 2-core machine the load generator shares (docs/reliability.md).

    One replica, fixed: the rates are multiples of one replica's capacity, and the default
    autoscaling adds a second after ten seconds of overload, whose start took the first one's
    CPU in the 8x run (2026-12-03: lanes 98% of one CPU instead of 128-140, goodput 0.65)."""
    svc = fresh_service("--replicas", "1")
    url = svc.base + "/v1/classify?top_k=1"
    headers = {"Content-Type": "image/jpeg", **AUTH}
    bodies = fixture_jpegs()
    closed_loop(url, bodies, headers, concurrency=32, seconds=3)  # warm-up
    before = cpu.snapshot(load_generators={os.getpid()})
    samples, elapsed = closed_loop(url, bodies, headers, concurrency=32, seconds=10)
    after = cpu.snapshot(load_generators={os.getpid()})
    assert set(statuses(samples)) == {200}, summarize(samples)
    capacity = len(samples) / elapsed
    p99_cap = percentile([s.latency_s for s in samples], 99)
    runs = []
    for multiple in (2, 4, 8):
        time.sleep(2)  # let the queue drain between runs
        runs.append(overload_figures(url, bodies, headers, multiple, capacity, p99_cap, seconds=10))
    for run in runs:  # the issue-15 targets, recorded; not all are met on the 2-core machine
        run["targets_met"] = {
            "p99_accepted_within_2x_at_capacity": run["p99_accepted_over_p99_at_capacity"] <= 2.0,
            "p99_refused_under_100ms": run["p99_refused_ms"] < 100,
            "goodput_at_least_90pct": run["goodput_over_capacity"] >= 0.9,
            "only_200_and_503": set(run["statuses"]) <= {200, 503},
        }
    figures = {
        "capacity_rps": round(capacity, 1),
        "p99_at_capacity_ms": round(p99_cap * 1000, 1),
        "cpu_percent_at_capacity": cpu.shares(before, after) if before and after else None,
        "runs": runs,
    }
    record("overload", figures)
    # What held in the runs of docs/reliability.md ("Overload"), with margin: goodput 0.87-1.10 of
    # capacity at 2x and 4x; accepted p99 1.00-2.37x the at-capacity p99 at 2x and 4x; refusal p99
    # 53-231 ms; at 8x, since the refusals left HAProxy's request log (ten runs), goodput 0.87-1.00
    # and accepted p99 1.49-2.76x.
    for run in runs:
        assert set(run["statuses"]) <= {200, 503}, figures  # nothing hangs, times out or fails otherwise
        assert run["statuses"].get(503), f"{run['multiple']}x capacity should be refused in part: {figures}"
        assert run["refusals_json"], "503s should be convserve's JSON, not Ray's text"
        assert run["p99_refused_ms"] < 300, figures  # fast refusals (target 100 ms)
    for run in runs[:2]:  # 2x and 4x
        assert run["goodput_over_capacity"] >= 0.8, figures  # target 90%
        # while refusing, an admitted request waits for admission_batches_overloaded (2) batches
        assert run["p99_accepted_over_p99_at_capacity"] <= 3.0, figures  # target 2x
    # 8x: about 1,300-1,900 requests/s from a Python load generator on the same two cores
    assert runs[2]["goodput_over_capacity"] >= 0.7, figures  # target 90%
    assert runs[2]["p99_accepted_over_p99_at_capacity"] <= 3.5, figures  # target 2x
    assert_healthy_with_auth(svc)


def assert_healthy_with_auth(svc) -> None:
    assert requests.get(svc.base + "/readyz", timeout=30).status_code == 200
    assert classify(svc, real_jpeg()).status_code == 200


def replica_pids(svc) -> list[int]:
    pids = []
    for proc in svc.descendants():
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith(REPLICA_PROCESS):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_soak_no_errors_and_flat_memory(fresh_service):
    """Sustained load for SOAK_SECONDS (default 20; the 10-minute run: SOAK_SECONDS=600)."""
    seconds = float(os.environ.get("SOAK_SECONDS", "20"))
    svc = fresh_service(CONVSERVE_MAX_BATCH_SIZE="32")
    url = svc.base + "/v1/classify?top_k=3"
    headers = {"Content-Type": "image/jpeg", **AUTH}
    bodies = fixture_jpegs()
    closed_loop(url, bodies, headers, concurrency=16, seconds=max(5.0, seconds / 10))  # warm-up
    (pid,) = replica_pids(svc)
    replica = psutil.Process(pid)
    rss_start = replica.memory_info().rss
    rss_samples, samples, done = [], [], threading.Event()

    def sample_rss() -> None:
        while not done.wait(1.0):
            rss_samples.append(replica.memory_info().rss)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    try:
        samples, elapsed = closed_loop(url, bodies, headers, concurrency=16, seconds=seconds)
    finally:
        done.set()
        sampler.join()
    rss_end = replica.memory_info().rss
    growth = rss_end / rss_start - 1
    counts = statuses(samples)
    figures = {
        "seconds": seconds,
        "requests": len(samples),
        "rps": round(len(samples) / elapsed, 1),
        "latency": summarize(samples),
        "rss_after_warmup_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_mib": round(max(rss_samples, default=rss_end) / 2**20, 1),
        "rss_growth_pct": round(growth * 100, 2),
    }
    record("soak", figures)
    assert set(counts) == {200}, figures
    assert growth < 0.10, figures
    assert_healthy_with_auth(svc)


@pytest.mark.slow
def test_replica_killed_under_load_recovers(fresh_service):
    """ray.kill the replica actor under load: Serve restarts it; only in-flight requests fail, none hang."""
    import ray

    svc = fresh_service()
    address = re.search(r"convserve: ray address (\S+)", svc.log_text()).group(1)
    ray.init(address=address, logging_level="ERROR")  # RAY_AUTH_MODE etc. from conftest.py
    try:
        (name,) = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::convserve#ConvServe#")
        ]
        samples: list[tuple[float, float, int | str, str]] = []
        stop = threading.Event()

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = session.post(
                        svc.base + "/v1/classify",
                        data=real_jpeg(),
                        headers={"Content-Type": "image/jpeg", **AUTH},
                        timeout=60,
                    )
                    samples.append((t0, time.monotonic() - t0, resp.status_code, resp.text[:80]))
                except requests.RequestException as e:
                    samples.append((t0, time.monotonic() - t0, type(e).__name__, str(e)[:80]))
                time.sleep(0.01)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(3)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
        recovered_at = None
        while time.monotonic() - killed_at < 120:
            after = [t0 + lat for t0, lat, status, _ in samples if t0 > killed_at + 0.5 and status == 200]
            if len(after) >= 10:
                recovered_at = min(after)
                break
            time.sleep(0.5)
        time.sleep(2)
        stop.set()
        for c in clients:
            c.join(90)
        assert not any(c.is_alive() for c in clients), "a request hung"
        failures = [
            (round(t0 - killed_at, 2), round(lat, 2), status, text)
            for t0, lat, status, text in samples
            if status != 200
        ]
        names_after = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::convserve#ConvServe#")
        ]
    finally:
        ray.shutdown()
    figures = {
        "recovery_s": round(recovered_at - killed_at, 1) if recovered_at else None,
        "requests": len(samples),
        "failures": Counter(str(f[2]) for f in failures),
        "failure_samples": failures[:10],
        "max_latency_s": round(max(lat for _, lat, _, _ in samples), 2),
        "replica_before": name,
        "replicas_after": names_after,
    }
    record("replica_killed", figures)
    assert recovered_at is not None, figures
    # health_check_period_s (10) + the time a new replica takes to start here
    assert recovered_at - killed_at < 90, figures
    assert max(lat for _, lat, _, _ in samples) < 60, figures  # nothing hung
    assert names_after and names_after != [name], figures
    # only what was in flight at the kill, or sent while no replica was up, failed
    assert all(killed_at - 5 <= killed_at + f[0] <= recovered_at + 1 for f in failures), figures
    assert_healthy_with_auth(svc)


def small_queue_serve_config(tmp_path: Path) -> Path:
    """deploy/serve_config.yaml with a replica that takes 2 requests and queues 2 more."""
    import yaml

    from service.serve_config import DEFAULT_SERVE_CONFIG, deployment_entry

    doc = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
    dep = deployment_entry(doc)
    dep.update(max_ongoing_requests=2, max_queued_requests=2)
    dep["user_config"]["max_batch_size"] = 2
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_ray_timeout_and_backpressure_answers_are_text(fresh_service, tmp_path):
    """What Ray itself answers in HAProxy mode, documented in docs/reliability.md: not our JSON."""
    svc = fresh_service(CONVSERVE_ADMISSION_BATCHES="0")
    body, content_type = _multipart([big_jpeg(i) for i in range(64)])
    slow, took_s = rays_408(svc)
    # Ray's text names the configured timeout (30.0s), not the one it applied
    assert re.fullmatch(r"Request \S+ timed out after [0-9.]+s\.", slow.text), slow.text
    assert took_s < 5, took_s
    lifted = classify(svc, body, content_type, headers={"x-request-timeout-seconds": "0"})  # or lift it
    assert lifted.status_code == 200
    record(
        "ray_timeout",
        {
            "status": slow.status_code,
            "took_s": round(took_s, 2),
            "content_type": slow.headers["content-type"],
            "body": slow.text,
        },
    )
    svc.stop()

    small = fresh_service("--serve-config", str(small_queue_serve_config(tmp_path)), CONVSERVE_ADMISSION_BATCHES="0")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: classify(small, body, content_type), range(12)))
    refused = [r for r in answers if r.status_code == 503]
    assert refused and {r.status_code for r in answers} <= {200, 503}
    assert refused[0].text == "Request dropped due to backpressure"
    assert refused[0].headers["retry-after"] == "1"  # backpressure_config.retry_after_s in the Serve config
    record(
        "ray_backpressure",
        {
            "statuses": dict(Counter(r.status_code for r in answers)),
            "content_type": refused[0].headers.get("content-type"),
            "body": refused[0].text,
            "retry_after": refused[0].headers.get("retry-after"),
        },
    )


def test_request_timeout_is_a_json_504_before_the_ingress_cuts_in(fresh_service):
    """The replica answers 504 `timeout` (JSON) request_timeout_s - 1 s after a request starts, so
    clients see our error rather than the ingress's bare 408; the dropped work is not computed."""
    svc = fresh_service(CONVSERVE_REQUEST_TIMEOUT_S="3", CONVSERVE_ADMISSION_BATCHES="0")
    body, content_type = _multipart([big_jpeg(i) for i in range(64)])

    def send(_):
        started = time.monotonic()
        resp = classify(svc, body, content_type, top_k=1)
        return resp, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:  # 512 images: several seconds of work, 2 s allowed
        answers = list(pool.map(send, range(8)))
    statuses_seen = Counter(r.status_code for r, _ in answers)
    record("request_timeout", {"statuses": dict(statuses_seen), "latencies_s": [round(t, 2) for _, t in answers]})
    assert set(statuses_seen) <= {200, 504}, statuses_seen
    timeouts = [(r, t) for r, t in answers if r.status_code == 504]
    assert timeouts, statuses_seen
    for resp, took in timeouts:
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"]["code"] == "timeout"
        # never before the replica's budget (request_timeout_s less 1 s) has passed; that it came
        # before Ray's own cut at 3 s shows in its status: Ray would have answered a text 408
        assert took >= 3 - 1 - 0.05, took
    assert_healthy_with_auth(svc)
