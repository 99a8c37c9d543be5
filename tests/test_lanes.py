"""ForwardLanes (service/lanes.py): threads, torch thread counts per lane, which lane runs what.
Real threads and real torch; short."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from service.lanes import ForwardLanes, default_lanes


def test_default_lanes():
    assert default_lanes("cuda", 16) == 1
    assert default_lanes("cpu", 1) == 1
    assert default_lanes("cpu", 2) == 2 and default_lanes("cpu", 8) == 2


def test_a_batch_alone_gets_every_thread_and_overlapping_batches_share_them():
    lanes = ForwardLanes(2, torch_threads=2)
    release = threading.Event()

    def hold() -> int:
        threads = torch.get_num_threads()
        release.wait(5)
        return threads

    first = lanes.submit(hold)
    time.sleep(0.05)
    second = lanes.submit(hold)  # starts while the first still runs
    time.sleep(0.05)
    release.set()
    assert first.result(5) == 2 and second.result(5) == 1
    assert lanes.submit(torch.get_num_threads).result(5) == 2  # alone again
    lanes.shutdown()


def test_at_low_load_one_lane_serves_every_batch():
    lanes = ForwardLanes(2, torch_threads=2)
    names = {lanes.submit(lambda: threading.current_thread().name).result(5) for _ in range(20)}
    assert names == {"forward_0"}  # the lane that went idle last, not the lanes taking turns
    lanes.shutdown()


def test_batches_beyond_the_lanes_wait_and_run_in_order_and_errors_reach_the_caller():
    lanes = ForwardLanes(2, torch_threads=2)
    gate = threading.Event()
    order: list[int] = []
    blockers = [lanes.submit(gate.wait, 5) for _ in range(2)]
    queued = [lanes.submit(order.append, i) for i in range(5)]
    failing = lanes.submit(lambda: 1 / 0)
    gate.set()
    for f in [*blockers, *queued]:
        f.result(5)
    assert order == [0, 1, 2, 3, 4]
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    lanes.shutdown()


def test_on_every_lane_runs_once_on_each_lane_with_the_given_threads():
    lanes = ForwardLanes(2, torch_threads=2)
    seen = lanes.on_every_lane(lambda: (threading.current_thread().name, torch.get_num_threads()), threads=1)
    assert sorted(seen) == [("forward_0", 1), ("forward_1", 1)]
    lanes.shutdown()


def test_lanes_run_below_the_callers_priority():
    import os

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    lanes = ForwardLanes(2, torch_threads=2)
    nice = lanes.on_every_lane(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), threads=1)
    assert nice == [min(19, base + 4)] * 2
    lanes.shutdown()


def test_a_batch_alone_runs_on_the_wide_lane_even_when_another_lane_went_idle_last():
    lanes = ForwardLanes(2, torch_threads=2)
    first_done, second_done = threading.Event(), threading.Event()

    def where(done: threading.Event | None = None) -> tuple[str, int]:
        if done is not None:
            done.wait(5)
        return threading.current_thread().name, torch.get_num_threads()

    first = lanes.submit(where, first_done)
    time.sleep(0.05)
    second = lanes.submit(where, second_done)
    time.sleep(0.05)
    first_done.set()
    assert first.result(5) == ("forward_0", 2)
    time.sleep(0.05)
    second_done.set()  # lane 1 goes idle last: on top of the stack
    assert second.result(5) == ("forward_1", 1)
    time.sleep(0.05)
    assert lanes.submit(where).result(5) == ("forward_0", 2)  # alone: the wide lane, not lane 1
    # asked for more, a narrow lane still computes on its share
    assert lanes.on_every_lane(lambda: where(), threads=2) == [("forward_0", 2), ("forward_1", 1)]
    lanes.shutdown()


# In a fresh process: what OpenMP teams a replica's threads end up with.
TEAMS_SCRIPT = """
import os, threading, time
import torch
from service.lanes import ForwardLanes, claim_threads

def threads_now():
    return len(os.listdir("/proc/self/task"))

before = threads_now()
threads = claim_threads(2)
x = torch.randn(256, 4096)
x.mul(2.0)  # the constructor's thread computes: on one thread now
lanes = ForwardLanes(2, torch_threads=threads)
lanes.on_wide_lane(lambda: x.mul(2.0))
lanes.on_every_lane(lambda: x.mul(2.0), threads=2)
gate = threading.Event()
busy = [lanes.submit(lambda: (gate.wait(5), x.mul(2.0))) for _ in range(2)]
time.sleep(0.05)
gate.set()
[f.result(5) for f in busy]
for _ in range(20):
    lanes.submit(lambda: x.mul(2.0)).result(5)
with_lanes = threads_now()
other = threading.Thread(target=lambda: x.mul(2.0))  # any other thread: one thread, no team
other.start(); other.join()
# A joined thread can stay listed in /proc for a moment while the kernel finishes its exit (seen
# in CI: one run in about 30 counted it); a team it had started would stay for good.
deadline = time.monotonic() + 2.0
while threads_now() > with_lanes and time.monotonic() < deadline:
    time.sleep(0.01)
x.mul(2.0)
print(threads, torch.get_num_threads(), threads_now() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
def test_only_the_wide_lane_has_an_openmp_team_of_more_than_one_thread():
    """libgomp barely spins once the worker threads of all teams outnumber the CPUs, and every
    barrier of the wide lane's 2-thread pass then goes through the kernel (slower than one
    thread). So: 2 lanes + the wide lane's one extra OpenMP thread, and no other team anywhere."""
    out = subprocess.run(
        [sys.executable, "-c", TEAMS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert out.returncode == 0, out.stderr
    wide_threads, default_elsewhere, new_threads = map(int, out.stdout.split())
    assert wide_threads == 2 and default_elsewhere == 1
    assert new_threads == 2 + 1


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads thread names through /proc")
def test_each_lane_thread_carries_its_name_for_top_and_the_bench():
    from service.lanes import LANE_THREAD_PREFIX

    lanes = ForwardLanes(2, torch_threads=2)
    tids = lanes.on_every_lane(threading.get_native_id, threads=1)
    names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in tids]
    assert names == [f"{LANE_THREAD_PREFIX}0", f"{LANE_THREAD_PREFIX}1"]
    assert Path(f"/proc/self/task/{os.getpid()}/comm").read_text().strip() != names[0]  # only the lanes
    lanes.shutdown()
