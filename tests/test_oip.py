"""The Open Inference Protocol (KServe V2): service/oip.py alone, then the real `tritonclient`
against a real `python -m service`."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import requests
import torch

from service import oip
from tests.server_process import ServiceProcess
from tests.test_serving import fixture_jpegs

MODEL = "convservenet-cifar10"

# --- service/oip.py, no server --------------------------------------------------------------------


def test_bytes_tensors_round_trip_in_the_protocols_layout():
    elements = [b"", b"\xff\xd8 a jpeg", bytes(range(256))]
    raw = oip.join_bytes(elements)
    assert raw[:4] == struct.pack("<I", 0) and oip.split_bytes(raw) == elements
    with pytest.raises(oip.OipError, match="truncated"):
        oip.split_bytes(raw[:-1])


def test_a_binary_request_splits_into_json_and_tensors():
    images = [b"first image", b"second"]
    raw = oip.join_bytes(images)
    pixels = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    head = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}},
                {"name": "input", "datatype": "FP32", "shape": [2, 3, 2, 2], "parameters": {"binary_data_size": 96}},
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}}],
        }
    ).encode()
    req = oip.parse_http(head + raw + pixels.tobytes(), str(len(head)))
    assert req.id == "r1" and req.inputs[0].data == images
    assert np.array_equal(req.inputs[1].data, pixels)
    assert req.outputs == [oip.RequestedOutput("probabilities", binary=True, classification=3)]


def test_json_tensors_base64_images_and_nested_data():
    doc = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"img").decode()]},
            {"name": "input", "datatype": "UINT8", "shape": [1, 2, 2], "data": [[[1, 2], [3, 4]]]},
        ],
        "parameters": {"binary_data_output": True},
    }
    req = oip.parse_http(json.dumps(doc).encode(), None)
    assert req.inputs[0].data == [b"img"] and req.inputs[1].data.tolist() == [[[1, 2], [3, 4]]]
    assert req.binary_output and req.outputs is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"inputs": []}, "non-empty"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}, "unknown datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}, "holds 2 elements"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}, "non-negative"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, "not all FP32"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "base64"),
    ],
)
def test_malformed_requests_are_400_with_a_reason(doc, message):
    with pytest.raises(oip.OipError, match=message) as e:
        oip.parse_http(json.dumps(doc).encode(), None)
    assert e.value.status == 400


def test_binary_sizes_must_add_up():
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    assert oip.parse_http(head + bytes(8), str(len(head))).inputs[0].data.shape == (2,)
    for body, length in ((head + bytes(12), str(len(head))), (head + bytes(4), str(len(head))), (head, "x")):
        with pytest.raises(oip.OipError):
            oip.parse_http(body, length)


def test_response_encoding_json_and_binary():
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    labels = oip.Tensor("probabilities", "BYTES", [1, 1], [b"0.750000:1:cat"])
    body, headers = oip.encode_http("m", "1", None, [(oip.Tensor("probabilities", "FP32", [1, 2], probs), False)])
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body)["outputs"][0]["data"] == [0.25, 0.75]
    body, headers = oip.encode_http("m", "1", "id", [(oip.Tensor("p", "FP32", [1, 2], probs), True), (labels, True)])
    n = int(headers[oip.HEADER_LENGTH])
    doc = json.loads(body[:n])
    assert doc["id"] == "id" and [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [8, 18]
    assert np.frombuffer(body[n : n + 8], "<f4").tolist() == [0.25, 0.75]
    assert oip.split_bytes(body[n + 8 :]) == [b"0.750000:1:cat"]
    assert oip.classification(np.array([0.1, 0.7, 0.2]), 2, ["a", "b", "c"]) == [b"0.700000:1:b", b"0.200000:2:c"]


def test_the_generated_grpc_modules_match_the_proto():
    """`make proto` output is committed: it must describe what the .proto files say, under the
    service name tritonclient.grpc calls (`/inference.GRPCInferenceService/<RPC>`)."""
    import re
    from pathlib import Path

    from service.oip_proto import open_inference_pb2 as pb
    from service.oip_proto import open_inference_service_pb2_grpc as pb_grpc

    folder = Path(pb.__file__).parent
    messages, service = ((folder / n).read_text() for n in ("open_inference.proto", "open_inference_service.proto"))
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(re.findall(r"^message (\w+)", messages, re.M))
    rpcs = re.findall(r"rpc (\w+)\(", service)
    assert len(rpcs) == 6 and "package inference;" in service
    stub = pb_grpc.GRPCInferenceServiceStub(__import__("grpc").insecure_channel("127.0.0.1:1"))
    assert all(hasattr(stub, rpc) for rpc in rpcs)
    source = Path(pb_grpc.__file__).read_text()
    assert all(f"'/inference.GRPCInferenceService/{rpc}'" in source for rpc in rpcs)
    fields = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields["raw_input_contents"] == 7 and fields["inputs"] == 5  # the wire format clients use


# --- tritonclient against a real service --------------------------------------------------------------------


@pytest.fixture(scope="module")
def service():
    svc = ServiceProcess().start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def http(service):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(service.base.removeprefix("http://"))
    yield client
    client.close()


def v1_probabilities(service, jpegs: list[bytes]) -> np.ndarray:
    """Class probabilities from the V1 API, all classes, for comparison."""
    out = []
    for jpeg in jpegs:
        resp = requests.post(service.base + "/v1/classify?top_k=10", data=jpeg, headers={"Content-Type": "image/jpeg"})
        row = np.zeros(10, dtype=np.float32)
        for p in resp.json()["predictions"]:
            row[p["index"]] = p["score"]
        out.append(row)
    return np.stack(out)


def image_input(jpegs: list[bytes], binary: bool = True):
    import tritonclient.http as httpclient

    x = httpclient.InferInput("image", [len(jpegs)], "BYTES")
    if binary:
        x.set_data_from_numpy(np.array(jpegs, dtype=np.object_), binary_data=True)
    else:  # JSON: a BYTES element is a string, so the image travels as base64
        x.set_data_from_numpy(np.array([base64.b64encode(j) for j in jpegs], dtype=np.object_), binary_data=False)
    return x


@pytest.mark.integration
def test_health_and_metadata(http, bundle):
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert http.is_model_ready(MODEL, model_version=bundle.version)
    server = http.get_server_metadata()
    assert server["name"] == "convserve" and "binary_tensor_data" in server["extensions"]
    meta = http.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == [bundle.version]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "input": "FP32"}
    outputs = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert outputs["probabilities"] == [-1, 10]
    assert {info.name: [-1, *info.shape] for info in bundle.layers}.items() <= outputs.items()


@pytest.mark.integration
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_v2_predictions_equal_v1(service, http, binary_in, binary_out):
    import tritonclient.http as httpclient

    jpegs = [jpeg for _, jpeg in fixture_jpegs(3)]
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = http.infer(MODEL, [image_input(jpegs, binary_in)], outputs=[out], request_id="q7")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    assert result.get_response()["id"] == "q7"
    np.testing.assert_allclose(probs, v1_probabilities(service, jpegs), atol=1e-5)


@pytest.mark.integration
def test_preprocessed_fp32_and_uint8_pixels_give_the_same_answer(http, bundle):
    import tritonclient.http as httpclient
    from torchvision.io import decode_jpeg

    jpegs = [jpeg for _, jpeg in fixture_jpegs(2)]
    pixels = np.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)).numpy() for j in jpegs])
    assert pixels.shape == (2, 3, 32, 32)  # CIFAR images: already the model's input size
    fp32 = np.stack([bundle.preprocess(torch.from_numpy(p)).numpy() for p in pixels]).astype(np.float32)
    answers = []
    for data, datatype in ((fp32, "FP32"), (pixels, "UINT8")):
        x = httpclient.InferInput("input", list(data.shape), datatype)
        x.set_data_from_numpy(data)
        answers.append(http.infer(MODEL, [x]).as_numpy("probabilities"))
    answers.append(http.infer(MODEL, [image_input(jpegs)]).as_numpy("probabilities"))
    np.testing.assert_allclose(answers[0], answers[2], atol=1e-5)
    np.testing.assert_allclose(answers[1], answers[2], atol=1e-5)


@pytest.mark.integration
def test_classification_and_feature_map_outputs(service, http):
    import tritonclient.http as httpclient

    jpegs = [jpeg for _, jpeg in fixture_jpegs(2)]
    outputs = [
        httpclient.InferRequestedOutput("probabilities", class_count=3),
        httpclient.InferRequestedOutput("stage2", binary_data=True),
    ]
    result = http.infer(MODEL, [image_input(jpegs)], outputs=outputs)
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    v1 = v1_probabilities(service, jpegs)
    for row, probs in zip(top, v1, strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == int(probs.argmax()) and abs(float(score) - probs.max()) < 1e-5 and label
    maps = result.as_numpy("stage2")
    served = requests.post(
        service.base + "/v1/feature-maps?layer=stage2&format=npy", data=jpegs[1], headers={"Content-Type": "image/jpeg"}
    )
    np.testing.assert_allclose(maps[1], np.load(io.BytesIO(served.content)), atol=1e-5)


@pytest.mark.integration
def test_errors_map_to_the_protocol(http, service):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _, jpeg = fixture_jpegs(1)[0]

    def fails(status: str, match: str, **kwargs):
        with pytest.raises(InferenceServerException, match=match) as e:
            http.infer(**kwargs)
        assert e.value.status() == status, e.value

    fails("404", "unknown model", model_name="nope", inputs=[image_input([jpeg])])
    fails("404", "unknown model", model_name=MODEL, model_version="7", inputs=[image_input([jpeg])])
    wrong = httpclient.InferInput("image", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    fails("400", "BYTES", model_name=MODEL, inputs=[wrong])
    shape = httpclient.InferInput("input", [1, 3, 8, 8], "FP32")
    shape.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    fails("400", r"\[N,3,32,32\]", model_name=MODEL, inputs=[shape])
    fails("400", "element 1: cannot decode", model_name=MODEL, inputs=[image_input([jpeg, b"\xff\xd8\xff junk"])])
    fails("400", "unknown output", model_name=MODEL, inputs=[image_input([jpeg])], outputs=[
        httpclient.InferRequestedOutput("nope")
    ])  # fmt: skip
    # plain HTTP: every error body is the protocol's {"error": "<message>"}
    for resp in (
        requests.post(service.base + f"/v2/models/{MODEL}/infer", data=b"{", timeout=10),
        requests.get(service.base + "/v2/models/nope", timeout=10),
    ):
        assert resp.status_code in (400, 404) and isinstance(resp.json()["error"], str), resp.text


@pytest.mark.integration
def test_the_aio_client_and_statistics(service, http):
    import asyncio

    import tritonclient.http.aio as aioclient

    jpegs = [jpeg for _, jpeg in fixture_jpegs(4)]
    before = http.get_inference_statistics(MODEL)["model_stats"][0]

    async def run():
        client = aioclient.InferenceServerClient(service.base.removeprefix("http://"))
        try:
            return await asyncio.gather(*(client.infer(MODEL, [image_input([j])]) for j in jpegs))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [r.as_numpy("probabilities").shape for r in results] == [(1, 10)] * 4
    after = http.get_inference_statistics(MODEL)["model_stats"][0]
    assert int(after["inference_count"]) >= int(before["inference_count"]) + 4
    assert int(after["execution_count"]) > int(before["execution_count"])
    success = after["inference_stats"]["success"]
    assert int(success["count"]) >= int(before["inference_stats"]["success"]["count"]) + 4 and int(success["ns"]) > 0


# --- gRPC: tritonclient.grpc through Ray Serve's gRPC ingress --------------------------------------


@pytest.fixture(scope="module")
def grpc_client(service):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{service.grpc_port}")
    yield client
    client.close()


@pytest.mark.integration
def test_grpc_health_metadata_and_infer_equal_http(service, grpc_client, http):
    import tritonclient.grpc as grpcclient

    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready(MODEL)
    assert grpc_client.get_server_metadata().name == "convserve"
    meta = grpc_client.get_model_metadata(MODEL)
    assert [i.name for i in meta.inputs] == ["image", "input"] and meta.outputs[0].name == "probabilities"
    jpegs = [jpeg for _, jpeg in fixture_jpegs(3)]
    x = grpcclient.InferInput("image", [3], "BYTES")
    x.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    outputs = [
        grpcclient.InferRequestedOutput("probabilities"),
        grpcclient.InferRequestedOutput("stage1"),
    ]
    result = grpc_client.infer(MODEL, [x], outputs=outputs, request_id="g1")
    assert result.get_response().id == "g1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1_probabilities(service, jpegs), atol=1e-5)
    assert result.as_numpy("stage1").shape[0] == 3
    top = grpc_client.infer(MODEL, [x], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)])
    assert top.as_numpy("probabilities").shape == (3, 2)


@pytest.mark.integration
def test_grpc_errors_carry_the_protocols_status_codes(grpc_client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _, jpeg = fixture_jpegs(1)[0]

    def status_of(model: str, inputs) -> str:
        with pytest.raises(InferenceServerException) as e:
            grpc_client.infer(model, inputs)
        return e.value.status()

    good = grpcclient.InferInput("image", [1], "BYTES")
    good.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    assert status_of("nope", [good]) == "StatusCode.NOT_FOUND"
    bad_image = grpcclient.InferInput("image", [1], "BYTES")
    bad_image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    assert status_of(MODEL, [bad_image]) == "StatusCode.INVALID_ARGUMENT"
    wrong = grpcclient.InferInput("input", [1, 3, 4, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 4, 4), dtype=np.float32))
    assert status_of(MODEL, [wrong]) == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.integration
def test_protocol_requests_are_counted_by_endpoint(service, http, grpc_client):
    """requests_total{endpoint}: v2/infer (HTTP, by HTTP status), grpc/infer (by gRPC status code)."""
    from tests.test_serving import scrape, total, wait_for

    _, jpeg = fixture_jpegs(1)[0]
    http.infer(MODEL, [image_input([jpeg])])
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput("image", [1], "BYTES")
    x.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    grpc_client.infer(MODEL, [x])
    name = "ray_convserve_requests_total"

    def counted():
        now = scrape(service)
        http_ok = total(now, name, endpoint="v2/infer", status="200")
        ok = http_ok and total(now, name, endpoint="grpc/infer", status="OK")
        return now if ok else None

    assert wait_for(counted), "V2 requests were not counted within 60 s"


@pytest.mark.integration
def test_the_bench_protocol_loads_are_all_answered(service, tmp_path):
    """`make bench`'s protocol comparison (loadtests/bench.py): every way in answers 200, briefly."""
    import shutil

    from loadtests.bench import WRK_LUA, grpc_closed_loop, protocol_bodies, run_wrk

    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    for name, (path, headers, listing) in protocol_bodies(tmp_path).items():
        lua = tmp_path / f"{name}.lua"
        lua.write_text(WRK_LUA % {"list": listing, "path": path, "headers": headers})
        row = run_wrk(service.base, 2, 1.0, lua)
        assert row["requests"] > 0 and row["errors"] == 0, (name, row)
    row = grpc_closed_loop(service.grpc_port, 2, 1.0)
    assert row["requests"] > 0 and row["errors"] == 0, row
