"""`python -m service`: serve in the foreground; Ctrl-C or SIGTERM stops everything it started.

A small supervisor. It checks for leftovers of an earlier run, starts the Ray driver
(service.server) in a session of its own, and on SIGINT, SIGTERM or SIGHUP (to itself or to its
whole process group) asks the driver alone to stop. The driver shuts Serve and Ray down in
order. Afterwards the supervisor kills, by process id, anything still alive in the driver's
session and any haproxy started with this run's config file, so nothing outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

from service.server import config_from_args, parse_args, runtime_dir

STOP_GRACE_S = 45.0


def _port_owner(port: int) -> psutil.Process | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                return psutil.Process(conn.pid)
            except psutil.NoSuchProcess:
                return None
    return None


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _ours(proc: psutil.Process, port: int) -> bool:
    """A haproxy started by an earlier convserve on this port (it names our runtime dir)."""
    try:
        return "haproxy" in proc.name() and runtime_dir(port) in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def preflight(ports: list[int], serve_port: int) -> None:
    """Clean up our own stale haproxy; report anything else holding our ports, and stop."""
    for proc in psutil.process_iter():
        if _ours(proc, serve_port):
            print(f"convserve: stopping stale haproxy pid {proc.pid} from an earlier run", flush=True)
            proc.kill()
            proc.wait(5)
    for port in ports:
        if _port_in_use(port):
            owner = _port_owner(port)
            who = f"pid {owner.pid} ({' '.join(owner.cmdline())[:120]})" if owner else "another process"
            raise SystemExit(
                f"convserve: port {port} is already in use by {who}. A server from an earlier run? "
                f"Stop it (kill {owner.pid if owner else 'PID'}) or choose other ports (--port, --metrics-port)."
            )


def _cleanup(session_id: int, serve_port: int) -> None:
    leftovers = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and (os.getsid(proc.pid) == session_id or _ours(proc, serve_port)):
                leftovers.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for proc in leftovers:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    if leftovers:
        print(f"convserve: cleaned up {len(leftovers)} leftover process(es)", flush=True)


def _relay(stream, log_path: str, verbose: bool) -> None:
    """Everything the server prints goes to the log file; only convserve's own lines (its stages,
    errors it explains) reach the terminal, unless verbose."""
    with open(log_path, "wb") as log:  # this run's log only
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if verbose or line.startswith(b"convserve:"):
                try:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                except OSError:  # the terminal went away: keep draining the pipe into the file
                    verbose = False


def supervise(command: list[str], log_path: str, verbose: bool, grace_s: float = STOP_GRACE_S) -> tuple[int, bool, int]:
    """Run `command` in a session of its own, relaying its output; on SIGINT, SIGTERM or SIGHUP ask
    it to stop (SIGTERM), and kill it if it is still running `grace_s` later.

    (exit code, whether a stop was asked for, the child's pid = its session id)."""
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    relay = threading.Thread(target=_relay, args=(driver.stdout, log_path, verbose), daemon=True)
    relay.start()
    stopping = {"at": None}

    def request_stop(signum, _frame):
        if stopping["at"] is None:
            stopping["at"] = time.monotonic()
            driver.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, request_stop)

    while True:
        try:
            rc = driver.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stopping["at"] is not None and time.monotonic() - stopping["at"] > grace_s:
                print(f"convserve: the server did not stop within {grace_s:g} s; killing it", flush=True)
                driver.kill()
    relay.join(timeout=5)
    return rc, stopping["at"] is not None, driver.pid


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = config_from_args(parse_args(argv))
    preflight([p for p in (config.port, config.metrics_export_port, config.grpc_port) if p], config.port)

    args = parse_args(argv)
    log_path = os.path.join(runtime_dir(config.port), "service.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    shown = "" if args.verbose else "; --verbose shows them here"
    print(f"convserve: starting (Ray's and HAProxy's logs: {log_path}{shown})", flush=True)
    rc, stopped, session_id = supervise([sys.executable, "-m", "service.server", *argv], log_path, args.verbose)
    if rc not in (0, -signal.SIGTERM) and not stopped:
        print(f"convserve: the server exited with {rc}; the end of {log_path}:", flush=True)
        with open(log_path, errors="replace") as f:
            print("".join(f.readlines()[-30:]), end="", flush=True)
    _cleanup(session_id, config.port)
    return 0 if stopped and rc in (0, -signal.SIGTERM) else rc


if __name__ == "__main__":
    sys.exit(main())
