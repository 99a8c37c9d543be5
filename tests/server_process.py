"""Start `python -m service` (the `make serve` entry point) as a real process; stop it by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from loadtests.run import free_port, in_ray_ingress_range

__all__ = ["free_port", "free_port_block", "ServiceProcess"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port_block(span: int = 1600) -> int:
    """A port p with p and the ports that follow it free: HAProxy's stats (p+404) and metrics
    (p+1101), Ray's fallback proxy (p+500, p+1500); service/server.py sets them."""
    for _ in range(50):
        port = free_port(span)
        if port + span > 65000 or any(in_ray_ingress_range(port + k) for k in (404, 500, 1101, 1500)):
            continue
        ok = True
        for p in (port, port + 404, port + 500, port + 1101, port + 1500):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port block")


class ServiceProcess:
    """One `python -m service` run with its own ports; `stop()` sends SIGTERM to the supervisor."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path: Path | None = None):
        self.port = free_port_block()
        self.metrics_port = free_port()
        self.grpc_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        ports = ["--port", str(self.port), "--metrics-port", str(self.metrics_port), "--grpc-port", str(self.grpc_port)]
        self.args = [*ports, *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path or Path(f"/tmp/convserve-test-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> ServiceProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", *self.args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a terminal job
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "convserve: ready" in self.log_text():
                try:
                    if requests.get(self.base + "/readyz", timeout=5).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"service not ready in {timeout_s}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def descendants(self) -> list[psutil.Process]:
        """Every process in the driver's session and the supervisor's process group."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and os.getsid(proc.pid) in self.session_ids():
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def session_ids(self) -> set[int]:
        ids = {self.proc.pid} if self.proc else set()
        if self.proc:
            try:
                ids |= {os.getsid(c.pid) for c in psutil.Process(self.proc.pid).children()}
            except (psutil.Error, ProcessLookupError):
                pass
        return ids

    def stop(self, sig: int = signal.SIGTERM, group: bool = False, timeout_s: float = 90.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()
