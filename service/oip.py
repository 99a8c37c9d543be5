"""The Open Inference Protocol (KServe V2, as Triton speaks it): tensors in, tensors out. No Ray.

One request carries named tensors. convserve's model takes exactly one input, in either form:

- `image`: `BYTES [N]`, each element one encoded image in any format the V1 API accepts (decoded
  and preprocessed by the same code, with the same limits). In a JSON body a BYTES element is a
  string, so there it is the image's **base64**; with the binary tensor data extension it is the
  raw file (each element a 4-byte little-endian length, then the bytes: the protocol's layout).
- `input`: `FP32 [N, 3, S, S]`, already preprocessed exactly as the model's eval preset does
  (resized to S, scaled to [0, 1], normalised with the bundle's mean and std), or `UINT8 [N, 3, S,
  S]` RGB pixels at the model's input size, which the service normalises.

Outputs, by name (all of them when the request names none): `probabilities` `FP32 [N, classes]`
(softmax over the classes; with the Triton `classification` parameter `k` it becomes `BYTES [N,
k]` of `"score:index:label"`, best first, as Triton writes classification results), and any named
layer of the model (`GET /v2/models/<name>` lists them) as `FP32 [N, C, H, W]` feature maps.

The protocol has no per-item errors: one bad image fails the whole request with an error naming
its index. Both the gRPC and the HTTP front ends parse into `InferRequest` and encode `Tensor`s.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor data extension's header
IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
PROBABILITIES = "probabilities"

# Protocol datatype -> numpy dtype, for the tensors this service reads and writes.
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = frozenset({*NUMPY, "BYTES"})


class OipError(Exception):
    """A request the protocol answers with `{"error": message}` (gRPC: the matching status)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def to_dict(self) -> dict:
        return {"error": self.message}


def bad(message: str) -> OipError:
    return OipError(400, message)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # numbers: an array of `shape`; BYTES: a flat list of elements
    parameters: dict = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool = False
    classification: int = 0  # Triton's `classification` parameter: top-k as "score:index:label"


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: every output, as JSON unless binary_output
    id: str | None = None
    binary_output: bool = False  # the request's `binary_data_output` parameter


# --- BYTES tensors: 4-byte little-endian length, then the bytes, element after element -----------


def split_bytes(raw: bytes) -> list[bytes]:
    elements, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise bad("BYTES tensor data is truncated: a length prefix is cut short")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise bad(f"BYTES tensor data is truncated: an element declares {n} bytes, {len(raw) - i} remain")
        elements.append(raw[i : i + n])
        i += n
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor_bytes(t: Tensor) -> bytes:
    """The raw form of a tensor (the binary extension's and gRPC's `raw_*_contents`)."""
    if t.datatype == "BYTES":
        return join_bytes(list(t.data))
    return np.ascontiguousarray(t.data, dtype=np.dtype(NUMPY[t.datatype]).newbyteorder("<")).tobytes()


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes, checked against its declared datatype and shape."""
    count = _count(name, shape)
    if datatype == "BYTES":
        elements = split_bytes(raw)
        if len(elements) != count:
            raise bad(f"input '{name}': shape {shape} holds {count} elements, the data {len(elements)}")
        return Tensor(name, datatype, shape, elements)
    dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise bad(f"input '{name}': {datatype} {shape} is {count * dtype.itemsize} bytes, the data {len(raw)}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).astype(NUMPY[datatype]).reshape(shape))


def _count(name: str, shape: list) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _flatten(data) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row)]
    return data


def _from_json(name: str, datatype: str, shape: list[int], data) -> Tensor:
    count = _count(name, shape)
    flat = _flatten(data) if isinstance(data, list) else None
    if flat is None or len(flat) != count:
        got = "no list" if flat is None else f"{len(flat)} elements"
        raise bad(f"input '{name}': shape {shape} holds {count} elements, the data has {got}")
    if datatype == "BYTES":
        try:
            return Tensor(name, datatype, shape, [base64.b64decode(s, validate=True) for s in flat])
        except (binascii.Error, TypeError, ValueError):
            raise bad(f"input '{name}': in a JSON body each BYTES element is a base64 string of an image") from None
    try:
        return Tensor(name, datatype, shape, np.asarray(flat, dtype=NUMPY[datatype]).reshape(shape))
    except (TypeError, ValueError, OverflowError):
        raise bad(f"input '{name}': the data are not all {datatype} numbers") from None


# --- HTTP/REST --------------------------------------------------------------------------------------


def parse_http(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request body: JSON alone, or JSON then binary tensor data (the binary extension)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"Inference-Header-Content-Length is not an integer: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise bad(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, blob = body[:n], body[n:]
    else:
        head, blob = body, b""
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise bad(f"the request is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise bad('an infer request is a JSON object with a non-empty "inputs" list')
    inputs, offset = [], 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad('each input is an object with a "name", "datatype", "shape" and "data"')
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if datatype not in DATATYPES:
            raise bad(f"input '{name}': unknown datatype {datatype!r}")
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(blob):
                raise bad(f"input '{name}': binary_data_size {size!r} does not fit the binary data sent")
            inputs.append(from_raw(name, datatype, shape, blob[offset : offset + size]))
            offset += size
        else:
            inputs.append(_from_json(name, datatype, shape, spec.get("data")))
    if offset != len(blob):
        raise bad(f"{len(blob) - offset} bytes of binary data belong to no input")
    params = doc.get("parameters") or {}
    binary_output = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise bad('"outputs" is a list of {"name": ...} objects')
        outputs = [_requested(o, binary_output) for o in doc["outputs"]]
    request_id = doc.get("id")
    return InferRequest(inputs, outputs, str(request_id) if request_id is not None else None, binary_output)


def _requested(spec, binary_default: bool) -> RequestedOutput:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad('each requested output is an object with a "name"')
    params = spec.get("parameters") or {}
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise bad(f"output '{spec['name']}': classification must be a non-negative integer, got {k!r}")
    return RequestedOutput(spec["name"], bool(params.get("binary_data", binary_default)), k)


def encode_http(
    model: str, version: str, request_id: str | None, outputs: list[tuple[Tensor, bool]]
) -> tuple[bytes, dict]:
    """The response body and headers; `outputs` pairs each tensor with whether it goes binary."""
    entries, blobs = [], []
    for t, binary in outputs:
        entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            raw = tensor_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [e.decode() for e in t.data]
        else:
            entry["data"] = np.asarray(t.data).ravel().tolist()
        entries.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    head = orjson.dumps(doc)
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


# --- what the model takes and gives -------------------------------------------------------------


def classification(probs: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification output for one image: the top k as "score:index:label"."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [f"{probs[i]:.6f}:{i}:{labels[i]}".encode() for i in order]


def model_metadata(name: str, version: str, input_size: int, num_classes: int, layers: list[dict]) -> dict:
    s = input_size
    outputs = [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]}]
    outputs += [{"name": lay["name"], "datatype": "FP32", "shape": [-1, *lay["shape"]]} for lay in layers]
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]},
        ],
        "outputs": outputs,
        "parameters": {
            "inputs": f"one of: '{IMAGE_INPUT}' (BYTES [N], encoded images) or '{TENSOR_INPUT}' "
            f"(FP32 [N,3,{s},{s}] preprocessed, or UINT8 [N,3,{s},{s}] RGB pixels)",
        },
    }
