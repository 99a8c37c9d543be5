"""Integration: `python -m service` starts, stops on signals, and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
import requests

from model import DEFAULT_BUNDLE
from tests.server_process import ServiceProcess

pytestmark = pytest.mark.integration


def _leftovers(svc: ServiceProcess, before: set[int]) -> list[str]:
    """Ray or haproxy processes that did not exist before this service started."""
    names = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.info["pid"] in before:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.status() != psutil.STATUS_ZOMBIE and (
            "haproxy" in (proc.info["name"] or "") or "ray::" in cmd or "gcs_server" in cmd or "raylet" in cmd
        ):
            names.append(f"{proc.info['pid']} {cmd[:80]}")
    return names


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(autouse=True)
def _need_bundle():
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.skip("embedded bundle not trained yet (make train)")


def test_sigterm_to_process_group_then_restart_then_sigint():
    before = {p.pid for p in psutil.process_iter()}
    svc = ServiceProcess().start()
    assert requests.get(svc.base + "/readyz", timeout=10).status_code == 200
    # A supervisor's stop: SIGTERM to the whole process group.
    started = time.monotonic()
    assert svc.stop(signal.SIGTERM, group=True) == 0, svc.log_tail()
    assert time.monotonic() - started < 60
    assert _leftovers(svc, before) == []
    assert _port_free(svc.port) and _port_free(svc.metrics_port)

    # A second start on the same ports, right away, comes up cleanly; Ctrl-C (SIGINT) stops it.
    again = ServiceProcess()
    again.port, again.metrics_port, again.base = svc.port, svc.metrics_port, svc.base
    again.args = ["--port", str(svc.port), "--metrics-port", str(svc.metrics_port)]
    again.start()
    assert requests.get(again.base + "/healthz", timeout=10).status_code == 200
    assert again.stop(signal.SIGINT) == 0, again.log_tail()
    assert _leftovers(again, before) == []
    assert "convserve: stopped" in again.log_text()
    # The terminal gets convserve's own lines, one per stage; Ray's and HAProxy's go to a file.
    shown = again.log_text().splitlines()
    assert shown and all(line.startswith("convserve: ") for line in shown), shown
    for stage in ("starting", "model ", "environment:", "Ray started", "ready on "):
        assert any(line.startswith(f"convserve: {stage}") for line in shown), stage
    ray_log = Path(re.search(r"logs: (\S+service\.log)", shown[0]).group(1))
    assert "ServeController" in ray_log.read_text(errors="replace")


def test_port_in_use_is_reported_not_obscure():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        svc = ServiceProcess()
        svc.args = ["--port", str(port), "--metrics-port", str(svc.metrics_port)]
        with pytest.raises(RuntimeError) as err:
            svc.start(timeout_s=60)
        assert f"port {port} is already in use" in str(err.value)
        assert "pid" in str(err.value)
    finally:
        holder.close()
