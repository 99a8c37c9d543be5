"""Run a headless locust load test against convserve; start the service first if none answers.

    python -m loadtests.run [--host URL] [--shape none|steady|step|spike] [--users N]
                            [--spawn-rate R] [--time 30s] [--user-class MixedUser ...] [--out DIR]

(`make loadtest ARGS="..."` runs this.) If nothing answers at `--host` and the host is this machine,
it starts `python -m service --port <the URL's port>` in a session of its own, waits for /readyz,
and stops it by process id at the end (SIGTERM to the supervisor, which stops Ray and Serve). A
service that answers is used as it is and left running.

Results go to `--out` (default `results/loadtest-<UTC timestamp>/`): locust's CSVs
(`locust_stats.csv`, `locust_failures.csv`, `locust_stats_history.csv`, ...), `report.html`,
`locust.log`, and `service.log` when this run started the service. At the end it prints the
aggregated figures from `locust_stats.csv`; the exit status is non-zero if any request failed,
none was made, or locust itself failed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python loadtests/run.py`
    sys.path.insert(0, str(ROOT))

from loadtests.shapes import SHAPES, parse_timespan  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
SERVICE_START_TIMEOUT_S = 300.0
SERVICE_STOP_TIMEOUT_S = 90.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run", description="Headless locust load test against convserve."
    )
    p.add_argument("--host", default="http://127.0.0.1:8000", help="service base URL (default: %(default)s)")
    p.add_argument("--shape", choices=SHAPES, default="steady", help="load shape (default: %(default)s)")
    p.add_argument("--users", type=int, default=8, help="users; the peak for step and spike (default: %(default)s)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: --users)")
    p.add_argument("--time", default="30s", help="run time: 30s, 2m, 1h30m (default: %(default)s)")
    p.add_argument(
        "--user-class",
        nargs="+",
        default=["MixedUser"],
        metavar="CLASS",
        help="locust user class(es) from loadtests/locustfile.py (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="results directory (default: results/loadtest-<timestamp>)")
    a = p.parse_args(argv)
    try:
        a.time_s = parse_timespan(a.time)
    except ValueError as e:
        p.error(str(e))
    if a.time_s <= 0 or a.users < 1 or (a.spawn_rate is not None and a.spawn_rate <= 0):
        p.error("--time, --users and --spawn-rate must be positive")
    a.spawn_rate = a.spawn_rate or float(a.users)
    a.host = a.host.rstrip("/")
    return a


def readyz(host: str, timeout_s: float = 3.0) -> int | None:
    """HTTP status of GET /readyz, or None when nothing answers."""
    try:
        with urllib.request.urlopen(host + "/readyz", timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


# Where Ray Serve's replicas bind their own HTTP and gRPC servers in HAProxy mode (direct ingress,
# ray/serve/_private/constants.py): a port chosen there could be taken by a replica before the
# service binds it ("cannot bind socket (Address already in use)").
RAY_DIRECT_INGRESS_PORTS = (range(30000, 31001), range(40000, 41001))


def in_ray_ingress_range(port: int) -> bool:
    return any(port in r for r in RAY_DIRECT_INGRESS_PORTS)


# Ports handed to a service come from below the kernel's ephemeral range (where a port asked for
# as "any" comes from) and above Ray's worker ports (10002-19999): a port from the ephemeral range,
# free when chosen, was taken by one of Ray's own processes before the service's gRPC proxy bound
# it, some 20 s later ("Failed to bind to address [::]:37059", make test, 2026-12-03).
CHOSEN_PORTS = range(20000, 30000)


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):  # not Linux: Linux's default
        return range(32768, 61000)


def free_port(span: int = 0) -> int:
    """A free port, outside the kernel's ephemeral range and Ray's direct-ingress ranges, with
    room for `span` more above it in CHOSEN_PORTS (where the ephemeral range leaves none: any free
    port outside Ray's ranges)."""
    ephemeral = ephemeral_ports()
    bases = CHOSEN_PORTS[: len(CHOSEN_PORTS) - span]
    candidates = [p for p in bases if p not in ephemeral and p + span not in ephemeral]
    for _ in range(100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.choice(candidates) if candidates else 0))
            except OSError:
                continue
            port = s.getsockname()[1]
        if not in_ray_ingress_range(port):
            return port
    raise RuntimeError("no free port outside Ray's direct-ingress ranges")


