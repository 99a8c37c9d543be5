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

from model.evaluate import predict_logits
from service.config import MAX_BATCH_SIZE_LIMIT
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
    # A longer batch window than the default so that concurrent test requests reliably share a batch.
    svc = ServiceProcess(env={"CONVSERVE_BATCH_WAIT_TIMEOUT_S": "0.02", "CONVSERVE_MAX_BATCH_SIZE": "16"}).start()
    yield svc
    svc.stop()


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


def test_a_request_alone_does_not_wait_for_company(service):
    """This service waits 20 ms for a batch to fill (CONVSERVE_BATCH_WAIT_TIMEOUT_S); a request
    alone in the replica skips the wait: no other request could join its batch in time."""
    waits_ms = []
    for _, jpeg in fixture_jpegs(5):
        resp = classify(service, jpeg, top_k=1)
        waits_ms.append(float(re.search(r"queue;dur=([0-9.]+)", resp.headers["server-timing"]).group(1)))
    assert sorted(waits_ms)[2] < 20 / 2, waits_ms  # the median: well under the configured wait


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


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "body", "content_type", "params"),
    [
        ("jpeg", None, "image/jpeg", {"top_k": "3"}),
        ("jpeg, default top_k", None, "image/jpeg", {}),
        ("png as octet-stream", "png", "application/octet-stream", {"top_k": "10"}),
        ("top_k 0", None, "image/jpeg", {"top_k": "0"}),
        ("top_k 11", None, "image/jpeg", {"top_k": "11"}),
        ("not an image", b"garbage", "image/png", {}),
        ("empty body", b"", "image/jpeg", {}),
        ("truncated jpeg", "half", "image/jpeg", {}),
        ("over the body limit", b"\xff\xd8\xff" + b"\0" * (9 * 1024 * 1024), "image/jpeg", {}),
    ],
)
def test_the_raw_fast_path_answers_as_the_route_does(service, name, body, content_type, params):
    """service/fast_classify.py answers a raw body with at most `top_k`; one more query parameter
    (which the route ignores) sends the same request through FastAPI's route instead."""
    _, jpeg = fixture_jpegs(1)[0]
    body = {None: jpeg, "png": tiny_png(), "half": jpeg[: len(jpeg) // 2]}.get(body, body)
    fast = classify(service, body, content_type, **params)
    routed = classify(service, body, content_type, **params, via="route")
    assert fast.status_code == routed.status_code, (fast.text, routed.text)
    wanted = {"content-type", "content-length", "x-batch-size", "server-timing"}
    assert {k for k in fast.headers if k.lower() in wanted} == {k for k in routed.headers if k.lower() in wanted}
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    if fast.status_code != 200:
        assert fast.json() == routed.json()
        assert_error(fast, fast.status_code)
        return
    a, b = fast.json(), routed.json()
    assert a["model"] == b["model"]
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    # the two may run in batches of different sizes: scores equal to float32 rounding
    for p, q in zip(a["predictions"], b["predictions"], strict=True):
        assert p["score"] == pytest.approx(q["score"], abs=1e-4)
    assert len(a["predictions"]) == int(params.get("top_k", 5))


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
    files = [("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", jpeg, "image/jpeg"))]
    assert_error(requests.post(url, files=files, timeout=30), 400, "one_image_only")


# --- model, health, docs ---------------------------------------------------------------------


def test_model_health_and_docs(service, model_info, bundle):
    assert model_info["weights_sha256"] == bundle.weights_sha256
    assert model_info["input_size"] == 32 and len(model_info["labels"]) == 10
    assert [layer["name"] for layer in model_info["layers"]] == ["stem", "stage1", "stage2", "stage3", "pool", "head"]
    assert model_info["accuracy"]["val_top1_shipped"] > 0.9
    # the default precision: float32 on a CPU (cpu_amp_dtype off), bf16 autocast on CUDA
    assert model_info["precision"] == ("bfloat16" if model_info["device"] == "cuda" else "float32")
    assert requests.get(service.base + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(service.base + "/readyz", timeout=10).status_code == 200
    spec = requests.get(service.base + "/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/feature-maps", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    # the request body lists every raw image type the API accepts, so clients and schemathesis send them
    from service.inputs import RAW_IMAGE_TYPES

    for path in ("/v1/classify", "/v1/feature-maps"):
        body_types = set(spec["paths"][path]["post"]["requestBody"]["content"])
        assert body_types == RAW_IMAGE_TYPES | {"multipart/form-data", "application/json"}, body_types
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
    assert len(served) == len(jpegs) == 29
    for row, result in enumerate(served):
        top = result["predictions"][0]
        assert top["index"] == int(probs[row].argmax())
        assert abs(top["score"] - float(probs[row].max())) < 1e-4


# --- metrics ---------------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "convserve-dashboard.json"
# Ray's node GPU metrics exist only on nodes with a GPU.
GPU_ONLY_METRICS = {"ray_node_gram_used", "ray_node_gpus_utilization"}
# Exported from the first refusal on (a Ray counter cannot be set to 0); test_reliability.py's burst
# test checks that it is, and that it counts what HAProxy refused.
AFTER_A_REFUSAL = {"ray_convserve_haproxy_refusals_total"}


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


def ray_histogram_sum(sizes: list[int]) -> float:
    """What Ray exports as a histogram's `_sum`: not the sum of the values observed, but of the
    midpoints of the buckets they fell in (ray/_private/telemetry/open_telemetry_metric_recorder.py:
    "the histogram sum value will be an approximation since we use bucket midpoints"). A batch of
    one counts 0.5 in the le=1 bucket; this is why 15 images once moved the sum by 9.5."""
    from service.metrics import batch_size_buckets

    bounds = batch_size_buckets(MAX_BATCH_SIZE_LIMIT)
    midpoints = [bounds[0] / 2] + [(lo + hi) / 2 for lo, hi in zip(bounds, bounds[1:], strict=False)]
    return sum(midpoints[next(i for i, b in enumerate(bounds) if size <= b)] for size in sizes)


def test_metrics_move_by_the_expected_amounts(service):
    before = settled_scrape(service)

    def moved_by(after: dict, name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    images = fixture_jpegs(8)
    alone = [int(classify(service, jpeg).headers["x-batch-size"]) for _, jpeg in images[:7]]
    assert classify(service, images[0][1], "text/plain").status_code == 415
    bad_param = requests.post(service.base + "/v1/classify?top_k=abc", data=images[0][1], timeout=30)
    assert bad_param.status_code == 400  # answered by the validation handler, before the route
    with ThreadPoolExecutor(8) as pool:
        together = [int(r.headers["x-batch-size"]) for r in pool.map(lambda i: classify(service, i[1]), images)]
    assert alone == [1] * 7 and max(together) > 1, (alone, together)
    # Nothing else is in flight: each batch of k images answered k of these requests with k.
    batch_sizes = alone + [k for k in sorted(set(together)) for _ in range(together.count(k) // k)]
    assert sum(batch_sizes) == 15, together

    def moved():
        now = scrape(service)
        return (
            now
            if total(now, "ray_convserve_images_total", endpoint="classify")
            >= total(before, "ray_convserve_images_total", endpoint="classify") + 15
            else None
        )

    assert wait_for(moved), "metrics did not move within 60 s"
    after = settled_scrape(service)
    # 7 + 8 images; the 415 request is refused before its body is read as an image
    assert moved_by(after, "ray_convserve_images_total", endpoint="classify") == 15
    assert moved_by(after, "ray_convserve_requests_total", endpoint="classify", status="200") == 15
    assert moved_by(after, "ray_convserve_requests_total", endpoint="classify", status="415") == 1
    assert moved_by(after, "ray_convserve_requests_total", endpoint="classify", status="400") == 1
    assert moved_by(after, "ray_convserve_preprocess_seconds_count") == 15
    assert moved_by(after, "ray_convserve_queue_wait_seconds_count") == 15  # one wait per image
    # the batches, exactly: how many, in which buckets, and the bucket-midpoint sum Ray exports
    assert moved_by(after, "ray_convserve_batch_size_count") == len(batch_sizes)
    assert moved_by(after, "ray_convserve_batch_size_bucket", le="1.0") == batch_sizes.count(1)
    assert moved_by(after, "ray_convserve_batch_size_sum") == pytest.approx(ray_histogram_sum(batch_sizes))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the service's device "auto"
    assert moved_by(after, "ray_convserve_inference_seconds_count", device=device) == len(batch_sizes)
    # exported, and zero once everything is answered (total() of an absent series would be 0 too)
    assert "ray_convserve_inflight_requests" in after
    assert total(after, "ray_convserve_inflight_requests") == 0


def test_dashboard_queries_only_exported_metrics(service):
    import re

    _, jpeg = fixture_jpegs(1)[0]
    assert classify(service, jpeg).status_code == 200  # this test's own traffic, not earlier tests'
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}
    assert any(m.startswith("ray_convserve_") for m in queried) and any(m.startswith("ray_serve_") for m in queried)
    wanted = queried - GPU_ONLY_METRICS - AFTER_A_REFUSAL

    def all_there():
        samples = scrape(service)
        return samples if all(m in samples for m in wanted) else None

    exported = wait_for(all_there) or scrape(service)
    missing = sorted(m for m in wanted if m not in exported)
    assert not missing, f"dashboard queries metrics the service does not export: {missing}"


def test_a_jpeg_fallback_to_pillow_is_exported_as_a_metric(service):
    """No silent fallbacks: a JPEG libjpeg-turbo declines is counted in Prometheus by reason."""
    _, jpeg = fixture_jpegs(1)[0]
    truncated = jpeg[: len(jpeg) * 2 // 3]  # libjpeg-turbo warns "premature end of data": Pillow decides
    name = "ray_convserve_decode_fallbacks_total"
    before = total(scrape(service), name)
    assert_error(classify(service, truncated), 400, "invalid_image")

    def counted():
        now = scrape(service)
        return now if total(now, name) >= before + 1 else None

    after = wait_for(counted)
    assert after, f"{name} did not move within 60 s"
    assert {labels["reason"] for labels, value in after[name] if value} == {"RuntimeError"}  # libjpeg-turbo: truncated


# --- live tuning: a redeploy that changes only user_config ------------------------------------


def largest_batch_of_40(service) -> int:
    """X-Batch-Size of one request of 40 images: the largest forward pass that served it."""
    files = [("image", (f"{i}.jpg", jpeg, "image/jpeg")) for i, (_, jpeg) in enumerate(fixture_jpegs(40))]
    resp = requests.post(service.base + "/v1/classify?top_k=1", files=files, timeout=60)
    assert resp.status_code == 200 and len(resp.json()["results"]) == 40, resp.text[:300]
    return int(resp.headers["x-batch-size"])


def test_a_user_config_redeploy_reconfigures_the_running_replica(service, monkeypatch):
    """Serve's Python API on the running application, from a second driver: the same settings
    with a new max_batch_size in user_config. The replica is reconfigured, not restarted; the
    new size shows in X-Batch-Size and /v1/model, the admission limit follows it, and requests
    sent during the update are all answered."""
    import threading
    import time

    import ray
    from ray import serve

    from service.app import build_app_with_options
    from service.server import config_from_args, options_from_args, parse_args

    # The service's own settings, built as its driver built them (same env, same arguments).
    for key, value in service.env.items():
        if key.startswith("CONVSERVE_"):
            monkeypatch.setenv(key, value)
    args = parse_args(service.args)
    config = config_from_args(args)
    options = options_from_args(args, config)
    assert options["user_config"]["max_batch_size"] == 16
    before = requests.get(service.base + "/v1/model", timeout=10).json()
    assert before["batching"]["max_batch_size"] == 16 and before["admission_limit"] == 64  # floor 64
    assert largest_batch_of_40(service) == 16
    _, jpeg = fixture_jpegs(1)[0]

    answers: list[int | str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(classify(service, jpeg, top_k=1).status_code)
            except requests.RequestException as e:
                answers.append(type(e).__name__)

    address = re.search(r"convserve: ray address (\S+)", service.log_text()).group(1)
    ray.init(address=address, logging_level="ERROR")
    clients = [threading.Thread(target=client) for _ in range(3)]
    try:
        replicas = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}
        for c in clients:
            c.start()
        time.sleep(1)
        options["user_config"] = {**options["user_config"], "max_batch_size": 40}
        serve.run(build_app_with_options(config.model_dump(), options), name="convserve", route_prefix="/")
        deadline = time.monotonic() + 60
        while requests.get(service.base + "/v1/model", timeout=10).json()["batching"]["max_batch_size"] != 40:
            assert time.monotonic() < deadline, "the new max_batch_size never showed in /v1/model"
            time.sleep(0.5)
        time.sleep(1)
        stop.set()
        for c in clients:
            c.join(60)
        after_replicas = {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
        }
    finally:
        stop.set()
        ray.shutdown()
    assert len(answers) > 5 and set(answers) == {200}, answers  # nothing lost during the update
    assert after_replicas == replicas  # reconfigured in place, not replaced
    after = requests.get(service.base + "/v1/model", timeout=10).json()
    assert after["admission_limit"] == 4 * 40  # admission_batches x the new max_batch_size
    # 40 images in one request join the batcher at once: one pass of 40 (before the update: 16)
    assert largest_batch_of_40(service) == 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_amp_dtype is the CPU's precision")
def test_a_cpu_replica_asked_for_bf16_computes_in_bf16(bundle):
    """`CONVSERVE_CPU_AMP_DTYPE=bf16` reaches a real replica (README, "CPU precision"): `/v1/model`
    says bfloat16, and the scores served are the evaluate path's bf16 ones, not float32's."""
    from model.data import load_image_folder

    offline = load_image_folder(FIXTURES, bundle.preprocess, classes=bundle.labels)
    picks = list(range(0, len(offline.paths), 7))  # 29 of the 200 files, every class
    images = bundle.preprocess.normalize(offline.images[picks])
    float32 = torch.softmax(predict_logits(bundle.model, images), dim=1)
    bf16 = torch.softmax(predict_logits(bundle.model, images, autocast_dtype=torch.bfloat16), dim=1)
    payload = {"images": [base64.b64encode((FIXTURES / offline.paths[i]).read_bytes()).decode() for i in picks]}
    svc = ServiceProcess("--replicas", "1", env={"CONVSERVE_CPU_AMP_DTYPE": "bf16"}).start()
    try:
        info = requests.get(svc.base + "/v1/model", timeout=10).json()
        resp = requests.post(svc.base + "/v1/classify", json={**payload, "top_k": 10}, timeout=60)
    finally:
        svc.stop()
    assert (info["device"], info["precision"]) == ("cpu", "bfloat16")
    assert resp.status_code == 200, resp.text[:300]
    served = torch.zeros(len(picks), 10)
    for row, result in enumerate(resp.json()["results"]):
        for p in result["predictions"]:
            served[row, p["index"]] = p["score"]
    to_bf16 = (served - bf16).abs().max().item()
    to_float32 = (served - float32).abs().max().item()
    assert to_bf16 < to_float32 / 2, (to_bf16, to_float32)
    assert (served.argmax(1) == float32.argmax(1)).float().mean() >= 0.9
