"""Integration: the real `python -m service` (Ray Serve, local Ray) over HTTP.

One service per module, started as `make serve` starts it and stopped by process id.
"""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from model import DEFAULT_BUNDLE, load_bundle
from model.evaluate import predict_logits
from tests.server_process import ServiceProcess

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cifar10-val-sample"


def fixture_jpegs(n: int) -> list[tuple[str, bytes]]:
    """n images spread over the classes: (class name, JPEG bytes)."""
    classes = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    files = [sorted((FIXTURES / c).glob("*.jpg")) for c in classes]
    out = []
    for i in range(n):
        path = files[i % len(classes)][i // len(classes)]
        out.append((path.parent.name, path.read_bytes()))
    return out


def reencode(jpeg: bytes, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service():
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.skip("embedded bundle not trained yet (make train)")
    # A longer batch window than the default so that concurrent test requests reliably share a batch.
    svc = ServiceProcess(env={"CONVSERVE_BATCH_WAIT_TIMEOUT_S": "0.02", "CONVSERVE_MAX_BATCH_SIZE": "16"}).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def model_info(service):
    return requests.get(service.base + "/v1/model", timeout=10).json()


def classify(service, body: bytes, content_type: str = "image/jpeg", **params) -> requests.Response:
    return requests.post(
        service.base + "/v1/classify", data=body, headers={"Content-Type": content_type}, params=params, timeout=30
    )


def assert_error(resp: requests.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert "Traceback" not in resp.text and "/work/" not in resp.text
    if code:
        assert body["error"]["code"] == code, body
    return body


# --- classification -------------------------------------------------------------------------


def test_classify_raw_jpeg(service, model_info):
    label, jpeg = fixture_jpegs(1)[0]
    resp = classify(service, jpeg, top_k=3)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == model_info["model"]
    preds = body["predictions"]
    assert len(preds) == 3
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert all(model_info["labels"][p["index"]] == p["label"] for p in preds)
    assert int(resp.headers["x-batch-size"]) >= 1
    # Server-Timing: ms waiting for the batch, in the forward pass, in the replica in all
    timing = dict(re.findall(r"(\w+);dur=([0-9.]+)", resp.headers["server-timing"]))
    assert set(timing) == {"queue", "inference", "total"}
    queue, inference, total = (float(timing[k]) for k in ("queue", "inference", "total"))
    assert inference > 0 and queue >= 0 and total >= queue + inference


def test_default_top_k_is_5_and_all_classes_allowed(service, model_info):
    _, jpeg = fixture_jpegs(1)[0]
    assert len(classify(service, jpeg).json()["predictions"]) == 5
    everything = classify(service, jpeg, top_k=len(model_info["labels"])).json()["predictions"]
    assert len(everything) == len(model_info["labels"])
    assert abs(sum(p["score"] for p in everything) - 1.0) < 1e-3


@pytest.mark.parametrize(
    "fmt,content_type,kwargs",
    [
        ("PNG", "image/png", {}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
        ("TIFF", "image/tiff", {}),
        ("PNG", "application/octet-stream", {}),
    ],
)
def test_classify_every_raw_media_type(service, fmt, content_type, kwargs):
    _, jpeg = fixture_jpegs(1)[0]
    resp = classify(service, reencode(jpeg, fmt, **kwargs), content_type, top_k=2)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["predictions"]) == 2


def test_classify_large_photo_is_resized(service):
    _, jpeg = fixture_jpegs(1)[0]
    big = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((640, 480))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    assert classify(service, buf.getvalue()).status_code == 200


def test_multipart_results_in_order_with_a_bad_image(service):
    images = fixture_jpegs(3)
    files = [("image", ("a.jpg", images[0][1], "image/jpeg")), ("image", ("bad.jpg", b"not an image", "image/jpeg"))]
    files.append(("image", ("c.jpg", images[2][1], "image/jpeg")))
    resp = requests.post(service.base + "/v1/classify", files=files, params={"top_k": 2}, timeout=30)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 3
    assert len(results[0]["predictions"]) == 2 and len(results[2]["predictions"]) == 2
    assert results[1]["error"]["code"] == "invalid_image"
    # the good images got the same answer they get alone
    alone = classify(service, images[0][1], top_k=2).json()["predictions"]
    assert [p["label"] for p in alone] == [p["label"] for p in results[0]["predictions"]]


def test_json_base64_with_top_k_and_invalid_entry(service):
    images = fixture_jpegs(2)
    payload = {"images": [base64.b64encode(images[0][1]).decode(), "%%%not-base64%%%", 17], "top_k": 3}
    resp = requests.post(service.base + "/v1/classify", json=payload, timeout=30)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results[0]["predictions"]) == 3
    assert results[1]["error"]["code"] == "invalid_base64"
    assert results[2]["error"]["code"] == "invalid_base64"


@pytest.mark.parametrize("top_k", ["0", "-1", "11", str(10**9), "abc", "2.5"])
def test_bad_top_k_is_400(service, top_k):
    _, jpeg = fixture_jpegs(1)[0]
    assert_error(classify(service, jpeg, top_k=top_k), 400, "invalid_parameter")


# --- errors ----------------------------------------------------------------------------------


def test_client_errors_are_json_with_fitting_status(service):
    _, jpeg = fixture_jpegs(1)[0]
    assert_error(classify(service, jpeg, "text/plain"), 415, "unsupported_media_type")
    assert_error(classify(service, b""), 400, "invalid_image")
    assert_error(classify(service, np.random.default_rng(0).bytes(3000)), 400, "invalid_image")
    assert_error(classify(service, jpeg[: len(jpeg) // 2]), 400, "invalid_image")
    assert_error(classify(service, b"{not json", "application/json"), 422, "malformed_json")
    assert_error(classify(service, b'{"images": "x"}', "application/json"), 422)
    no_boundary = classify(service, b"--xx\r\ngarbage", "multipart/form-data")
    assert_error(no_boundary, 422, "malformed_multipart")
    no_parts = classify(service, b"--xx\r\ngarbage", "multipart/form-data; boundary=xx")
    assert_error(no_parts, 400, "no_image")  # parses as a form with no part named 'image'
    no_image_part = requests.post(service.base + "/v1/classify", files=[("other", ("a.jpg", jpeg))], timeout=30)
    assert_error(no_image_part, 400, "no_image")
    assert_error(requests.get(service.base + "/nope", timeout=10), 404)


def test_body_over_limit_is_413(service):
    resp = classify(service, b"\xff\xd8\xff" + b"\0" * (9 * 1024 * 1024))
    assert_error(resp, 413, "body_too_large")


def test_too_many_images_is_413(service):
    _, jpeg = fixture_jpegs(1)[0]
    encoded = base64.b64encode(jpeg).decode()
    resp = requests.post(service.base + "/v1/classify", json={"images": [encoded] * 65}, timeout=30)
    assert_error(resp, 413, "too_many_images")


def test_service_still_healthy_after_errors(service):
    _, jpeg = fixture_jpegs(1)[0]
    assert classify(service, jpeg).status_code == 200
    assert requests.get(service.base + "/readyz", timeout=10).status_code == 200


# --- feature maps ----------------------------------------------------------------------------


def test_feature_maps_json_all_layers(service, model_info):
    _, jpeg = fixture_jpegs(1)[0]
    resp = requests.post(
        service.base + "/v1/feature-maps", data=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    layers = resp.json()["layers"]
    assert [layer["name"] for layer in layers] == [layer["name"] for layer in model_info["layers"]]
    for got, described in zip(layers, model_info["layers"], strict=True):
        assert got["shape"] == described["shape"]
        assert got["stride"] == described["stride"] and got["receptive_field"] == described["receptive_field"]
        assert len(got["channel_mean"]) == got["shape"][0] == len(got["channel_max"])
        assert all(mx >= mean for mx, mean in zip(got["channel_max"], got["channel_mean"], strict=True))
        assert "values" not in got


def test_feature_maps_values_npy_png(service, model_info):
    _, jpeg = fixture_jpegs(1)[0]
    url = service.base + "/v1/feature-maps"
    headers = {"Content-Type": "image/jpeg"}
    as_json = requests.post(url, data=jpeg, headers=headers, params={"layer": "stage2", "include": "values"}).json()
    layer = as_json["layers"][0]
    values = np.frombuffer(base64.b64decode(layer["values"]["data"]), dtype="<f4").reshape(layer["shape"])
    npy = requests.post(url, data=jpeg, headers=headers, params={"layer": "stage2", "format": "npy"})
    assert npy.status_code == 200
    array = np.load(io.BytesIO(npy.content), allow_pickle=False)
    assert array.dtype == np.float32 and list(array.shape) == layer["shape"]
    np.testing.assert_allclose(array, values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(array.reshape(array.shape[0], -1).mean(1), layer["channel_mean"], atol=1e-4)
    png = requests.post(url, data=jpeg, headers=headers, params={"layer": "stage1", "format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.width >= 48 and img.height >= 48


def test_feature_maps_errors(service):
    _, jpeg = fixture_jpegs(1)[0]
    url = service.base + "/v1/feature-maps"
    headers = {"Content-Type": "image/jpeg"}
    assert_error(requests.post(url, data=jpeg, headers=headers, params={"layer": "nope"}), 404, "unknown_layer")
    assert_error(requests.post(url, data=jpeg, headers=headers, params={"format": "gif"}), 400, "invalid_parameter")
    two = {"layer": ["stage1", "stage2"], "format": "png"}
    assert_error(requests.post(url, data=jpeg, headers=headers, params=two), 400, "invalid_parameter")
    assert_error(requests.post(url, data=b"junk", headers=headers), 400, "invalid_image")


# --- model, health, docs ---------------------------------------------------------------------


def test_model_health_and_docs(service, model_info, bundle):
    assert model_info["weights_sha256"] == bundle.weights_sha256
    assert model_info["input_size"] == 32 and len(model_info["labels"]) == 10
    assert [layer["name"] for layer in model_info["layers"]] == ["stem", "stage1", "stage2", "stage3", "pool", "head"]
    assert model_info["accuracy"]["val_top1_shipped"] > 0.9
    assert requests.get(service.base + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(service.base + "/readyz", timeout=10).status_code == 200
    spec = requests.get(service.base + "/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/feature-maps", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    assert requests.get(service.base + "/docs", timeout=10).status_code == 200


# --- batching and parity with offline evaluation ---------------------------------------------


def test_concurrent_requests_share_a_batch(service):
    images = fixture_jpegs(16)
    alone = [classify(service, jpeg, top_k=1).json()["predictions"][0] for _, jpeg in images]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda item: classify(service, item[1], top_k=1), images))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    for r, single in zip(responses, alone, strict=True):
        got = r.json()["predictions"][0]
        assert got["label"] == single["label"] and abs(got["score"] - single["score"]) < 1e-4


def test_served_predictions_equal_offline_evaluation(service, bundle):
    """`model.evaluate`'s own path (load_image_folder, normalize, predict_logits) on the same files."""
    from model.data import load_image_folder

    offline = load_image_folder(FIXTURES, bundle.preprocess, classes=bundle.labels)
    picks = range(0, len(offline.paths), 7)  # 29 of the 200 files, every class
    logits = predict_logits(bundle.model, bundle.preprocess.normalize(offline.images[list(picks)]))
    probs = torch.softmax(logits, dim=1)
    jpegs = [(FIXTURES / offline.paths[i]).read_bytes() for i in picks]
    payload = {"images": [base64.b64encode(jpeg).decode() for jpeg in jpegs], "top_k": 1}
    served = requests.post(
        service.base + "/v1/classify",
        data=json.dumps(payload),
        headers={"Content-Type": "application/json"},
        timeout=60,
    ).json()["results"]
    for row, result in enumerate(served):
        top = result["predictions"][0]
        assert top["index"] == int(probs[row].argmax())
        assert abs(top["score"] - float(probs[row].max())) < 1e-4


# --- metrics ---------------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "convserve-dashboard.json"
# Ray's node GPU metrics exist only on nodes with a GPU.
GPU_ONLY_METRICS = {"ray_node_gram_used", "ray_node_gpus_utilization"}


def scrape(service) -> dict[str, list]:
    """Sample name -> [(labels, value)] from the running service's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == val for k, val in labels.items()))


def wait_for(predicate, timeout_s: float = 60.0):
    """Ray exports metrics every few seconds: poll until `predicate(scrape)` holds."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if last or time.monotonic() > deadline:
            return last
        time.sleep(1.0)


def settled_scrape(service, name: str = "ray_convserve_images_total") -> dict:
    """A scrape whose `name` total no longer changes: Ray exports in periodic batches."""
    import time

    last = scrape(service)
    for _ in range(8):
        time.sleep(11.0)  # longer than Ray's metrics report interval (10 s)
        now = scrape(service)
        if name in now and total(now, name) == total(last, name):
            return now
        last = now
    return last


def test_metrics_move_by_the_expected_amounts(service):
    before = settled_scrape(service)
    images_before = total(before, "ray_convserve_images_total", endpoint="classify")
    ok_before = total(before, "ray_convserve_requests_total", endpoint="classify", status="200")
    bad_before = total(before, "ray_convserve_requests_total", endpoint="classify", status="415")
    invalid_before = total(before, "ray_convserve_requests_total", endpoint="classify", status="400")
    batches_before = total(before, "ray_convserve_batch_size_count")
    inference_before = total(before, "ray_convserve_inference_seconds_count")
    waits_before = total(before, "ray_convserve_queue_wait_seconds_count")
    multi_before = total(before, "ray_convserve_batch_size_count") - total(
        before, "ray_convserve_batch_size_bucket", le="1.0"
    )
    preprocess_before = total(before, "ray_convserve_preprocess_seconds_count")

    images = fixture_jpegs(8)
    for _, jpeg in images[:7]:
        assert classify(service, jpeg).status_code == 200
    assert classify(service, images[0][1], "text/plain").status_code == 415
    bad_param = requests.post(service.base + "/v1/classify?top_k=abc", data=images[0][1], timeout=30)
    assert bad_param.status_code == 400  # answered by the validation handler, before the route
    with ThreadPoolExecutor(8) as pool:
        sizes = [int(r.headers["x-batch-size"]) for r in pool.map(lambda i: classify(service, i[1]), images)]
    assert max(sizes) > 1

    def moved():
        now = scrape(service)
        done = total(now, "ray_convserve_images_total", endpoint="classify") >= images_before + 15
        return now if done and total(now, "ray_convserve_batch_size_count") > 0 else None

    assert wait_for(moved), "metrics did not move within 60 s"
    after = settled_scrape(service)
    # 7 + 8 images; the 415 request is refused before its body is read as an image
    assert total(after, "ray_convserve_images_total", endpoint="classify") == images_before + 15
    assert total(after, "ray_convserve_requests_total", endpoint="classify", status="200") == ok_before + 15
    assert total(after, "ray_convserve_requests_total", endpoint="classify", status="415") == bad_before + 1
    multi_after = total(after, "ray_convserve_batch_size_count") - total(
        after, "ray_convserve_batch_size_bucket", le="1.0"
    )
    assert multi_after > multi_before, "the concurrent requests should show up above the batch-size-1 bucket"
    assert total(after, "ray_convserve_requests_total", endpoint="classify", status="400") == invalid_before + 1
    assert total(after, "ray_convserve_preprocess_seconds_count") == preprocess_before + 15
    # 15 images went through batches, each with one queue wait. (Not the batch sizes' _sum: in one
    # run it moved 56 -> 65.5 for these 15 images, a fraction no integer batch size gives; unexplained.)
    assert total(after, "ray_convserve_queue_wait_seconds_count") == waits_before + 15
    batches = total(after, "ray_convserve_batch_size_count") - batches_before
    assert 1 <= batches < 15  # some requests shared a batch
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the service's device "auto"
    assert total(after, "ray_convserve_inference_seconds_count", device=device) == inference_before + batches
    assert total(after, "ray_convserve_inflight_requests") == 0  # nothing in progress once answered


def test_dashboard_queries_only_exported_metrics(service):
    import re

    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}
    assert any(m.startswith("ray_convserve_") for m in queried) and any(m.startswith("ray_serve_") for m in queried)
    wanted = queried - GPU_ONLY_METRICS

    def all_there():
        samples = scrape(service)
        return samples if all(m in samples for m in wanted) else None

    exported = wait_for(all_there) or scrape(service)
    missing = sorted(m for m in queried - GPU_ONLY_METRICS if m not in exported)
    assert not missing, f"dashboard queries metrics the service does not export: {missing}"
