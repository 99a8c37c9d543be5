"""Where the machine's CPU went during a load point: /proc read twice, the difference by part.

    before = snapshot(); ...load...; after = snapshot(); shares(before, after)
    -> {"lanes": 169.9, "replica_rest": 13.1, "haproxy": 1.6, "load_generator": 1.2, "ray": 9.4,
        "other": 1.0, "idle": 2.5, "steal": 1.0, "cpus": 2}

(`make bench`, 128 connections, results/bench-s22-1, 2026-12-03.)

Percent of one CPU, so a 2-CPU machine has 200 to share. The parts:
- `lanes`: the replica's forward lanes, the threads named `convserve-fwd*` (service/lanes.py; the
  OpenMP threads a lane starts inherit its name);
- `replica_rest`: the replica's other threads: its event loop (HTTP, decode, batching, answers)
  and Ray's threads in the worker;
- `haproxy`, `load_generator` (wrk, and the processes passed as `load_generators`: the
  reliability tests' own Python load generator);
- `ray`: Ray's other processes (controller, proxy actor, HAProxy manager, dashboard and its
  agent, raylet, GCS) and the service's driver and supervisor;
- `other`: everything else (kernel threads, this benchmark, the rest of the machine);
- `idle` and `steal` (time a virtual machine's host took) from /proc/stat.

Linux only: `snapshot()` is None elsewhere. A process or thread that ends between the two
snapshots is not counted, so take the second before the load generator exits.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Collection
from pathlib import Path

from service.lanes import LANE_THREAD_PREFIX

PROC = Path("/proc")
REPLICA_PREFIX = "ray::ServeRepli"  # Ray's title for a Serve replica process, as the kernel keeps it (15 bytes)
RAY_NAMES = ("raylet", "gcs_server")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PARTS = ("lanes", "replica_rest", "haproxy", "load_generator", "ray", "other")


@dataclasses.dataclass
class Snapshot:
    at: float  # time.monotonic()
    cpu_s: dict[tuple[int, int, str], float]  # (pid or tid, start time, part) -> CPU seconds so far
    idle_ticks: int
    steal_ticks: int
    cpus: int


def _stat(path: Path) -> tuple[str, int, float] | None:
    """(comm, start time in ticks, CPU seconds) of a process or thread, None if it is gone."""
    try:
        raw = path.read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS


def _part(pid: int, comm: str, load_generators: Collection[int]) -> str:
    if comm == "haproxy":
        return "haproxy"
    if comm == "wrk" or pid in load_generators:
        return "load_generator"
    if comm.startswith("ray::") or comm in RAY_NAMES:
        return "ray"
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "other"
    # Ray's Python processes (dashboard, log monitor, ...) and the service's supervisor and driver
    return "ray" if b"/ray/" in cmdline or b"-m service" in cmdline else "other"


def snapshot(load_generators: Collection[int] = ()) -> Snapshot | None:
    """CPU seconds so far per process (per thread in a replica); `load_generators`: pids counted
    as the load generator whatever their name."""
    if not (PROC / "stat").exists():
        return None
    cpu_s: dict[tuple[int, int, str], float] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(entry / "stat")
        if stat is None:
            continue
        comm, started, seconds = stat
        if not comm.startswith(REPLICA_PREFIX):
            cpu_s[(pid, started, _part(pid, comm, load_generators))] = seconds
            continue
        try:
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            thread = _stat(task / "stat")
            if thread is not None:
                part = "lanes" if thread[0].startswith(LANE_THREAD_PREFIX) else "replica_rest"
                cpu_s[(int(task.name), thread[1], part)] = thread[2]
    fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return Snapshot(time.monotonic(), cpu_s, fields[3] + fields[4], fields[7] if len(fields) > 7 else 0, os.cpu_count())


def shares(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Percent of one CPU per part between the two snapshots (processes alive at both)."""
    elapsed = max(1e-6, after.at - before.at)
    out = dict.fromkeys(PARTS, 0.0)
    for key, seconds in after.cpu_s.items():
        if key in before.cpu_s:
            out[key[2]] += seconds - before.cpu_s[key]
    result = {part: round(100 * out[part] / elapsed, 1) for part in PARTS}
    result["idle"] = round(100 * (after.idle_ticks - before.idle_ticks) / TICKS / elapsed, 1)
    result["steal"] = round(100 * (after.steal_ticks - before.steal_ticks) / TICKS / elapsed, 1)
    result["cpus"] = after.cpus
    return result
