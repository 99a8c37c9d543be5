"""The GPU serving benchmark (issue 12): what the served topologies get out of one GPU.

    python -m loadtests.gpubench --out DIR [--seconds S] [--quick] [--budget-s B] [--variants a,b]

Made for one short run on a lent GPU machine (loadtests/device_check.sh runs it there); on a
machine without CUDA it runs the same stages on the CPU with small sizes, which is how it is
tested (tests/test_bench.py). In order of importance, each figure saved as soon as it is measured
(DIR/results.json and DIR/table.txt are rewritten after every point, so a run cut short by a
timeout still leaves what it measured):

1. the machine: GPU name and memory, CPU count, torch/torchvision/Ray versions;
2. the offline GPU limit: service.predictor.BatchedPredictor on the model's device with the
   service's settings (bf16 autocast, channels_last), uint8 model-size inputs (no decode), batch
   1, 2, 4, ... 256: images/s per batch size, p50 ms of batch 1 (CUDA synchronized around timings);
3. served through HAProxy (`python -m service`, one fresh service per variant), one CIFAR JPEG per
   request at concurrency 1, 64, 256, 512: `fused` x1, `split` with 8 ingress replicas, `fused`
   x4 and x2 sharing the GPU (fractional num_gpus), `split` with 4 ingress replicas; 32-image
   multipart requests at concurrency 8 and 32 on each variant that is the best of its topology so
   far (so the best fused and the best split variant have them); the 640x480 photo at
   concurrency 64 on split x8 with CONVSERVE_MODEL_DECODE=auto (decoded on the GPU) and =off (on
   the CPU). Every served point records images/s, p50/p99, errors, images/s over the offline
   limit, the GPU's busy fraction during the run (nvidia-smi sampled every 200 ms, else pynvml,
   else "unknown"), and the service's CPU-ms per request (loadtests.bench.service_cpu_s).

`--budget-s` bounds the whole run: a variant that would not finish in what is left is skipped
(and said so). Service logs go to `--log-dir` (default DIR/logs) and are packed into
DIR/service-logs.tar.gz after each variant. CONVSERVE_* variables in the environment reach every
service (e.g. CONVSERVE_MAX_BATCH_SIZE=128), except CONVSERVE_MODEL_DECODE, which the photo
points set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch

from loadtests.bench import RAW_JPEG_HEADERS, WRK_LUA, Service, jpeg_files, run_wrk, service_cpu_s

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "loadtests" / "payloads" / "photo-ship-640x480.jpg"
CLASSIFY = "/v1/classify?top_k=1"
MULTIPART_IMAGES = 32
BOUNDARY = "convserve-gpubench-3f9c2a7e"

GPU_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CPU_BATCHES = [1, 2, 4, 8]


# --- the machine -----------------------------------------------------------------------------


def machine_info() -> dict:
    import torchvision

    try:
        import ray

        ray_version = ray.__version__
    except ImportError as e:
        ray_version = f"missing ({e})"
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray_version,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
        }
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()  # fmt: skip
            info["driver"] = driver or "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info


def service_config():
    """The application's settings as `python -m service` resolves them: the Serve config file's
    args and user_config, then CONVSERVE_* variables (service/server.py)."""
    from service.server import config_from_args, parse_args

    return config_from_args(parse_args([]))


# --- the offline limit -----------------------------------------------------------------------


def offline_limit(batch_sizes: list[int], seconds: float, latency_iters: int = 200) -> dict:
    """BatchedPredictor.predict on uint8 model-size images (what the served path hands it), with
    the service's device, autocast and memory layout: images/s per batch size (each batch size
    timed for `seconds`), and batch-1 latency (p50 of `latency_iters` passes, each between two
    CUDA synchronizations)."""
    from model import DEFAULT_BUNDLE, load_bundle
    from service.batcher import make_predictor
    from service.predictor import WorkItem

    config = service_config()
    bundle = load_bundle(config.bundle_path or DEFAULT_BUNDLE)
    predictor = make_predictor(config, bundle)
    cuda = predictor.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    size = bundle.preprocess.input_size
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen) for _ in range(max(batch_sizes))]
    warm = predictor.warmup(batch_sizes)
    by_batch: dict[int, dict] = {}
    for bs in batch_sizes:
        items = [WorkItem(pool[j], top_k=1) for j in range(bs)]
        predictor.predict(items)
        sync()
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            predictor.predict(items)
            n += 1
        sync()
        elapsed = time.perf_counter() - start
        by_batch[bs] = {"images_per_s": round(n * bs / elapsed, 1), "ms_per_batch": round(1000 * elapsed / n, 3)}
    times = []
    deadline = time.perf_counter() + max(2.0, 4 * seconds)
    for i in range(latency_iters):
        item = [WorkItem(pool[i % len(pool)], top_k=1)]
        sync()
        t = time.perf_counter()
        predictor.predict(item)
        sync()
        times.append(1000 * (time.perf_counter() - t))
        if time.perf_counter() > deadline and len(times) >= 20:
            break
    times.sort()
    best = max(by_batch, key=lambda b: by_batch[b]["images_per_s"])
    within = [b for b in by_batch if b <= config.batching.max_batch_size]
    best_within = max(within, key=lambda b: by_batch[b]["images_per_s"]) if within else best
    return {
        "device": str(predictor.device),
        "amp_dtype": str(predictor.amp_dtype).replace("torch.", "") if predictor.amp_dtype else "float32",
        "channels_last": predictor.channels_last,
        "input": f"uint8 [3, {size}, {size}], no decode",
        "torch_threads": torch.get_num_threads(),
        "warmup_s": {b: round(v, 3) for b, v in warm.items()},
        "by_batch": by_batch,
        "images_per_s": by_batch[best]["images_per_s"],
        "best_batch_size": best,
        "service_max_batch_size": config.batching.max_batch_size,
        "images_per_s_within_service_max_batch": by_batch[best_within]["images_per_s"],
        "batch1_p50_ms": round(times[len(times) // 2], 3),
        "batch1_p90_ms": round(times[int(len(times) * 0.9)], 3),
        "batch1_passes": len(times),
    }


# --- GPU busy fraction -------------------------------------------------------------------------


class GpuSampler:
    """Samples the GPU's utilization (the share of time a kernel was running) every 200 ms while
    it is entered: nvidia-smi in a subprocess, else pynvml in a thread, else nothing ("unknown")."""

    _source: str | None = None  # decided once per process

    def __init__(self, interval_ms: int = 200, index: int = 0):
        self.interval_ms, self.index = interval_ms, index
        self.util: list[float] = []
        self.memory_mib: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    _smi_failed = False  # nvidia-smi answered a query but its loop gave no samples

    @classmethod
    def source(cls) -> str:
        if cls._source is None:
            cls._source = "unknown"
            if shutil.which("nvidia-smi") and not cls._smi_failed:
                try:
                    probe = subprocess.run(
                        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                        capture_output=True, text=True, timeout=20,
                    )  # fmt: skip
                    if probe.returncode == 0 and probe.stdout.strip().split(",")[0].strip().isdigit():
                        cls._source = "nvidia-smi"
                except (OSError, subprocess.SubprocessError):
                    pass
            if cls._source == "unknown":
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    pynvml.nvmlDeviceGetHandleByIndex(0)
                    cls._source = "pynvml"
                except Exception:  # noqa: BLE001 - not installed, no driver, no device: all mean "unknown"
                    pass
        return cls._source

    def __enter__(self) -> GpuSampler:
        source = self.source()
        if source == "nvidia-smi":
            # line-buffered where stdbuf exists, so that no sample waits in nvidia-smi's stdio buffer
            line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            self._proc = subprocess.Popen(
                [*line_buffered, "nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms), "-i", str(self.index)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        elif source == "pynvml":
            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
        if self._thread:
            self._thread.start()
        return self

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.util.append(float(parts[0]))
                self.memory_mib.append(float(parts[1]))
            except (ValueError, IndexError):
                continue

    def _poll_nvml(self) -> None:
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        while not self._stop.wait(self.interval_ms / 1000):
            self.util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            self.memory_mib.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)  # as Ctrl-C: nvidia-smi ends its loop and flushes
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(5)
        if self._proc is not None and not self.util and type(self)._source == "nvidia-smi":
            type(self)._source = None  # no sample came through the pipe: decide again (pynvml) next time
            type(self)._smi_failed = True

    def result(self) -> dict:
        source = "nvidia-smi" if self._proc is not None else "pynvml" if self._thread is not None else "unknown"
        if not self.util:
            return {"source": source, "samples": 0, "busy_fraction": "unknown"}
        return {
            "source": source,
            "samples": len(self.util),
            "busy_fraction": round(statistics.fmean(self.util) / 100, 3),
            "util_p50": statistics.median(self.util),
            "memory_used_mib_max": max(self.memory_mib) if self.memory_mib else None,
        }


# --- payloads --------------------------------------------------------------------------------


def multipart_body(images: list[bytes]) -> bytes:
    parts = []
    for i, data in enumerate(images):
        assert BOUNDARY.encode() not in data
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
        parts.append(head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def write_payloads(folder: Path) -> dict[str, tuple[Path, int]]:
    """payload name -> (wrk Lua script, images per request)."""
    jpegs = jpeg_files()
    bodies = folder / "multipart"
    bodies.mkdir(parents=True, exist_ok=True)
    multipart = []
    datas = [p.read_bytes() for p in jpegs]
    for k in range(max(1, len(datas) // MULTIPART_IMAGES)):
        path = bodies / f"{k}.bin"
        path.write_bytes(multipart_body([datas[(k * MULTIPART_IMAGES + j) % len(datas)] for j in range(32)]))
        multipart.append(path)
    kinds = {
        "cifar": (jpegs, RAW_JPEG_HEADERS, 1),
        f"multipart{MULTIPART_IMAGES}": (
            multipart,
            f'{{["Content-Type"] = "multipart/form-data; boundary={BOUNDARY}"}}',
            MULTIPART_IMAGES,
        ),
        "photo640": ([PHOTO], RAW_JPEG_HEADERS, 1),
    }
    out = {}
    for name, (files, headers, per_request) in kinds.items():
        listing = folder / f"{name}.txt"
        listing.write_text("\n".join(str(f) for f in files) + "\n")
        lua = folder / f"{name}.lua"
        lua.write_text(WRK_LUA % {"list": listing, "path": CLASSIFY, "headers": headers})
        out[name] = (lua, per_request)
    return out


# --- the plan --------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    topology: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    work: list[tuple[str, list[int]]] = field(default_factory=list)  # (payload, concurrencies), in order
    multipart: list[int] = field(default_factory=list)  # if the best of its topology so far
    replicas: dict[str, int] = field(default_factory=dict)  # deployment -> replicas to wait for


def _cpus_each(cpus: int, reserved: float, n: int, cap: float = 2.0) -> float:
    """Logical CPUs per replica: what is left after `reserved` (wrk, HAProxy, the model replica)
    shared by `n`, at most `cap`, in quarters, at least a quarter. Ray must be able to place all."""
    return max(0.25, min(cap, int(4 * (cpus - reserved) / n) / 4))


def plan(cuda: bool, cpus: int, quick: bool) -> list[Variant]:
    """The variants in order of importance. On a GPU: fused x1, split x8, fused x4, split x4, the
    photo with CPU decode (split x8), fused x2. On a CPU (tests): the same kinds, smaller."""
    decode_auto = {"CONVSERVE_MODEL_DECODE": "auto"}
    decode_off = {"CONVSERVE_MODEL_DECODE": "off"}
    if cuda:
        single, multi, photo = [1, 64, 256, 512], [8, 32], [64]

        def fused(n: int) -> Variant:
            gpus = f"{1 / n:g}"
            args = ("--replicas", str(n), "--replica-gpus", gpus, "--replica-cpus", f"{_cpus_each(cpus, 3, n):g}")
            return Variant(f"fused-x{n}", "fused", args, {}, [("cifar", single)], multi, {"ConvServe": n})

        def split(k: int, env: dict, work: list, multipart: list[int]) -> Variant:
            args = ("--topology", "split", "--replicas", str(k), "--replica-cpus", f"{_cpus_each(cpus, 5, k):g}",
                    "--model-replicas", "1", "--replica-gpus", "1", "--model-cpus", "2")  # fmt: skip
            name = f"split-x{k}" + ("-decode-off" if env.get("CONVSERVE_MODEL_DECODE") == "off" else "")
            return Variant(name, "split", args, env, work, multipart, {"ConvServe": k, "ConvModel": 1})

        return [
            fused(1),
            split(8, decode_auto, [("cifar", single), ("photo640", photo)], multi),
            fused(4),
            split(4, {}, [("cifar", single)], multi),
            split(8, decode_off, [("photo640", photo)], []),
            fused(2),
        ]
    single = [1, 16] if quick else [1, 64, 256]
    multi, photo = [4], [8]
    split_args = ("--topology", "split", "--replicas", "2", "--replica-cpus", "0.5", "--model-replicas", "1",
                  "--model-cpus", "0.5")  # fmt: skip
    return [
        Variant("fused-x1", "fused", ("--replicas", "1"), {}, [("cifar", single)], multi, {"ConvServe": 1}),
        Variant(
            "split-x2",
            "split",
            split_args,
            decode_auto,
            [("cifar", single), ("photo640", photo)],
            multi,
            {"ConvServe": 2, "ConvModel": 1},
        ),  # fmt: skip
        Variant(
            "fused-x2",
            "fused",
            ("--replicas", "2", "--replica-cpus", "0.5"),
            {},
            [("cifar", single)],
            multi,
            {"ConvServe": 2},
        ),  # fmt: skip
        Variant(
            "split-x2-decode-off",
            "split",
            split_args,
            decode_off,
            [("photo640", photo)],
            [],
            {"ConvServe": 2, "ConvModel": 1},
        ),  # fmt: skip
    ]


# --- served ----------------------------------------------------------------------------------


def healthy_replicas(metrics_port: int) -> dict[str, int]:
    """Healthy replicas per deployment, from Ray Serve's `ray_serve_deployment_replica_healthy`
    gauge on the service's metrics port (one series per replica, 1 when healthy)."""
    try:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except requests.RequestException:
        return {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("ray_serve_deployment_replica_healthy{") or not line.rstrip().endswith(" 1.0"):
            continue
        labels = line[line.index("{") + 1 : line.rindex("}")]
        deployment = next((p.split("=", 1)[1].strip('"') for p in labels.split(",") if p.startswith("deployment=")), "")
        counts[deployment] = counts.get(deployment, 0) + 1
    return counts


def wait_replicas(metrics_port: int, wanted: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Wait until every deployment has its replicas healthy (readyz answers as soon as one
    replica does); returns the last counts seen, complete or not."""
    start = time.monotonic()
    counts: dict[str, int] = {}
    while time.monotonic() - start < timeout_s:
        counts = healthy_replicas(metrics_port)
        if all(counts.get(d, 0) >= n for d, n in wanted.items()):
            break
        if not counts and time.monotonic() - start > 20:
            break  # the gauge is not exported at all: do not wait for it
        time.sleep(1)
    return counts


class Budget:
    def __init__(self, total_s: float | None):
        self.start, self.total_s = time.monotonic(), total_s

    def left(self) -> float:
        return float("inf") if self.total_s is None else self.total_s - (time.monotonic() - self.start)


class Run:
    """The results, rewritten to DIR/results.json (and the table to DIR/table.txt) after each step."""

    def __init__(self, out: Path, log_dir: Path, results: dict):
        self.out, self.log_dir, self.results = out, log_dir, results
        self.started = time.monotonic()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.results["summary"] = summarize(self.results)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.out / "results.json")
        (self.out / "table.txt").write_text(table(self.results) + "\n")

    def pack_logs(self) -> None:
        tmp = self.out / "service-logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.log_dir.glob("*.log")):
                tar.add(path, arcname=path.name)
        os.replace(tmp, self.out / "service-logs.tar.gz")


def _tail(path: Path, max_bytes: int = 2_000_000) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read()


def point(svc: Service, lua: Path, concurrency: int, seconds: float, per_request: int, limit: float) -> dict:
    cpu0 = service_cpu_s(svc.proc.pid)
    with GpuSampler() as gpu:
        row = run_wrk(svc.base, concurrency, seconds, lua)
    cpu_s = service_cpu_s(svc.proc.pid) - cpu0
    answered = row["requests"] - row["non_2xx"]
    row["requests_per_s"] = row["images_per_s"]
    row["images_per_s"] *= per_request
    row |= {
        "images_per_request": per_request,
        "x_offline": round(row["images_per_s"] / limit, 4) if limit else None,
        "gpu": gpu.result(),
        "service_cpu_ms_per_request": round(1000 * cpu_s / max(1, answered), 3),
        "service_cpu_ms_per_image": round(1000 * cpu_s / max(1, answered * per_request), 3),
    }
    return row


def peak(results: dict, variant: str, payload: str = "cifar") -> float:
    rows = [p for p in results["points"] if p["variant"] == variant and p["payload"] == payload]
    return max((p["images_per_s"] for p in rows), default=0.0)


def run_variant(
    v: Variant, run: Run, payloads: dict, seconds: float, warmup_s: float, budget: Budget, ingress: str
) -> None:
    results = run.results
    record = {"topology": v.topology, "args": list(v.args), "env": v.env, "ingress": ingress, "status": "starting"}
    results["variants"][v.name] = record
    limit = (results.get("offline") or {}).get("images_per_s") or 0.0
    t0 = time.monotonic()
    svc = Service(ingress, v.env, run.log_dir, v.args)
    record["port"] = svc.port
    try:
        svc.wait_ready(timeout_s=min(180.0, max(30.0, budget.left() - 20)))
        record["ready_s"] = round(time.monotonic() - t0, 1)
        record["healthy_replicas"] = wait_replicas(svc.metrics_port, v.replicas, timeout_s=60)
        record["replicas_confirmed"] = all(record["healthy_replicas"].get(d, 0) >= n for d, n in v.replicas.items())
        record["start_s"] = round(time.monotonic() - t0, 1)
        record["status"] = "running"
        run.save()
        print(f"gpubench: {v.name} up in {record['start_s']} s, replicas {record['healthy_replicas']}", flush=True)
        work = list(v.work)
        if v.multipart:
            others = [n for n, r in results["variants"].items() if r["topology"] == v.topology and n != v.name]
            best_so_far = max((peak(results, n) for n in others), default=0.0)
        for payload, concurrencies in work:
            lua, per_request = payloads[payload]
            run_wrk(svc.base, min(64, max(concurrencies)), warmup_s, lua)  # warm the path, discard
            for c in concurrencies:
                if budget.left() < seconds + 30:
                    record.setdefault("skipped", []).append(f"{payload} c={c}: out of time")
                    continue
                row = point(svc, lua, c, seconds, per_request, limit)
                row = {"variant": v.name, "topology": v.topology, "payload": payload, **row}
                if payload == "photo640":
                    row["model_decode"] = v.env.get("CONVSERVE_MODEL_DECODE", "auto")
                results["points"].append(row)
                run.save()
                print(
                    f"gpubench: {v.name} {payload} c={c}: {row['images_per_s']:.0f} img/s, p50 {row['p50_ms']:.1f} "
                    f"p99 {row['p99_ms']:.1f} ms, {row['errors']} errors, GPU busy {row['gpu']['busy_fraction']}, "
                    f"{row['service_cpu_ms_per_request']:.2f} CPU-ms/request",
                    flush=True,
                )
            if payload == "cifar" and v.multipart and peak(results, v.name) >= best_so_far:
                work.append((f"multipart{MULTIPART_IMAGES}", v.multipart))
                record["multipart"] = f"best {v.topology} variant so far ({peak(results, v.name):.0f} img/s)"
        try:
            info = requests.get(svc.base + "/v1/model", timeout=10).json()
            record["model_info"] = {k: info.get(k) for k in ("device", "topology", "batching", "admission_limit")}
            if "model_replica" in info:
                record["model_info"]["model_replica"] = info["model_replica"]
        except (requests.RequestException, ValueError) as e:
            record["model_info"] = f"unavailable: {e}"
        record["status"] = "done"
    except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        print(f"gpubench: {v.name} failed: {record['error']}", flush=True)
    finally:
        if record["status"] in ("starting", "running"):
            record["status"] = "interrupted"
        svc.stop()
        record["total_s"] = round(time.monotonic() - t0, 1)
        own_log = Path(svc.log.name)
        try:
            own_log.rename(run.log_dir / f"{v.name}.log")
            server_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"convserve-{svc.port}" / "service.log"
            if server_log.exists():
                (run.log_dir / f"{v.name}-server.log").write_bytes(_tail(server_log))
        except OSError as e:  # the figures are saved below either way; say which log is missing
            print(f"gpubench: {v.name}: could not keep its logs ({e})", flush=True)
        run.save()
        run.pack_logs()


# --- report ----------------------------------------------------------------------------------


def summarize(results: dict) -> dict:
    """The best fused and split variants (peak images/s, one CIFAR JPEG per request), their
    multipart figures, the photo's GPU against CPU decode."""
    summary: dict = {}
    limit = (results.get("offline") or {}).get("images_per_s")
    for topology in ("fused", "split"):
        names = [n for n, r in results.get("variants", {}).items() if r["topology"] == topology]
        scored = {n: peak(results, n) for n in names if peak(results, n) > 0}
        if not scored:
            continue
        best = max(scored, key=scored.get)
        multipart = [p for p in results["points"] if p["variant"] == best and p["payload"].startswith("multipart")]
        summary[f"best_{topology}"] = {
            "variant": best,
            "peak_images_per_s": round(scored[best], 1),
            "x_offline": round(scored[best] / limit, 4) if limit else None,
            "multipart_images_per_s": {p["concurrency"]: round(p["images_per_s"], 1) for p in multipart},
        }
    photo = {p.get("model_decode"): p for p in results.get("points", []) if p["payload"] == "photo640"}
    if "auto" in photo and "off" in photo and photo["off"]["images_per_s"]:
        ratio = photo["auto"]["images_per_s"] / photo["off"]["images_per_s"]
        summary["photo_gpu_decode_over_cpu_decode"] = round(ratio, 3)
    summary["errors"] = sum(p["errors"] for p in results.get("points", []))
    return summary


def table(results: dict) -> str:
    lines = []
    m = results.get("machine", {})
    gpu = f"{m['gpu']} {m['gpu_memory_gib']} GiB" if m.get("gpu") else "no GPU"
    lines.append(
        f"machine: {gpu}, {m.get('cpus')} CPUs, Python {m.get('python')}, torch {m.get('torch')}, "
        f"torchvision {m.get('torchvision')}, Ray {m.get('ray')}"
    )
    off = results.get("offline")
    if off:
        by = ", ".join(f"{b}: {v['images_per_s']:.0f}" for b, v in off["by_batch"].items())
        lines.append(
            f"offline limit ({off['device']}, {off['amp_dtype']}, {off['input']}): {off['images_per_s']:.0f} img/s at "
            f"batch {off['best_batch_size']} ({off['images_per_s_within_service_max_batch']:.0f} at <= "
            f"{off['service_max_batch_size']}); batch 1 p50 {off['batch1_p50_ms']:.2f} ms; img/s by batch: {by}"
        )
    head = (
        f"{'variant':<22}{'payload':<13}{'conc':>5}{'img/s':>9}{'x off':>7}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>7}{'non2xx':>7}{'GPU busy':>9}{'CPU-ms/req':>11}"
    )
    lines += ["", head]
    for p in results.get("points", []):
        busy = p["gpu"]["busy_fraction"]
        busy = f"{busy:.2f}" if isinstance(busy, float) else str(busy)
        ratio = f"{p['x_offline']:.3f}" if p.get("x_offline") is not None else "-"
        payload = p["payload"] + ("/" + p["model_decode"] if p.get("model_decode") else "")
        lines.append(
            f"{p['variant']:<22}{payload:<13}{p['concurrency']:>5}{p['images_per_s']:>9.0f}{ratio:>7}"
            f"{p['p50_ms']:>9.1f}{p['p99_ms']:>9.1f}{p['errors']:>7}{p['non_2xx']:>7}{busy:>9}"
            f"{p['service_cpu_ms_per_request']:>11.2f}"
        )
    for name, r in results.get("variants", {}).items():
        extra = f", {r['error']}" if r.get("error") else ""
        skipped = f", skipped: {r['skipped']}" if r.get("skipped") else ""
        times = f"start {r.get('start_s', '-')} s, total {r.get('total_s', '-')} s"
        lines.append(f"{name}: {r['status']}, {times}{extra}{skipped}")
    lines.append("summary: " + json.dumps(results.get("summary", {})))
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def _stop_on_sigterm() -> None:
    """SIGTERM (a timeout) unwinds like Ctrl-C: the running service is stopped and results saved."""

    def handler(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)  # once
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (results.json, table.txt, service-logs.tar.gz)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per served point (default 5, quick 2)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="warm-up per payload and service (default 2)")
    p.add_argument("--quick", action="store_true", help="shorter points and offline timings")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting work that would end after this")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all of the plan)")
    p.add_argument("--no-offline", action="store_true", help="skip the offline limit")
    p.add_argument("--ingress", choices=["auto", "proxy", "haproxy"], default="auto", help="(default: %(default)s)")
    p.add_argument("--log-dir", default=None, help="service logs (default: OUT/logs)")
    a = p.parse_args(argv)
    _stop_on_sigterm()
    budget = Budget(a.budget_s)
    seconds = a.seconds or (2.0 if a.quick else 5.0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(a.log_dir) if a.log_dir else out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    variants = plan(cuda, cpus, a.quick)
    if a.variants:
        wanted = a.variants.split(",")
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; this machine's plan: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted]

    from service.server import resolve_ingress

    ingress = resolve_ingress(a.ingress)[0]
    results: dict = {
        "complete": False,
        "machine": machine_info(),
        "settings": {
            "seconds_per_point": seconds,
            "warmup_s": a.warmup_s,
            "quick": a.quick,
            "budget_s": a.budget_s,
            "ingress": ingress,
            "plan": [v.name for v in variants],
            "convserve_env": {k: v for k, v in os.environ.items() if k.startswith("CONVSERVE_")},
        },
        "offline": None,
        "variants": {},
        "points": [],
    }
    run = Run(out, log_dir, results)
    run.save()
    print(table({"machine": results["machine"]}).splitlines()[0], flush=True)
    if shutil.which("wrk") is None:
        print("gpubench: wrk not found (apt-get install wrk; on the GPU machine the Ray kit's _bin/)", file=sys.stderr)
    try:
        if not a.no_offline:
            print("gpubench: offline limit ...", flush=True)
            try:
                batches = GPU_BATCHES if cuda else CPU_BATCHES
                results["offline"] = offline_limit(batches, (0.5 if a.quick else 1.0) if cuda else 0.3)
            except Exception as e:  # noqa: BLE001 - the served figures are still worth having
                results["offline_error"] = f"{type(e).__name__}: {e}"
            run.save()
            print(table(results).splitlines()[1], flush=True)
        if shutil.which("wrk") is None:
            results["served_error"] = "wrk not found"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                payloads = write_payloads(Path(tmp))
                starts: list[float] = []  # seconds each service took to come up, to size what is left
                for v in variants:
                    start_estimate = max(starts) if starts else 45.0
                    points = sum(len(cs) for _, cs in v.work) + len(v.multipart)
                    need = start_estimate + points * (seconds + 1.5) + (len(v.work) + 1) * a.warmup_s + 20
                    if budget.left() < need:
                        results["variants"][v.name] = {
                            "topology": v.topology, "args": list(v.args), "env": v.env,
                            "status": f"skipped: {budget.left():.0f} s left, about {need:.0f} s needed",
                        }  # fmt: skip
                        run.save()
                        print(f"gpubench: {v.name} skipped (out of time)", flush=True)
                        continue
                    print(f"gpubench: {v.name}: python -m service {' '.join(v.args)} {v.env or ''}", flush=True)
                    run_variant(v, run, payloads, seconds, a.warmup_s, budget, ingress)
                    record = results["variants"][v.name]
                    if "start_s" in record:
                        starts.append(record["start_s"])
                    elif ingress == "haproxy" and not starts:
                        # nothing has come up yet: the ingress may be what fails; the rest through Ray's proxy
                        ingress = "proxy"
                        results["settings"]["ingress_fallback"] = f"proxy after {v.name} failed with haproxy"
                        print("gpubench: falling back to Ray's Python proxy for the other variants", flush=True)
        results["complete"] = True
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "KeyboardInterrupt"
        print(f"gpubench: interrupted ({results['interrupted']}); partial results kept", flush=True)
    finally:
        run.save()
    print(table(results), flush=True)
    print(f"gpubench: results in {out}", flush=True)
    return 0 if results["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