class Service:
    """`python -m service` on the URL's port, in its own session, stopped by pid."""

    def __init__(self, host: str, log_path: Path):
        url = urlsplit(host)
        self.host = host
        self.port = url.port or 80
        self.metrics_port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "service", "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        print(f"loadtest: no service at {self.host}; starting: {' '.join(cmd[1:])} (log: {self.log_path})", flush=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started = time.monotonic()
        while time.monotonic() - started < SERVICE_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_tail()}")
            # Ours, not something else that answers on the port: our log says ready, then /readyz.
            if "convserve: ready" in self.log_text() and readyz(self.host) == 200:
                print(f"loadtest: service ready (pid {self.proc.pid}) in {time.monotonic() - started:.0f}s", flush=True)
                return
            time.sleep(0.5)
        raise TimeoutError(f"service not ready in {SERVICE_START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            print(f"loadtest: stopping the service (pid {self.proc.pid})", flush=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVICE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def wait_until_ready(host: str, timeout_s: float = SERVICE_START_TIMEOUT_S) -> None:
    """A service that answers but is still loading (503): wait for it."""
    started = time.monotonic()
    while (status := readyz(host)) != 200:
        if status is None or time.monotonic() - started > timeout_s:
            raise RuntimeError(f"service at {host} not ready (GET /readyz: {status})")
        time.sleep(1.0)


def locust_command(a: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        a.host,
        "--users",
        str(a.users),
        "--spawn-rate",
        str(a.spawn_rate),
        "--run-time",
        f"{a.time_s}s",
        "--stop-timeout",
        "10s",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--only-summary",
        *a.user_class,
    ]


def run_locust(a: argparse.Namespace, out: Path) -> int:
    cmd = locust_command(a, out)
    env = {
        **os.environ,
        "LOAD_SHAPE": a.shape,
        "LOAD_USERS": str(a.users),
        "LOAD_SPAWN_RATE": str(a.spawn_rate),
        "LOAD_TIME_S": str(a.time_s),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("LOCUST_USER_CLASSES", None)  # --user-class decides
    print(f"loadtest: LOAD_SHAPE={a.shape} {' '.join(cmd[1:])}", flush=True)
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # locust stops, writes its CSVs and report
        return proc.wait()


def read_stats(path: Path) -> tuple[dict[str, str] | None, list[dict[str, str]]]:
    """(the Aggregated row, the per-request rows) of locust_stats.csv."""
    if not path.is_file():
        return None, []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    return total, [r for r in rows if r["Name"] != "Aggregated"]


def read_failures(path: Path) -> list[dict[str, str]]:
    """locust_failures.csv, most frequent first, messages without locust's exception wrapper."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["Error"] = re.sub(r"""^CatchResponseError\((['"])(.*)\1\)$""", r"\2", r["Error"])
    return sorted(rows, key=lambda r: -int(r["Occurrences"]))


def summary(out: Path) -> tuple[str, int, int]:
    """(text, requests, failures) from the CSVs."""
    total, rows = read_stats(out / "locust_stats.csv")
    if total is None:
        return "loadtest: no locust_stats.csv written", 0, 0
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    lines = [
        "",
        f"{'request':<36} {'count':>7} {'fail':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'req/s':>7}",
    ]
    for r in [*rows, total]:
        name = f"{r['Type']} {r['Name']}".strip()
        lines.append(
            f"{name[:36]:<36} {r['Request Count']:>7} {r['Failure Count']:>5} {r['50%']:>7} "
            f"{r['95%']:>7} {r['99%']:>7} {float(r['Requests/s']):>7.1f}"
        )
    lines.append(
        f"\nloadtest: {requests} requests, {failures} failures, median {total['50%']} ms, p95 {total['95%']} ms, "
        f"p99 {total['99%']} ms, {float(total['Requests/s']):.1f} req/s"
    )
    for f in read_failures(out / "locust_failures.csv")[:10]:
        lines.append(f"loadtest: FAILED {f['Occurrences']}x {f['Method']} {f['Name']}: {f['Error']}")
    return "\n".join(lines), requests, failures


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (a.out or ROOT / "results" / f"loadtest-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    service = None
    try:
        if readyz(a.host) is None:
            if urlsplit(a.host).hostname not in LOCAL_HOSTS:
                print(f"loadtest: nothing answers at {a.host}, and it is not this machine", file=sys.stderr)
                return 2
            service = Service(a.host, out / "service.log")
            service.start()
        else:
            wait_until_ready(a.host)
            print(f"loadtest: using the service at {a.host}", flush=True)
        rc = run_locust(a, out)
    except (RuntimeError, TimeoutError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    finally:
        if service is not None:
            service.stop()

    text, requests, failures = summary(out)
    print(text)
    print(f"loadtest: results in {out}")
    if rc != 0 or failures or not requests:
        print(f"loadtest: FAILED (locust exit {rc}, {failures} failures, {requests} requests)", file=sys.stderr)
        return rc or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
