"""ForwardLanes (service/lanes.py): threads, torch thread counts per lane, which lane runs what.
Real threads and real torch; short."""

from __future__ import annotations

import threading
import time

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
