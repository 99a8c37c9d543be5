"""Load tests (loadtests/): shapes, checks and payloads as units; locust runs against a fake and the service.

Locust monkey-patches the standard library with gevent when it is imported, so this process never
imports it: locust runs as a subprocess (`python -m loadtests.run`, or a small script for the
locustfile's shape class). loadtests.shapes and loadtests.checks import no locust.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtests import checks, make_payloads
from loadtests.shapes import Spike, Steady, Step, make_shape, parse_timespan
from tests.server_process import REPO_ROOT, ServiceProcess, free_port_block

PAYLOADS = REPO_ROOT / "loadtests" / "payloads"
USER_CLASS_REQUESTS = {
    "SingleImageClassify": "/v1/classify [cifar jpeg]",
    "LargePhotoClassify": "/v1/classify [larger photo]",
    "MultiImageClassify": "/v1/classify [multipart 2-8]",
    "FeatureMapsJson": "/v1/feature-maps [json]",
    "FeatureMapsPng": "/v1/feature-maps [png stage1]",
}


def run_loadtest(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtests.run", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def stats_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "locust_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


# --- shapes (pure) ------------------------------------------------------------------------------


def test_steady_shape_holds_users_then_stops():
    shape = Steady(users=8, spawn_rate=4, time_s=30)
    assert [shape.tick(t) for t in (0, 1, 15, 29.9)] == [(8, 4)] * 4
    assert shape.tick(30) is None and shape.tick(31) is None


def test_step_shape_climbs_in_equal_steps():
    shape = Step(users=8, spawn_rate=2, time_s=40)  # 4 steps of 10 s
    assert [shape.tick(t) for t in (0, 9.9, 10, 20, 35, 39.9)] == [(2, 2), (2, 2), (4, 2), (6, 2), (8, 2), (8, 2)]
    assert shape.tick(40) is None
    assert Step(users=3, spawn_rate=1, time_s=8).tick(0) == (1, 1)  # never zero users
    assert Step(users=3, spawn_rate=1, time_s=8, steps=3).tick(7) == (3, 1)


def test_spike_shape_baseline_spike_baseline():
    shape = Spike(users=20, spawn_rate=2, time_s=50)  # spike in [20 s, 30 s)
    assert shape.baseline == 5
    assert shape.tick(0) == (5, 2) and shape.tick(19.9) == (5, 2)
    assert shape.tick(20) == (20, 20) and shape.tick(29.9) == (20, 20)  # sudden: all within a second
    assert shape.tick(30) == (5, 20) and shape.tick(49) == (5, 20)  # and straight back
    assert shape.tick(50) is None
    assert Spike(users=2, spawn_rate=1, time_s=10).baseline == 1
    assert Spike(users=8, spawn_rate=50, time_s=10).tick(5) == (8, 50)  # a faster configured rate stays


def test_make_shape_and_timespans():
    assert make_shape("none", 4, 1, 10) is None
    assert isinstance(make_shape("step", 4, 1, 10), Step)
    assert make_shape("spike", 4, 1, 10) == Spike(4, 1, 10)
    with pytest.raises(ValueError, match="unknown shape"):
        make_shape("ramp", 4, 1, 10)
    with pytest.raises(ValueError):
        make_shape("steady", 0, 1, 10)
    assert [parse_timespan(s) for s in ("30", "30s", "2m", "1m30s", "1h30m")] == [30, 30, 120, 90, 5400]
    with pytest.raises(ValueError):
        parse_timespan("soon")


def test_locustfile_wraps_the_selected_shape():
    """In a subprocess (locust imports gevent): SelectedShape exists only for a shape, and follows it."""
    script = textwrap.dedent(
        """
        import json, os, sys
        sys.path.insert(0, "loadtests")
        import locustfile
        shape = locustfile.SelectedShape()
        ticks = {}
        for t in (0, 4, 5, 7, 10):
            shape.get_run_time = lambda t=t: t
            ticks[t] = shape.tick()
        users = [c.__name__ for c in vars(locustfile).values()
                 if isinstance(c, type) and issubclass(c, locustfile.FastHttpUser) and not c.abstract]
        print(json.dumps({"ticks": ticks, "users": users}))
        """
    )
    env = {"LOAD_SHAPE": "spike", "LOAD_USERS": "8", "LOAD_SPAWN_RATE": "2", "LOAD_TIME_S": "10"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=_env(env), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, explain(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ticks"] == {"0": [2, 2.0], "4": [8, 8.0], "5": [8, 8.0], "7": [2, 8.0], "10": None}
    assert set(got["users"]) == {*USER_CLASS_REQUESTS, "MixedUser"}

    script = (
        "import sys; sys.path.insert(0, 'loadtests'); import locustfile; print(hasattr(locustfile, 'SelectedShape'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=_env({"LOAD_SHAPE": "none"}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", explain(proc)


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "LOCUST_"))}, **extra}


# --- checks (pure) ------------------------------------------------------------------------------

LABELS = ["cat", "dog"]


def _body(doc) -> bytes:
    return json.dumps(doc).encode()


def test_classify_check_accepts_the_contract_and_names_each_breach():
    good = {
        "model": "m@1",
        "predictions": [{"label": "cat", "index": 0, "score": 0.9}, {"label": "dog", "index": 1, "score": 0.1}],
    }
    ok = "application/json"
    assert checks.check_classify(200, ok, _body(good), 2, LABELS) is None
    assert "top_k=3" in checks.check_classify(200, ok, _body(good), 3, LABELS)
    assert "HTTP 503" in checks.check_classify(503, ok, b'{"error": {"code": "overloaded"}}', 2)
    assert "Content-Type" in checks.check_classify(200, "text/html", _body(good), 2)
    assert "not JSON" in checks.check_classify(200, ok, b"<html>", 2)
    unsorted = {**good, "predictions": good["predictions"][::-1]}
    assert "descending" in checks.check_classify(200, ok, _body(unsorted), 2)
    assert "model" in checks.check_classify(200, ok, _body({**good, "model": 3}), 2)
    wrong_label = {"model": "m", "predictions": [{"label": "emu", "index": 0, "score": 0.5}]}
    assert "emu" in checks.check_classify(200, ok, _body(wrong_label), 1, LABELS)
    assert checks.check_classify(200, ok, _body(wrong_label), 1, None) is None  # labels unknown: any string
    out_of_range = {"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 1.5}]}
    assert "[0, 1]" in checks.check_classify(200, ok, _body(out_of_range), 1)


def test_multi_feature_map_and_png_checks():
    ok = "application/json"
    entry = {"predictions": [{"label": "cat", "index": 0, "score": 0.7}]}
    multi = {"model": "m", "results": [entry, entry]}
    assert checks.check_classify_multi(200, ok, _body(multi), 1, 2, LABELS) is None
    assert "for 3 images" in checks.check_classify_multi(200, ok, _body(multi), 1, 3)
    failed = {"model": "m", "results": [entry, {"error": {"code": "undecodable_image", "message": "x"}}]}
    assert "results[1] is an error" in checks.check_classify_multi(200, ok, _body(failed), 1, 2)

    fm = {"model": "m", "layers": [{"name": "stem", "shape": [32, 32, 32]}, {"name": "logits", "shape": [10]}]}
    assert checks.check_feature_maps_json(200, ok, _body(fm), ["stem", "logits"]) is None
    assert "expected" in checks.check_feature_maps_json(200, ok, _body(fm), ["stem"])
    bad_shape = {"model": "m", "layers": [{"name": "stem", "shape": [32, 0]}]}
    assert "positive integers" in checks.check_feature_maps_json(200, ok, _body(bad_shape))

    png = checks.PNG_MAGIC + b"rest"
    assert checks.check_png(200, "image/png", png) is None
    assert "PNG signature" in checks.check_png(200, "image/png", b"GIF89a")
    assert "Content-Type" in checks.check_png(200, ok, png)


# --- payloads -----------------------------------------------------------------------------------


def test_payloads_are_committed_small_and_deterministic():
    cifar = sorted(PAYLOADS.glob("cifar-*.jpg"))
    photos = sorted(PAYLOADS.glob("photo-*"))
    assert len(cifar) == 40 and len({p.name.split("-")[1] for p in cifar}) == 10
    assert len(photos) == 9
    assert sum(p.stat().st_size for p in [*cifar, *photos]) < 3_000_000
    sizes = {Image.open(p).size for p in photos}
    assert sizes == {(224, 224), (640, 480), (1280, 960)}
    assert {p.suffix for p in photos} == {".png", ".jpg", ".webp"}
    # The generator draws the same pixels as the committed (lossless) PNG.
    label, width, height = make_payloads.PHOTOS[0]
    committed = np.asarray(Image.open(PAYLOADS / f"photo-{label}-{width}x{height}.png").convert("RGB"))
    assert np.array_equal(np.asarray(make_payloads.photo_pixels(0)), committed)
    assert (PAYLOADS / "cifar-cat-00.jpg").read_bytes() == (
        REPO_ROOT / "tests" / "fixtures" / "cifar10-val-sample" / "cat" / "0000.jpg"
    ).read_bytes()


def test_payload_bytes_match_a_fresh_build():
    """`make_payloads` would rewrite exactly the committed files (same Pillow)."""
    fresh = make_payloads.build()
    committed = {p.name: p.read_bytes() for p in PAYLOADS.iterdir()}
    assert set(fresh) == set(committed)
    assert [n for n in fresh if fresh[n] != committed[n]] == []
    assert all(Image.open(io.BytesIO(fresh[n])).size for n in fresh)


# --- locust against a service that breaks the contract ------------------------------------------


class _WrongTopK(BaseHTTPRequestHandler):
    """Ready, a valid /v1/model, and classify answers with 2 predictions whatever top_k was asked."""

    def _send(self, doc: dict, status: int = 200) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/readyz":
            self._send({"status": "ready"})
        elif self.path == "/v1/model":
            self._send({"labels": LABELS, "layers": [{"name": "stem"}]})
        else:
            self._send({"error": {"code": "not_found", "message": self.path}}, 404)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        preds = [{"label": "cat", "index": 0, "score": 0.6}, {"label": "dog", "index": 1, "score": 0.4}]
        self._send({"model": "fake@1", "predictions": preds})

    def log_message(self, *args):
        pass


def test_loadtest_fails_when_responses_break_the_contract(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WrongTopK)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "fake"
        proc = run_loadtest(
            "--host", host, "--time", "3s", "--users", "2", "--user-class", "SingleImageClassify", "--out", str(out)
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode != 0, explain(proc)
    assert f"using the service at {host}" in proc.stdout, explain(proc)
    row = stats_rows(out)["/v1/classify [cifar jpeg]"]
    assert int(row["Request Count"]) > 0 and row["Failure Count"] == row["Request Count"], row
    with open(out / "locust_failures.csv", newline="") as f:
        errors = " ".join(r["Error"] for r in csv.DictReader(f))
    assert "entries, asked top_k=" in errors, errors
    assert "FAILED" in proc.stdout + proc.stderr


# --- locust against the real service ------------------------------------------------------------


def _listening(port: int) -> bool:
    """Something accepts connections on the port (a bind test would trip over TIME_WAIT sockets)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.integration
