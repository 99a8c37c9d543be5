"""The benchmarks run in their short modes and write valid results files (targets are their reports' job)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_bench_quick_writes_results(tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    out = tmp_path / "bench"
    images = tmp_path / "images" / "some-class"  # --images: any folder of JPEGs, searched recursively
    images.mkdir(parents=True)
    for jpeg in sorted((REPO / "tests" / "fixtures" / "cifar10-val-sample").rglob("*.jpg"))[:12]:
        shutil.copy(jpeg, images / jpeg.name)
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--quick", "--no-compare", "--out", str(out),
         "--images", str(tmp_path / "images"), "--concurrency", "1", "8", "--seconds", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == {"folder": str(tmp_path / "images"), "count": 12}
    offline = results["offline"]
    assert offline["images_per_s"] > 0 and offline["single_image_latency_p50_ms"] > 0
    # the single-image figure is the median of three passes, not one noisy pass
    passes = offline["single_image_latency_passes_ms"]
    assert len(passes) == 3 and offline["single_image_latency_p50_ms"] == pytest.approx(sorted(passes)[1], abs=0.01)
    # the limit is the best arrangement measured, lanes included on a CPU with 2+ threads
    lanes = offline["images_per_s_by_batch_2_lanes"]
    best = max([*offline["images_per_s_by_batch"].values(), *lanes.values()])
    assert offline["images_per_s"] == pytest.approx(best)
    assert offline["autocast"] == ("bfloat16" if torch.cuda.is_available() else "float32")  # the service's default
    # measured again after the served runs; served/offline is against the mean of the two
    both = results["offline_limit"]
    assert both["before_images_per_s"] == offline["images_per_s"]
    assert both["after_images_per_s"] == results["offline_after"]["images_per_s"] > 0
    assert both["mean_images_per_s"] == pytest.approx((offline["images_per_s"] + both["after_images_per_s"]) / 2)
    rows = results["served"]["batching_on"]
    assert [r["concurrency"] for r in rows] == [1, 8]
    # concurrency 1: three served runs, each after an offline single-image pass of the same minute
    assert len(rows[0]["p50_ms_passes"]) == 3 and len(rows[0]["offline_single_passes_ms"]) == 3
    assert results["targets"]["p50_c1_minus_offline_single_ms"] == pytest.approx(
        rows[0]["p50_ms"] - rows[0]["offline_single_p50_ms"], abs=0.01
    )
    assert all(r["requests"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert results["targets"]["errors"] == 0
    best_served = max(r["images_per_s"] for r in rows)
    served_over_offline = best_served / both["mean_images_per_s"]
    assert results["targets"]["served_over_offline"] == pytest.approx(served_over_offline, abs=0.001)
    # where the CPU went during a point of 4 s or more (loadtests/cpu.py): the lanes computed, wrk
    # ran, and served/offline splits into the lanes' share and their speed
    share = rows[1]["cpu_percent"]
    assert share["cpus"] == os.cpu_count() and share["lanes"] > 0 and share["load_generator"] > 0
    targets = results["targets"]
    if targets.get("best_concurrency") == 8:  # c=1 (three short runs) has no CPU figures
        assert targets["lanes_share_of_cpu"] == pytest.approx(share["lanes"] / (100 * share["cpus"]), abs=0.001)
        assert targets["served_over_offline"] == pytest.approx(
            targets["lanes_share_of_cpu"] * targets["lanes_speed_vs_offline"], rel=0.01
        )
        assert "CPU at concurrency 8" in proc.stdout
    assert "x offline" in proc.stdout


def test_microbench_decode_reports_both_paths():
    from loadtests.microbench import decode_ms

    timings = decode_ms(repeats=1)
    assert set(timings) == {"decode_image_bytes (libjpeg-turbo)", "Pillow fallback"}
    assert all(ms > 0 for ms in timings.values())


def test_microbench_threads_times_both_threads():
    from loadtests.microbench import forward_ms

    out = forward_ms(repeats=1, worker_first=True)
    assert list(out) == ["worker thread", "main thread"]
    assert all(set(by_batch) == {1, 32} and min(by_batch.values()) > 0 for by_batch in out.values())


def test_microbench_teams_times_the_only_team_and_one_beside_another():
    # its own process: claim_threads sets torch's thread default for the whole process
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.microbench", "teams", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "p50 ms by batch size" in line]
    assert [line.split(":")[0] for line in lines] == [
        "2-thread forward on a worker thread, the only team",
        "2-thread forward on a worker thread, beside another team",
    ]


def test_microbench_lanes_compares_one_team_with_lanes():
    from loadtests.microbench import lanes_img_per_s

    out = lanes_img_per_s(batch_size=2, seconds=0.3, hog=False)
    assert set(out) == {"one 2-thread pass", "two 1-thread lanes"} and min(out.values()) > 0


# --- loadtests/gpubench.py: the GPU benchmark, run here on the CPU -----------------------------------


def test_gpubench_offline_limit_runs_the_predictor_on_this_machine():
    from loadtests.gpubench import machine_info, offline_limit

    machine = machine_info()
    assert machine["cpus"] >= 1 and machine["torch"] and machine["torchvision"] and machine["ray"]
    off = offline_limit([1, 2, 4], seconds=0.2, latency_iters=20)
    assert off["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert off["input"].startswith("uint8 [3, 32, 32]")
    assert set(off["by_batch"]) == {1, 2, 4} and all(v["images_per_s"] > 0 for v in off["by_batch"].values())
    # the limit is the best batch size measured, and the service's max_batch_size is the file's
    assert off["images_per_s"] == max(v["images_per_s"] for v in off["by_batch"].values())
    assert off["service_max_batch_size"] == 32 and off["images_per_s_within_service_max_batch"] == off["images_per_s"]
    assert 0 < off["batch1_p50_ms"] <= off["batch1_p90_ms"] and off["batch1_passes"] >= 20


def _gpubench(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtests.gpubench", "--quick", "--out", str(out), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def test_gpubench_saves_each_point_at_once_and_keeps_them_when_stopped(tmp_path):
    """A device run cut short by its timeout must leave what it measured: results.json is
    rewritten after every point, and SIGTERM stops the service and saves before exiting."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    out = tmp_path / "gpubench"
    proc = _gpubench(out, "--variants", "fused-x1")
    seen = []  # (offline measured, served points) of each version of results.json seen
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                results = json.loads((out / "results.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                results = None  # not written yet (a half-written file is never seen: os.replace)
            if results is not None:
                seen.append((results["offline"] is not None, len(results["points"])))
                if results["points"]:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=150)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, output[-3000:]
    # the file existed before the first served point, with the machine and then the offline limit
    assert (False, 0) in seen and (True, 0) in seen and seen[-1][1] >= 1, seen
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and "signal 15" in results["interrupted"]
    variant = results["variants"]["fused-x1"]
    assert variant["status"] == "interrupted" and variant["replicas_confirmed"], variant
    point = results["points"][0]
    assert point["variant"] == "fused-x1" and point["payload"] == "cifar" and point["concurrency"] == 1
    assert point["images_per_s"] > 0 and point["errors"] == 0 and point["service_cpu_ms_per_request"] > 0
    assert point["x_offline"] == pytest.approx(point["images_per_s"] / results["offline"]["images_per_s"], rel=1e-3)
    if not torch.cuda.is_available():
        assert point["gpu"]["busy_fraction"] == "unknown"
    assert "fused-x1" in (out / "table.txt").read_text() and "interrupted" in output
    # the service it started is gone, by its port (the supervisor, Ray, the replica, HAProxy)
    port = f"--port {variant['port']}"
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if port in " ".join(p.info["cmdline"] or [])]
    with tarfile.open(out / "service-logs.tar.gz") as tar:
        assert "fused-x1.log" in tar.getnames()


