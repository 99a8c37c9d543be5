"""service/haproxy_gate.py: the admission rules added to Ray's generated HAProxy configuration
(a real configuration Ray 2.60 wrote, tests/fixtures/haproxy-ray-2.60.cfg), checked by a real
haproxy, and the launcher Ray starts in its place."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from service.haproxy_gate import MARKER, patch_config, refusals_in_table, write_launcher
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
    assert patched.rstrip().endswith("store gpc0,gpc0_rate(1s)")  # the refusal counter's table
    # a refusal leaves no request-log line for Ray's HAProxyManager to parse (it is counted in the
    # table instead); set before the tarpit, which ends the rules
    silent = rules.index("http-request set-log-level silent if { var(txn.cs_refuse) -m bool }")
    assert silent < rules.index("http-request tarpit")
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
