"""service/haproxy_gate.py: the admission rules added to Ray's generated HAProxy configuration
(a real configuration Ray 2.60 wrote, tests/fixtures/haproxy-ray-2.60.cfg), checked by a real
haproxy, and the launcher Ray starts in its place."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.haproxy_gate import MARKER, SIGNAL_HEADER, patch_config, refusals_in_table, write_launcher
from service.server import HAProxyUnreachable, RefusalExporter, haproxy_binary

RAY_CONFIG = (Path(__file__).parent / "fixtures" / "haproxy-ray-2.60.cfg").read_text()


def frontend(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("frontend http_frontend")
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    return lines[start:end]


def test_the_rules_go_into_the_http_frontend_before_its_routing():
    patched = patch_config(RAY_CONFIG, normal=128, overloaded=64)
    lines = frontend(patched)
    marker = lines.index("    " + MARKER)
    first_route = next(i for i, line in enumerate(lines) if line.strip().startswith("use_backend "))
    assert marker < first_route
    rules = "\n".join(lines[marker:first_route])
    assert "nbsrv(http-convserve),mul(128)" in rules and "nbsrv(http-convserve),mul(64)" in rules
    assert "be_conn(http-convserve)" in rules and "timeout tarpit 50ms" in rules
    assert '"{\\"error\\":{\\"code\\":\\"overloaded\\"' in rules  # convserve's JSON body, V2's too
    assert patched.rstrip().endswith("store gpc0,gpc1_rate(1s)")  # the refusal counters' table
    # a refusal leaves no request-log line for Ray's HAProxyManager to parse (it is counted in the
    # table instead); set before the tarpit, which ends the rules
    silent = rules.index("http-request set-log-level silent if { var(txn.cs_refuse) -m bool }")
    assert silent < rules.index("http-request tarpit")
    assert SIGNAL_HEADER not in rules.replace(f"del-header {SIGNAL_HEADER}", "")  # no signal without a token
    signalled = "\n".join(frontend(patch_config(RAY_CONFIG, normal=128, overloaded=64, signal="c0ffee")))
    assert f"set-header {SIGNAL_HEADER} c0ffee if" in signalled
    assert patch_config(patched, 1, 1) == patched  # a reload's file is patched once


def test_configurations_it_does_not_know_are_left_alone():
    assert patch_config("global\n    maxconn 10\n", 128, 64) == "global\n    maxconn 10\n"
    two_apps = RAY_CONFIG.replace(
        "    use_backend http-convserve if is_http-convserve",
        "    use_backend http-other if is_http-other\n    use_backend http-convserve if is_http-convserve",
    )
    assert patch_config(two_apps, 128, 64) == two_apps


def test_refusals_are_read_from_the_stick_table():
    answer = (  # what HAProxy 2.8's stats socket answered in a served run
        "# table: cs_overload, type: integer, size:1, used:1\n"
        "0x7ffb880517f0: key=1 use=0 exp=3599799 shard=0 gpc0=4830 gpc0_rate(1000)=2105\n\n"
    )
    assert refusals_in_table(answer) == 4830
    assert refusals_in_table("# table: cs_overload, type: integer, size:1, used:0\n") == 0


@pytest.fixture()
def binary() -> str:
    found = haproxy_binary()
    if found is None:
        pytest.skip("no haproxy binary")
    return found


# Where Ray wrote the fixture's runtime files (error pages, sockets) when it ran.
RUNTIME_DIR = re.compile(r"/tmp/(?:convserve-8000|haproxy-serve)/[0-9a-f]+")


def test_haproxy_accepts_the_patched_configuration_through_the_launcher(tmp_path, binary):
    # haproxy -c opens the error pages the configuration names and checks socket paths (at most 97
    # characters): a short runtime folder of its own, with the error page Ray would have written
    with tempfile.TemporaryDirectory(prefix="csgate-", dir="/tmp") as runtime:
        (Path(runtime) / "500.http").write_text(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
        )
        config = tmp_path / "haproxy.cfg"
        config.write_text(RUNTIME_DIR.sub(runtime, RAY_CONFIG))
        launcher = write_launcher(str(tmp_path), binary, normal=128, overloaded=64)
        check = subprocess.run([launcher, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert MARKER in config.read_text()
    version = subprocess.run([launcher, "-v"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "HAProxy version" in version.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeldReplica(ThreadingHTTPServer):
    """A stand-in for a replica behind HAProxy: holds /v1/classify requests until released,
    answers a request carrying the signal header 503 at once, and records what it saw."""

    def __init__(self):
        self.seen: list[str | None] = []  # the signal header of each request, in arrival order
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805 - the handler's own self; the server is `self`
                handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                signal = handler.headers.get(SIGNAL_HEADER)
                self.seen.append(signal)
                status, body = (503, b'{"from":"replica"}') if signal else (200, b"{}")
                if signal is None:
                    self.release.wait(20)
                handler.send_response(status)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def post(port: int, headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("POST", "/v1/classify", body=b"x", headers=headers or {})
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, body, time.perf_counter() - started


def test_haproxy_sends_the_first_refusal_of_an_overload_on_marked_and_answers_the_rest(tmp_path, binary):
    """A real haproxy with the gate (limits 2 and 1 for its one server) in front of a held backend."""
    replica = HeldReplica()
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    port, sock = free_port(), tmp_path / "admin.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    stats socket {sock} mode 600 level admin\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{port}\n    acl is_http-app path_beg /\n"
        "    use_backend http-app if is_http-app\n"
        f"backend http-app\n    server replica 127.0.0.1:{replica.server_address[1]}\n"
    )
    config.write_text(patch_config(config.read_text(), normal=2, overloaded=1, signal="t0ken"))
    haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    held: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # two requests fill the backend (a client's own signal header never reaches it)
        held += [threading.Thread(target=post, args=(port, {SIGNAL_HEADER: "t0ken"})) for _ in range(2)]
        for t in held:
            t.start()
        while len(replica.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert replica.seen == [None, None]
        status, body, _ = post(port)  # the first refusal: on to the replica, marked with the token
        assert (status, body, replica.seen[2:]) == (503, b'{"from":"replica"}', ["t0ken"])
        status, body, seconds = post(port)  # refusing now: HAProxy answers, 50 ms late, unseen by the replica
        assert status == 503 and json.loads(body)["error"]["code"] == "overloaded" and seconds >= 0.045
        assert len(replica.seen) == 3
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"show table cs_overload\n")
            table = b"".join(iter(lambda: s.recv(4096), b"")).decode()
        assert refusals_in_table(table) == 1  # the refusals HAProxy answered itself
    finally:
        replica.release.set()
        for t in held:
            t.join(10)
        haproxy.terminate()
        haproxy.wait(10)
        replica.shutdown()


class Tally:
    def __init__(self):
        self.total = 0

    def inc(self, n):
        self.total += n


class ScriptedExporter(RefusalExporter):
    """The exporter's arithmetic on counts given in turn (a dict per poll, or an error to raise)."""

    def __init__(self, script):
        super().__init__(port=0, counter=Tally())
        self.script = iter(script)

    def counts(self):
        step = next(self.script)
        if isinstance(step, Exception):
            raise step
        return step


def test_the_exporter_adds_what_each_haproxy_counted_since_the_last_poll(capsys):
    exporter = ScriptedExporter(
        [
            {"a": 10},
            {"a": 25},
            {"a": 30, "b": 4},  # a reload: a second HAProxy, counting from zero
            {"b": 9},  # the old one drained and exited: its count is not taken back
            HAProxyUnreachable("no stats socket"),  # between reloads: nothing added, one line
            HAProxyUnreachable("no stats socket"),
            {"b": 2},  # the table's entry expired (an hour without refusals): counted again from 0
        ]
    )
    added = [exporter.poll() for _ in range(7)]
    assert added == [10, 15, 9, 5, 0, 0, 2]
    assert exporter.counter.total == 41
    assert capsys.readouterr().out.count("cannot read HAProxy's refusal count") == 1
