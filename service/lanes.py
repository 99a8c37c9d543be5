"""Forward lanes: worker threads that run forward passes side by side, each on its share of the cores.

Why not one forward thread with all of torch's threads? An intra-op team of N threads meets at a
barrier after every layer, so when anything else takes one of its cores (the replica's event
loop decoding the next requests, HAProxy, the load generator, Ray's own processes: Ray runs
replicas at nice 15, below all of them) every thread of the team waits for that one. Measured
on the 2-core machine (`python -m loadtests.microbench lanes [--hog]`, two runs each): the
embedded model's forward pass at batch 16 did 208 and 199 img/s with one 2-thread team, 227 and
220 with two 1-thread lanes; with a process next to it taking about a third of one core, the team
fell to 139 and 133 img/s and the lanes kept 190 and 192. A lane on one thread has no barrier to
wait at.

A batch that starts while no other batch is computing runs on lane 0, the *wide* lane, with all
`torch_threads` (a single request on an idle replica is served as fast as the offline
single-image pass); batches that overlap get `torch_threads // lanes` each. Under OpenMP the team
size is per OS thread, so each lane sets its own (`set_team_size`).

Only the wide lane ever has a team of more than one thread, and every other thread of the process
computes on one (`claim_threads`). libgomp spins only about a hundred times, instead
of some 300,000, at each barrier once the worker threads of all teams in the process outnumber
the CPUs: a barrier then sleeps and wakes through the kernel. On the 2-core machine a second
2-thread team anywhere in the process (the constructor's, or the other lane's) made every 2-thread
pass of the wide lane slower than a 1-thread pass: an elementwise op 36 us -> 210 us, the batch-1
forward 6.6 -> 9.3 ms (`python -m loadtests.microbench teams`).

Pure threads and torch: no Ray, no asyncio.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger(__name__)


# Lanes run below the replica's event loop: the loop answers, decodes, refuses and feeds the next
# batch in short bursts, and on a machine where the lanes keep every core busy it must not wait a
# scheduler slice behind them (a 503 that waits for a forward pass is not a fast refusal). Raising
# a thread's nice value needs no privilege; Ray starts replicas at nice 15, so the lanes run at 19.
LANE_NICE_INCREMENT = 4


def lower_priority(increment: int) -> int | None:
    """Raise this OS thread's nice value by `increment` (at most 19); the new value, or None."""
    try:
        tid = threading.get_native_id()
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return nice
    except (OSError, AttributeError) as e:  # not Linux-like: the lanes run at the loop's priority
        log.warning("forward lanes keep the event loop's priority: cannot lower it (%s)", e)
        return None


# Each lane's OS thread carries this name and its number (`convserve-fwd0`, ...; Linux keeps 15
# bytes), and the OpenMP worker threads a lane starts inherit its name: `top -H` and /proc show
# which threads compute, and `python -m loadtests.bench` counts their CPU apart from the event loop's.
LANE_THREAD_PREFIX = "convserve-fwd"


