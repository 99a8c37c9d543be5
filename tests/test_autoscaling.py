"""Integration: under load the deployment scales from 1 to 2 replicas, and back after it.

The service runs with a copy of deploy/serve_config.yaml whose autoscaling delays are short and
whose replicas take half a CPU, so two fit on this 2-core machine. The replica count is read
from Serve's own status (`serve.status()` from a second driver attached to the service's Ray).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from service.serve_config import DEFAULT_SERVE_CONFIG, deployment_entry
from tests.server_process import ServiceProcess

pytestmark = pytest.mark.integration

JPEG = (Path(__file__).resolve().parent / "fixtures" / "cifar10-val-sample" / "cat" / "0000.jpg").read_bytes()


def fast_autoscaling_config(tmp_path: Path) -> Path:
    doc = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
    dep = deployment_entry(doc)
    dep["ray_actor_options"]["num_cpus"] = 0.5
    dep["autoscaling_config"].update(
        min_replicas=1,
        initial_replicas=1,
        max_replicas=2,
        target_ongoing_requests=2,
        upscale_delay_s=1,
        downscale_delay_s=5,
        look_back_period_s=2,
    )
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["convserve"].deployments["ConvServe"]
    return status.replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout_s: float, every_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False


def test_replicas_scale_up_under_load_and_down_after(tmp_path):
    import ray

    fast_metrics = {  # how often replicas and handles report load to the autoscaler (default 10 s)
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    }
    svc = ServiceProcess("--serve-config", str(fast_autoscaling_config(tmp_path)), env=fast_metrics).start()
    stop_load = threading.Event()
    answered = {"ok": 0, "other": 0}

    def client():
        session = requests.Session()
        while not stop_load.is_set():
            try:
                r = session.post(
                    svc.base + "/v1/classify", data=JPEG, headers={"Content-Type": "image/jpeg"}, timeout=30
                )
                answered["ok" if r.status_code == 200 else "other"] += 1
            except requests.RequestException:
                answered["other"] += 1

    try:
        address = re.search(r"convserve: ray address (\S+)", svc.log_text()).group(1)
        # RAY_AUTH_MODE=token is set in conftest.py, before ray is imported.
        ray.init(address=address, logging_level="ERROR")
        assert running_replicas() == 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        scaled_up = wait_until(lambda: running_replicas() == 2, timeout_s=120)
        stop_load.set()
        for t in threads:
            t.join(35)
        assert scaled_up, f"no second replica under load; answered {answered}\n{svc.log_tail(30)}"
        assert answered["ok"] > 0 and answered["other"] == 0, answered

        scaled_down = wait_until(lambda: running_replicas() == 1, timeout_s=90)
        assert scaled_down, "did not scale back to one replica after the load stopped"
        assert requests.get(svc.base + "/readyz", timeout=10).status_code == 200
    finally:
        stop_load.set()
        ray.shutdown()
        svc.stop()
