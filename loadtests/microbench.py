"""Micro-benchmarks behind the README's "Where the time went": pieces of the replica's hot path
measured alone, without Ray or HTTP.

    python -m loadtests.microbench decode      # ms per fixture JPEG: libjpeg-turbo path vs Pillow path;
                                               # then decode + resize per image: CPU vs batched (gpu_decode)
    OMP_NUM_THREADS=1 python -m loadtests.microbench threads   # forward: main thread vs a worker thread
    OMP_NUM_THREADS=1 python -m loadtests.microbench threads --keep-large-allocations
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive python -m loadtests.microbench threads
    python -m loadtests.microbench lanes [--hog]   # one 2-thread forward vs two 1-thread lanes side by side
    python -m loadtests.microbench teams     # a thread's 2-thread forward: the only team, then beside another

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
from pathlib import Path

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


PAYLOADS = Path(__file__).resolve().parent / "payloads"
BATCH_KINDS = {  # what a batch is made of: the photo payloads, and CIFAR-10 JPEGs (32x32, about 1 KB)
    "photo 640x480": "photo-ship-640x480.jpg",
    "photo 1280x960": "photo-horse-1280x960.jpg",
    "CIFAR 32x32": "cifar-*.jpg",
}


def batch_decode_ms(repeats: int, batch_sizes: tuple[int, ...] = (1, 8, 32)) -> tuple[str, dict[str, dict[str, float]]]:
    """ms per image to get encoded JPEGs to uint8 at the embedded model's input size, two ways: on the
    CPU one image at a time (decode_image_bytes + to_model_size, what a replica does today) and with
    service.gpu_decode.decode_batch on the best device (cuda if there is one, else cpu), per batch size.
    The median of `repeats` passes over one batch; returns the device and {kind: {column: ms}}."""
    from model import DEFAULT_BUNDLE, load_bundle
    from service import gpu_decode
    from service.decode import decode_image_bytes
    from service.gpu_decode import decode_batch

    preset = load_bundle(DEFAULT_BUNDLE).preprocess
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def cpu(batch: list[bytes]) -> None:
        for data in batch:
            preset.to_model_size(decode_image_bytes(data, 40_000_000))

    def batched(batch: list[bytes]) -> None:
        out = decode_batch(batch, preset, device, 40_000_000)
        if any(image is None for image in out):  # timing the CPU's fallback would measure nothing
            raise RuntimeError(f"decode_batch left payloads to the CPU: {dict(gpu_decode.FALLBACKS)}")
        sync()

    def median_ms(run, batch: list[bytes]) -> float:
        run(batch)  # warm-up: CUDA's lazy start and nvjpeg's decoder state are not what is measured
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times) / len(batch)

    out = {}
    for kind, pattern in BATCH_KINDS.items():
        datas = [p.read_bytes() for p in sorted(PAYLOADS.glob(pattern))]
        row = {"CPU per image": median_ms(cpu, datas)}
        for bs in batch_sizes:
            row[f"batch {bs}"] = median_ms(batched, [datas[i % len(datas)] for i in range(bs)])
        out[kind] = row
    return str(device), out


def cpu_predictor():
    """The embedded model's BatchedPredictor on the CPU, as a CPU replica runs it."""
    from model import DEFAULT_BUNDLE, load_bundle
    from service.predictor import BatchedPredictor

    return BatchedPredictor(load_bundle(DEFAULT_BUNDLE), "cpu", "bf16", True)


def forward_p50_ms(predictor, batch_size: int, repeats: int, gap_s: float = 0.0) -> float:
    """p50 ms of `predictor.predict` on `batch_size` random images, after two warm-up passes;
    `gap_s` of sleep between passes."""
    from service.predictor import WorkItem

    size = predictor.bundle.preprocess.input_size
    items = [WorkItem(torch.randn(3, size, size), top_k=1) for _ in range(batch_size)]
    predictor.predict(items)
    predictor.predict(items)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(items)
        times.append(time.perf_counter() - start)
        if gap_s:
            time.sleep(gap_s)
    return 1000 * statistics.median(times)


def forward_ms(repeats: int, worker_first: bool) -> dict[str, dict[int, float]]:
    predictor = cpu_predictor()

    def run() -> dict[int, float]:
        return {bs: round(forward_p50_ms(predictor, bs, repeats), 2) for bs in (1, 32)}

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


def teams_ms(repeats: int, threads: int) -> dict[str, dict[int, float]]:
    """p50 ms of the forward pass at batch 1 and 32 on one worker thread with `threads` threads:
    while its OpenMP team is the only one in the process, then while another live thread also has
    one. With more team threads than CPUs, libgomp spins about 100 times at a barrier instead of
    some 300,000 and sleeps in the kernel (why service/lanes.py gives one lane a wide team)."""
    import queue
    import threading

    from service.lanes import claim_threads, set_team_size
    from service.predictor import keep_large_allocations

    claim_threads(threads)
    keep_large_allocations()
    predictor = cpu_predictor()

    def p50_ms(batch_size: int) -> float:
        return forward_p50_ms(predictor, batch_size, repeats, gap_s=0.002)  # requests arrive with gaps

    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        set_team_size(threads)
        while (job := jobs.get()) is not None:
            job()

    def on_worker() -> dict[int, float]:
        done: queue.SimpleQueue = queue.SimpleQueue()
        jobs.put(lambda: done.put({bs: round(p50_ms(bs), 2) for bs in (1, 32)}))
        return done.get()

    measuring = threading.Thread(target=worker, daemon=True)
    measuring.start()
    out = {"the only team": on_worker()}
    stop = threading.Event()

    def other_team() -> None:  # a second team that stays alive (a pool lives as long as its thread)
        set_team_size(threads)
        torch.randn(256, 4096).mul(2.0)
        stop.wait()

    other = threading.Thread(target=other_team, daemon=True)
    other.start()
    time.sleep(0.5)
    out["beside another team"] = on_worker()
    stop.set()
    jobs.put(None)
    other.join()
    measuring.join()  # a thread with an OpenMP team still running at exit aborts the process
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "threads", "lanes", "teams"])
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
        device, by_kind = batch_decode_ms(max(1, a.repeats // 3))
        print(f"decode + resize to model size, ms per image (CPU: one at a time; batch N: decode_batch on {device}):")
        for kind, row in by_kind.items():
            print(f"  {kind}: " + ", ".join(f"{col} {ms:.3f}" for col, ms in row.items()))
        return 0
    if a.what == "lanes":
        for how, rate in lanes_img_per_s(a.batch_size, hog=a.hog).items():
            print(f"{how}: {rate:.0f} img/s at batch {a.batch_size}{' (with a hog beside it)' if a.hog else ''}")
        return 0
    if a.what == "teams":
        for where, by_batch in teams_ms(a.repeats * 5, a.torch_threads).items():
            print(f"{a.torch_threads}-thread forward on a worker thread, {where}: p50 ms by batch size {by_batch}")
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
