"""loadtests/cpu.py reads real /proc: processes named as the bench's parts, spinning, are counted there."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests import cpu

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")

# A process that names itself (the kernel's 15-byte name, as wrk or Ray's replica title would) and
# spins `spinners` threads, each named too, for `seconds`.
SPIN = """
import ctypes, sys, threading, time
libc = ctypes.CDLL(None)
def name(n): libc.prctl(15, n.encode()[:15], 0, 0, 0)
def spin(n, seconds):
    name(n)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
process, thread, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
name(process)
t = threading.Thread(target=spin, args=(thread, seconds)); t.start()
print("ready", flush=True)
t.join()
"""


def spinning(process: str, thread: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SPIN, process, thread, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize(
    ("process", "thread", "part"),
    [
        ("ray::ServeReplica:convserve", "convserve-fwd0", "lanes"),
        ("ray::ServeReplica:convserve", "asyncio_0", "replica_rest"),
        ("wrk", "wrk", "load_generator"),
        ("haproxy", "haproxy", "haproxy"),
        ("ray::ProxyActor", "ray::ProxyActor", "ray"),
    ],
)
def test_a_spinning_process_is_counted_in_its_part(process, thread, part):
    proc = spinning(process, thread, 1.5)
    try:
        before = cpu.snapshot()
        time.sleep(1.0)
        after = cpu.snapshot()
    finally:
        proc.wait(10)
    shares = cpu.shares(before, after)
    assert shares["cpus"] >= 1
    # one thread spinning: most of one CPU in its part (a busy CI machine may take some of it)
    assert shares[part] >= 40, shares
    for other in ("lanes", "load_generator", "haproxy"):
        if other != part:
            assert shares[other] < 30, shares
    # every part and the idle time fit in the machine
    assert sum(v for k, v in shares.items() if k not in ("cpus", "steal")) <= 100 * shares["cpus"] * 1.1


def test_a_process_that_ended_between_snapshots_is_not_counted():
    proc = spinning("wrk", "wrk", 0.3)
    before = cpu.snapshot()
    proc.wait(10)
    after = cpu.snapshot()
    assert cpu.shares(before, after)["load_generator"] == 0.0


def test_a_python_load_generator_is_counted_by_its_pid():
    """The reliability tests' load generator is a Python process: a load generator by its pid,
    "other" without it."""
    proc = spinning("python3", "python3", 2.5)
    try:
        with_pid = cpu.snapshot(load_generators={proc.pid})
        time.sleep(1.0)
        named = cpu.shares(with_pid, cpu.snapshot(load_generators={proc.pid}))
        without = cpu.snapshot()
        time.sleep(1.0)
        unnamed = cpu.shares(without, cpu.snapshot())
    finally:
        proc.wait(10)
    assert named["load_generator"] >= 40, named
    assert unnamed["load_generator"] < 30 and unnamed["other"] >= 40, unnamed