def test_loadtest_starts_and_stops_its_own_service(tmp_path):
    """Nothing at --host: run.py starts `python -m service` there, runs a spike, stops it by pid.

    Before the tests below, so that its service and theirs never run at the same time.
    """
    port = free_port_block()
    out = tmp_path / "own"
    proc = run_loadtest(
        "--host", f"http://127.0.0.1:{port}", "--shape", "spike", "--users", "4", "--time", "8s", "--out", str(out),
        timeout_s=420,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert "no service at" in proc.stdout and "stopping the service" in proc.stdout, explain(proc)
    assert "convserve: ready" in (out / "service.log").read_text()
    assert not _listening(port), "the service it started still listens on its port"
    assert "convserve: stopped" in (out / "service.log").read_text()
    total = stats_rows(out)["Aggregated"]
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0", total


@pytest.fixture(scope="module")
def service():
    svc = ServiceProcess().start()
    yield svc
    svc.stop()


@pytest.mark.integration
def test_mixed_users_steady_no_failures(service, tmp_path):
    out = tmp_path / "mixed"
    proc = run_loadtest(
        "--host", service.base, "--shape", "steady", "--users", "4", "--time", "8s",
        "--user-class", "MixedUser", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert f"using the service at {service.base}" in proc.stdout, explain(proc)
    rows = stats_rows(out)
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0", total
    assert int(rows["/v1/classify [cifar jpeg]"]["Request Count"]) > 0
    assert (out / "report.html").is_file() and (out / "report.html").stat().st_size > 10_000
    assert "loadtest: " in proc.stdout and " req/s" in proc.stdout and "p99" in proc.stdout
    # The CSV holds the final figures, the same as locust's printed summary.
    printed = re.search(r"^\s+Aggregated\s+(\d+)\s+(\d+)\(", proc.stdout, re.MULTILINE)
    assert printed and printed.groups() == (total["Request Count"], total["Failure Count"]), proc.stdout[-3000:]


@pytest.mark.integration
def test_every_user_class_no_failures(service, tmp_path):
    out = tmp_path / "classes"
    proc = run_loadtest(
        "--host", service.base, "--shape", "none", "--users", "5", "--time", "6s",
        "--user-class", *USER_CLASS_REQUESTS, "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    rows = stats_rows(out)
    for name in USER_CLASS_REQUESTS.values():
        assert int(rows[name]["Request Count"]) > 0, (name, rows.keys())
        assert rows[name]["Failure Count"] == "0", rows[name]
