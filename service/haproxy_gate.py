"""Admission control in HAProxy itself, in front of the replicas' own (service/middleware.py).

Under heavy overload most requests are refused, and a refusal answered by a replica still costs
Python work in Ray's HTTP server and our middleware, on the cores the forward pass needs: at 8x
capacity on the 2-core machine that took most of the goodput (docs/reliability.md). HAProxy
answers the same 503 in C, before a replica sees the request, by the same two limits as
`AdmissionGate`: per replica, `normal` requests in flight, and `overloaded` while it has refused
one in the last second. Each replica keeps its own gate (gRPC, the Python proxy, Kubernetes).

Ray Serve writes HAProxy's configuration and has no place for rules of one's own, so `python -m
service` points `RAY_SERVE_HAPROXY_BINARY_PATH` at a launcher (`write_launcher`) that runs this
module: it adds the rules below to the file Ray passes with `-f`, then becomes the real haproxy
(exec, same arguments, so Ray's reloads and stats sockets work as before). Standard library only.

    python -m service.haproxy_gate --haproxy /usr/sbin/haproxy --normal 128 --overloaded 64 -- -db -f haproxy.cfg
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

MARKER = "# convserve admission control (service/haproxy_gate.py)"
RETRY_AFTER_S = 1
REFUSAL_DELAY_MS = 50  # refusals leave this late, so that clients that resend at once are slowed
MESSAGE = f"the service is at capacity; retry after {RETRY_AFTER_S} s"
# The routes that run the model: service.middleware.is_guarded, as HAProxy ACLs.
GUARDED = "acl cs_guarded path /v1/classify /v1/feature-maps /v1/explain"
GUARDED_V2 = r"acl cs_guarded path_reg ^/v2/models/[^/]+(/versions/[^/]+)?/infer$"


# One entry: gpc1 counts the gate's refusals, and its rate over the last second says whether the
# gate is refusing now; gpc0 counts those it answered itself (HAProxy's stats socket: `show table
# cs_overload`), all but the first of each overload, which goes on to the replica (SIGNAL_HEADER).
STATE_TABLE_NAME = "cs_overload"
STATE_TABLE = [f"backend {STATE_TABLE_NAME}", "    stick-table type integer size 1 expire 1h store gpc0,gpc1_rate(1s)"]
# The header on that first refusal: its value is the replica's `overload_signal_token`
# (service/middleware.py, OVERLOAD_SIGNAL_HEADER); a client's own is removed.
SIGNAL_HEADER = "x-convserve-overload"


def refusals_in_table(answer: str) -> int:
    """The refusal count in HAProxy's answer to `show table cs_overload` (0 when it has none yet; the
    count starts again after an hour without a guarded request)."""
    return sum(int(m.group(1)) for m in re.finditer(r"\bgpc0=(\d+)", answer))


def _haproxy_string(body: dict) -> str:
    """A JSON body as an HAProxy double-quoted string."""
    return '"' + json.dumps(body, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"') + '"'


def gate_rules(backend: str, normal: int, overloaded: int, signal: str | None = None) -> list[str]:
    """The frontend's rules: refuse a guarded request while `backend` holds `normal` requests per
    UP server, or `overloaded` per server while a refusal was counted in the last second.

    With `signal`, the first refusal after a second without one is not answered here: it goes on
    to a replica with SIGNAL_HEADER: `signal`, and the replica, full too, refuses it and sheds the
    requests it admitted just before (service/middleware.py, AdmissionGate.refused). Without it
    the replica would learn of the overload only when it refuses one itself, which it never does
    while HAProxy refuses first: the requests admitted under the normal limit before the first
    refusal would wait behind up to `normal` requests, twice the wait of every later one."""
    v1 = _haproxy_string({"error": {"code": "overloaded", "message": MESSAGE}})
    v2 = _haproxy_string({"error": MESSAGE})
    # A tarpit: the 503 leaves after REFUSAL_DELAY_MS. Answered at once, clients that resend
    # without waiting (a closed loop past the limit, which ignores Retry-After) spun at 61,000
    # refusals/s, and wrk and HAProxy took the cores from the forward pass (32 answers in 4 s).
    refuse = f"http-request tarpit deny_status 503 content-type application/json hdr Retry-After {RETRY_AFTER_S}"
    rules = [
        MARKER,
        f"timeout tarpit {REFUSAL_DELAY_MS}ms",
        GUARDED,
        GUARDED_V2,
        "acl cs_v2 path_beg /v2/",
        f"http-request del-header {SIGNAL_HEADER}",
        f"http-request track-sc2 int(1) table {STATE_TABLE_NAME} if cs_guarded",
        f"http-request set-var(txn.cs_normal) nbsrv({backend}),mul({normal}) if cs_guarded",
        f"http-request set-var(txn.cs_overloaded) nbsrv({backend}),mul({overloaded}) if cs_guarded",
        f"acl cs_full be_conn({backend}),sub(txn.cs_normal) ge 0",
        f"acl cs_full_overloaded be_conn({backend}),sub(txn.cs_overloaded) ge 0",
        f"acl cs_refusing sc2_gpc1_rate({STATE_TABLE_NAME}) gt 0",
        "http-request set-var(txn.cs_refuse) bool(true) if cs_guarded cs_full"
        " || cs_guarded cs_refusing cs_full_overloaded",
    ]
    if signal is not None:  # the first refusal of an overload goes on, marked (before the count moves)
        rules.append("http-request set-var(txn.cs_signal) bool(true) if { var(txn.cs_refuse) -m bool } !cs_refusing")
        rules.append(f"http-request set-header {SIGNAL_HEADER} {signal} if {{ var(txn.cs_signal) -m bool }}")
    here = "{ var(txn.cs_refuse) -m bool } !{ var(txn.cs_signal) -m bool }"  # refusals HAProxy answers
    return [
        *rules,
        "http-request sc-inc-gpc1(2) if { var(txn.cs_refuse) -m bool }",
        f"http-request sc-inc-gpc0(2) if {here}",
        # No request-log line for a refusal: Ray's HAProxyManager parses every line in Python for
        # its ingress metrics, 14% of a CPU at 1,300 requests/s, most refused (docs/reliability.md); the count
        # above is exported instead (service/server.py, convserve_haproxy_refusals_total).
        f"http-request set-log-level silent if {here}",
        f"{refuse} string {v2} if {here} cs_v2",
        f"{refuse} string {v1} if {here}",
    ]


def patch_config(text: str, normal: int, overloaded: int, signal: str | None = None) -> str:
    """Ray's configuration with the gate added to `frontend http_frontend`, before its first
    `use_backend`. Unchanged when already patched, or when the frontend does not route to exactly
    one application (the gate is per application; a configuration it does not know is left alone)."""
    if MARKER in text:
        return text
    lines = text.splitlines()
    try:
        start = lines.index("frontend http_frontend")
    except ValueError:
        return text
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    routes = [(i, m.group(1)) for i in range(start, end) if (m := re.match(r"\s+use_backend (\S+) if ", lines[i]))]
    if len({backend for _, backend in routes}) != 1:
        return text
    first, backend = routes[0]
    rules = ["    " + rule for rule in gate_rules(backend, normal, overloaded, signal)]
    return "\n".join([*lines[:first], *rules, *lines[first:], *STATE_TABLE]) + "\n"


def write_launcher(directory: str, haproxy: str, normal: int, overloaded: int, signal: str | None = None) -> str:
    """An executable that Ray can start as its haproxy binary; its path. Only its owner may read it
    (it holds the signal token)."""
    path = Path(directory) / "haproxy-with-gate"
    command = [sys.executable, "-m", "service.haproxy_gate", "--haproxy", haproxy]
    command += ["--normal", str(normal), "--overloaded", str(overloaded)]
    command += ["--signal", signal] if signal is not None else []
    path.write_text(f'#!/bin/sh\nexec {shlex.join([*command, "--"])} "$@"\n')
    path.chmod(0o700)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haproxy", required=True, help="the real haproxy binary")
    p.add_argument("--normal", type=int, required=True, help="requests in flight per replica")
    p.add_argument("--overloaded", type=int, required=True, help="the same while refusing")
    p.add_argument(
        "--signal", help=f"send the first refusal of an overload on to the replica with {SIGNAL_HEADER}: SIGNAL"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then haproxy's own arguments")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if "-f" in args[:-1]:
        config = Path(args[args.index("-f") + 1])
        text = config.read_text()
        patched = patch_config(text, a.normal, a.overloaded, a.signal)
        if patched != text:
            config.write_text(patched)
    os.execv(a.haproxy, [a.haproxy, *args])


if __name__ == "__main__":
    main()