def name_os_thread(name: str) -> bool:
    """Give the calling OS thread a name the kernel shows (Python's thread names stay in Python)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(15, name.encode()[:15], 0, 0, 0) == 0  # 15: PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: nothing to name
        return False


def _find_omp_set_num_threads() -> Callable[[int], None] | None:
    """libgomp's `omp_set_num_threads`, which torch has loaded: it sizes the calling thread's team
    alone. torch.set_num_threads also sets torch's process-wide default, which every thread that
    has not computed yet picks up at its first op."""
    try:
        fn = ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError) as e:  # not OpenMP (another torch build or platform)
        log.info("no omp_set_num_threads (%s): team sizes go through torch.set_num_threads", e)
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = None
    return fn


_OMP_SET_NUM_THREADS = _find_omp_set_num_threads()


def set_team_size(threads: int) -> None:
    """This OS thread's intra-op team size, leaving torch's process-wide default alone."""
    torch.get_num_threads()  # torch's per-thread first-use setup (it would reset the size below)
    if _OMP_SET_NUM_THREADS is None:
        torch.set_num_threads(threads)
    else:
        _OMP_SET_NUM_THREADS(threads)


def claim_threads(torch_threads: int | None) -> int:
    """The wide lane's team size (`torch_threads`, else torch's default here: Ray derives it from
    the replica's `num_cpus`), and from now on one thread for this thread and for every other
    thread of the process but the lanes. Call it first in a replica, before any torch work (see
    the module docstring for why)."""
    threads = torch_threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def default_lanes(device_type: str, torch_threads: int) -> int:
    """One lane on a GPU (one stream keeps it busy); on a CPU, a lane per thread, at most two."""
    if device_type == "cuda":
        return 1
    return max(1, min(2, torch_threads))


class ForwardLanes:
    """`lanes` worker threads. A batch that finds nothing computing goes to the wide lane 0 (all
    threads); otherwise to the lane that went idle last (a stack, not a queue), so that at low load
    one lane, its OpenMP team and its caches stay warm instead of the lanes taking turns (measured
    by hand offline, batch 1 with 5 ms gaps, one run each on a noisy machine: 14.8 and 18.6 ms
    taking turns against 12.9 and 14.1 ms on one lane). Batches that find every lane busy wait in
    order."""

    def __init__(self, lanes: int, torch_threads: int):
        self.lanes = max(1, lanes)
        self.torch_threads = max(1, torch_threads)
        self.shared_threads = max(1, self.torch_threads // self.lanes)
        self._lock = threading.Lock()
        self._running = 0
        self._idle = list(reversed(range(self.lanes)))  # lane 0 on top
        self._pending: collections.deque[tuple[Future, Callable, tuple, int | None]] = collections.deque()
        self._inboxes = [queue.SimpleQueue() for _ in range(self.lanes)]
        self._local = threading.local()
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"forward_{i}", daemon=True) for i in range(self.lanes)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, fn: Callable[..., T], *args) -> Future[T]:
        """Run `fn(*args)` on a free lane (or the first to free up), on its share of the threads."""
        return self._submit(fn, args, None)

    def _submit(self, fn: Callable, args: tuple, threads: int | None, lane: int | None = None) -> Future:
        future: Future = Future()
        task = (future, fn, args, threads)
        with self._lock:
            if lane is not None:
                self._inboxes[lane].put(task)  # warm-up: this lane, busy or not
            elif self._running == 0 and 0 in self._idle:
                self._idle.remove(0)
                self._inboxes[0].put(task)  # alone: the wide lane
            elif self._idle:
                self._inboxes[self._idle.pop()].put(task)
            else:
                self._pending.append(task)
        return future

    def _work(self, lane: int) -> None:
        name_os_thread(f"{LANE_THREAD_PREFIX}{lane}")
        lower_priority(LANE_NICE_INCREMENT)
        inbox = self._inboxes[lane]
        while True:
            task = inbox.get()
            if task is None:
                return
            while task is not None:
                self._run(lane, *task)
                with self._lock:
                    if self._pending:
                        task = self._pending.popleft()
                    else:
                        task = None
                        if lane not in self._idle:
                            self._idle.append(lane)

    def _run(self, lane: int, future: Future, fn: Callable, args: tuple, threads: int | None) -> None:
        if not future.set_running_or_notify_cancel():
            return
        with self._lock:
            widest = self.torch_threads if lane == 0 else self.shared_threads
            if threads is None:
                threads = widest if self._running == 0 else self.shared_threads
            threads = min(threads, widest)
            self._running += 1
        try:
            if getattr(self._local, "threads", None) != threads:
                set_team_size(threads)
                self._local.threads = threads
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, as an executor does
            future.set_exception(e)
        finally:
            with self._lock:
                self._running -= 1

    def on_every_lane(self, fn: Callable[[], T], threads: int) -> list[T]:
        """Run `fn()` once on each lane's own thread, all at once, with `threads` each (at most what
        that lane may use; warm-up: each lane's first passes pay one-time costs)."""
        futures = [self._submit(fn, (), threads, lane=i) for i in range(self.lanes)]
        return [f.result() for f in futures]

    def on_wide_lane(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the wide lane with all its threads (warm-up)."""
        return self._submit(fn, (), self.torch_threads, lane=0).result()

    def shutdown(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