@pytest.mark.slow
def test_gpubench_quick_runs_every_variant_on_the_cpu(tmp_path):
    """The whole benchmark as the GPU machine runs it, with the CPU plan (about 5 minutes here)."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    if torch.cuda.is_available():
        pytest.skip("the CPU plan; on a GPU run loadtests/device_check.sh")
    out = tmp_path / "gpubench"
    proc = _gpubench(out)
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"], results.get("interrupted")
    assert set(results["variants"]) == {"fused-x1", "split-x2", "fused-x2", "split-x2-decode-off"}
    assert all(v["status"] == "done" and v["replicas_confirmed"] for v in results["variants"].values())
    by = {}
    for p in results["points"]:
        by.setdefault((p["variant"], p["payload"]), []).append(p["concurrency"])
    for variant in ("fused-x1", "split-x2", "fused-x2"):
        assert by[(variant, "cifar")] == [1, 16]
    assert by[("split-x2", "photo640")] == [8] and by[("split-x2-decode-off", "photo640")] == [8]
    assert all(p["errors"] == 0 and p["images_per_s"] > 0 for p in results["points"])
    summary = results["summary"]
    # multipart requests on the best variant of each topology, 32 images each
    for topology in ("fused", "split"):
        best = summary[f"best_{topology}"]
        assert best["multipart_images_per_s"]["4"] > 0 and (best["variant"], "multipart32") in by
    assert summary["photo_gpu_decode_over_cpu_decode"] > 0 and summary["errors"] == 0
    assert "x off" in output and "CPU-ms/req" in (out / "table.txt").read_text()
