"""tests/loadgen.py's open loop against a real HTTP/1.1 server in this process (http.server):
statuses, bodies of errors, keep-alive reuse, the rate, and the client timeout."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.loadgen import open_loop


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: set = set()

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Handler.connections.add(self.client_address)
        if body == b"slow":
            time.sleep(1.0)
        status = 503 if body == b"refuse" else 200
        out = b'{"error": "busy"}' if status == 503 else b"ok:" + body
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        if self.headers.get("X-Close"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.connections = set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/classify?top_k=1"
    httpd.shutdown()


def test_open_loop_sends_at_the_rate_keeps_error_bodies_and_reuses_connections(server):
    start = time.perf_counter()
    samples = open_loop(server, [b"a", b"refuse"], {"Content-Type": "image/jpeg"}, rate=100, seconds=1.0)
    took = time.perf_counter() - start
    assert len(samples) == 100 and 0.95 < took < 3
    assert [s.status for s in samples] == [200, 503] * 50
    assert all(s.body == b'{"error": "busy"}' for s in samples if s.status == 503)
    assert all(s.body == b"" for s in samples if s.status == 200)  # success bodies are not kept
    assert [round(s.start_s, 2) for s in samples[:3]] == [0.0, 0.01, 0.02]
    assert len(Handler.connections) < 20  # one request at a time per connection, reused


def test_open_loop_does_not_wait_for_slow_answers_and_times_out(server):
    samples = open_loop(server, [b"slow"], {}, rate=20, seconds=0.5, timeout_s=0.3)
    assert [s.status for s in samples] == ["timeout"] * 10
    assert all(0.25 < s.latency_s < 0.6 for s in samples)
    samples = open_loop(server, [b"a"], {"X-Close": "1"}, rate=20, seconds=0.5)
    assert [s.status for s in samples] == [200] * 10  # the server closing each connection
