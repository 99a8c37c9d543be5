"""Micro-benchmarks behind the README's "Where the time went": pieces of the replica's hot path
measured alone, without Ray or HTTP.

    python -m loadtests.microbench decode      # ms per fixture JPEG: libjpeg-turbo path vs Pillow path
    OMP_NUM_THREADS=1 python -m loadtests.microbench threads   # forward: main thread vs a worker thread
    OMP_NUM_THREADS=1 python -m loadtests.microbench threads --keep-large-allocations
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive python -m loadtests.microbench threads
    python -m loadtests.microbench lanes [--hog]   # one 2-thread forward vs two 1-thread lanes side by side

`threads` mimics a replica (Ray sets OMP_NUM_THREADS from num_cpus: 1; set it as above): torch on
--torch-threads threads, the embedded model in a BatchedPredictor, the p50 of --repeats passes at
batch 1 and 32, first on the main thread and then in a one-thread ThreadPoolExecutor like
ConvServe's forward pool, or the other way round with --worker-first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from loadtests.bench import jpeg_files


def decode_ms(repeats: int) -> dict[str, float]:
    from service.decode import _decode_with_pillow, decode_image_bytes

    datas = [p.read_bytes() for p in jpeg_files()]
    paths = {"decode_image_bytes (libjpeg-turbo)": decode_image_bytes, "Pillow fallback": _decode_with_pillow}
    timings = {}
    for name, decode in paths.items():
        start = time.perf_counter()
        for _ in range(repeats):
            for data in datas:
                decode(data, 40_000_000)
        timings[name] = 1000 * (time.perf_counter() - start) / (repeats * len(datas))
    return timings


def forward_ms(repeats: int, worker_first: bool) -> dict[str, dict[int, float]]:
    from model import DEFAULT_BUNDLE, load_bundle
    from service.predictor import BatchedPredictor, WorkItem

    bundle = load_bundle(DEFAULT_BUNDLE)
    predictor = BatchedPredictor(bundle, "cpu", "bf16", True)
    size = bundle.preprocess.input_size

    def p50_ms(batch_size: int) -> float:
        items = [WorkItem(torch.randn(3, size, size), top_k=1) for _ in range(batch_size)]
        predictor.predict(items)
        predictor.predict(items)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.predict(items)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    def run() -> dict[int, float]:
        return {bs: round(p50_ms(bs), 2) for bs in (1, 32)}

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    out = {}
    for where in ("worker thread", "main thread") if worker_first else ("main thread", "worker thread"):
        out[where] = pool.submit(run).result() if where == "worker thread" else run()
    return out


_HOG = """import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.003:
        pass
    time.sleep(0.005)
"""


def lanes_img_per_s(batch_size: int = 16, seconds: float = 4.0, hog: bool = False) -> dict[str, float]:
    """Forward img/s of one pass on 2 threads against two passes side by side on 1 thread each.

    With `hog`, a process beside it takes about 3 ms of every 8 (roughly a third of a core), as the
    replica's event loop, HAProxy and the load generator do in a served run (service/lanes.py)."""
    import subprocess
    import sys

    from model import DEFAULT_BUNDLE, load_bundle
    from service.predictor import BatchedPredictor, WorkItem, keep_large_allocations

    keep_large_allocations()
    bundle = load_bundle(DEFAULT_BUNDLE)
    predictor = BatchedPredictor(bundle, "cpu", "bf16", True)
    size = bundle.preprocess.input_size
    items = [WorkItem(torch.randn(3, size, size), top_k=1) for _ in range(batch_size)]

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)  # this thread's team
        predictor.predict(items)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predictor.predict(items)
            done += batch_size
        return done / (time.perf_counter() - start)

    side = subprocess.Popen([sys.executable, "-c", _HOG]) if hog else None
    try:
        with ThreadPoolExecutor(2) as pool:
            one = pool.submit(rate, 2).result()
            lanes = sum(f.result() for f in [pool.submit(rate, 1) for _ in range(2)])
    finally:
        if side:
            side.kill()
    return {"one 2-thread pass": round(one, 1), "two 1-thread lanes": round(lanes, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "threads", "lanes"])
    p.add_argument("--hog", action="store_true", help="lanes: a process beside it takes about a third of a core")
    p.add_argument("--batch-size", type=int, default=16, help="lanes: images per forward (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--keep-large-allocations", action="store_true", help="as the replica does at start")
    p.add_argument("--worker-first", action="store_true", help="measure the worker thread first")
    a = p.parse_args(argv)
    if a.what == "decode":
        for name, ms in decode_ms(max(1, a.repeats // 6)).items():
            print(f"{name}: {ms:.3f} ms per 32x32 JPEG")
        return 0
    if a.what == "lanes":
        for how, rate in lanes_img_per_s(a.batch_size, hog=a.hog).items():
            print(f"{how}: {rate:.0f} img/s at batch {a.batch_size}{' (with a hog beside it)' if a.hog else ''}")
        return 0
    torch.set_num_threads(a.torch_threads)
    if a.keep_large_allocations:
        from service.predictor import keep_large_allocations

        print("keep_large_allocations:", keep_large_allocations())
    for where, by_batch in forward_ms(a.repeats, a.worker_first).items():
        print(f"{where}: p50 ms by batch size {by_batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
