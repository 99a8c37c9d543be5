"""Integration: the `split` topology (service/model_app.py), the real `python -m service --topology split`.

An ingress deployment (routes, checks) hands images through a DeploymentHandle to a model
deployment that batches across every ingress replica. Here every JPEG travels encoded and is
decoded with its batch in the model replica (model_decode: on), as photos are when the model
runs on CUDA; other formats are decoded by the ingress. The contract is the fused one's: the
tests imported from test_serving.py run here again against this module's split service.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.server_process import ServiceProcess
from tests.test_serving import (  # noqa: F401 - the fused contract, collected again against the split service
    classify,
    fixture_jpegs,
    model_info,
    test_classify_large_photo_is_resized,
    test_classify_raw_jpeg,
    test_client_errors_are_json_with_fitting_status,
    test_concurrent_requests_share_a_batch,
    test_feature_maps_errors,
    test_feature_maps_json_all_layers,
    test_feature_maps_values_npy_png,
    test_json_base64_with_top_k_and_invalid_entry,
    test_multipart_results_in_order_with_a_bad_image,
    test_served_predictions_equal_offline_evaluation,
    test_too_many_images_is_413,
)

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 4
PAYLOADS = Path(__file__).resolve().parent.parent / "loadtests" / "payloads"


@pytest.fixture(scope="module")
def service():
    svc = ServiceProcess(
        "--topology",
        "split",
        env={
            "CONVSERVE_BATCH_WAIT_TIMEOUT_S": "0.02",
            "CONVSERVE_MAX_BATCH_SIZE": "16",
            "CONVSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            # Every JPEG travels encoded and is decoded with its batch in the model replica
            # (service/gpu_decode.py, here on the CPU device): the path a GPU model takes for photos.
            "CONVSERVE_MODEL_DECODE": "on",
            "CONVSERVE_MODEL_DECODE_MIN_PIXELS": "0",
        },
    ).start()
    yield svc
    svc.stop()


def _multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def test_the_service_reports_the_split_topology_and_the_model_replica(service, model_info):  # noqa: F811
    assert model_info["topology"] == "split"
    assert model_info["device"] == "cpu"  # the model deployment's device, asked through the handle
    assert model_info["precision"] == "float32"  # and its precision (cpu_amp_dtype off)
    replica = model_info["model_replica"]
    assert {"device", "calls", "items", "batches", "images"} <= set(replica)


def test_v2_statistics_count_the_model_replicas_batches(service):
    """Triton's statistics extension on the split ingress reports what the model replica computed."""
    name = requests.get(service.base + "/v1/model", timeout=10).json()["name"]
    before = requests.get(f"{service.base}/v2/models/{name}/stats", timeout=10).json()["model_stats"][0]
    assert classify(service, fixture_jpegs(1)[0][1]).status_code == 200
    after = requests.get(f"{service.base}/v2/models/{name}/stats", timeout=10).json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 1
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0


def test_a_multi_image_request_is_one_call_to_the_model_deployment(service):
    """40 images in one request: one handle call carrying 40 items, computed in batches of at most 16."""
    jpegs = [data for _, data in fixture_jpegs(40)]
    before = requests.get(service.base + "/v1/model", timeout=10).json()["model_replica"]
    resp = requests.post(service.base + "/v1/classify", files=_multipart(jpegs), params={"top_k": 1}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 40
    after = requests.get(service.base + "/v1/model", timeout=10).json()["model_replica"]
    assert after["calls"] - before["calls"] == 1
    assert after["items"] - before["items"] == 40
    assert after["images"] - before["images"] == 40
    assert after["batches"] - before["batches"] >= 3  # 40 images in passes of at most 16
    assert int(resp.headers["x-batch-size"]) <= 16


def test_concurrent_requests_are_grouped_into_fewer_calls_than_requests(service):
    """Requests that arrive while a call is in flight leave the ingress together (service/grouping.py)."""
    jpegs = [data for _, data in fixture_jpegs(48)]
    before = requests.get(service.base + "/v1/model", timeout=10).json()["model_replica"]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda data: classify(service, data, top_k=1), jpegs))
    assert [r.status_code for r in answers] == [200] * 48
    after = requests.get(service.base + "/v1/model", timeout=10).json()["model_replica"]
    assert after["items"] - before["items"] == 48
    assert after["calls"] - before["calls"] < 48, (before, after)


def test_a_bad_image_fails_alone_in_a_group_with_good_ones(service):
    """Concurrent single-image requests, every third one a truncated JPEG (its header is fine, so
    it travels encoded): the model replica's decode fails it alone with the CPU path's 400; the
    rest of its group and batch is answered 200."""
    good = [data for _, data in fixture_jpegs(12)]
    bodies = [data[: len(data) // 3] if i % 3 == 0 else data for i, data in enumerate(good)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda data: classify(service, data, top_k=1), bodies))
    for i, resp in enumerate(answers):
        if i % 3 == 0:
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_image", resp.text
        else:
            assert resp.status_code == 200, resp.text


def test_the_deadline_holds_across_the_split_with_a_json_504(service):
    """request_timeout_s is 4 s here: the ingress answers 504 `timeout` 3 s after a request started,
    whether it is still decoding or its items wait in the model replica (which then skips them)."""
    # 8 x 60 photos of 1280x960: about 10 ms each to decode on this CPU, then the forward passes;
    # several seconds of work whichever side decodes, against 3 s allowed
    photo = (
        Path(__file__).resolve().parent.parent / "loadtests" / "payloads" / "photo-horse-1280x960.jpg"
    ).read_bytes()
    body = _multipart([photo] * 60)

    def send(_):
        started = time.monotonic()
        resp = requests.post(service.base + "/v1/classify", files=body, params={"top_k": 1}, timeout=60)
        return resp, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    seen = Counter(r.status_code for r, _ in answers)
    assert set(seen) <= {200, 504} and seen[504], seen
    for resp, took in answers:
        if resp.status_code == 504:
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json()["error"]["code"] == "timeout"
            assert took >= REQUEST_TIMEOUT_S - 1 - 0.05, took
    assert classify(service, fixture_jpegs(1)[0][1]).status_code == 200  # and the service still serves


def test_explain_and_kernels_run_on_the_ingress_and_agree_with_the_model_deployment(service, model_info):  # noqa: F811
    """/v1/explain and /v1/kernels use the ingress's CPU copy of the model; its top classes equal
    what ConvModel answers for the same image through /v1/classify."""
    for _, jpeg in fixture_jpegs(3):
        explained = requests.post(
            service.base + "/v1/explain",
            data=jpeg,
            headers={"Content-Type": "image/jpeg"},
            params={"top_k": 3},
            timeout=30,
        )
        assert explained.status_code == 200, explained.text
        body = explained.json()
        classified = classify(service, jpeg, top_k=3).json()["predictions"]
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in classified]
        for a, b in zip(body["predictions"], classified, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-4
    kernels = requests.get(service.base + "/v1/kernels", params={"layer": "stage1"}, timeout=10)
    assert kernels.status_code == 200 and kernels.json()["model"] == model_info["model"]
