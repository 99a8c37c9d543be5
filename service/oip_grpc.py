"""The Open Inference Protocol's gRPC messages <-> service/oip.py's tensors. No Ray.

Ray Serve's gRPC ingress (port 9000 by default, `--grpc-port`) hands each call of
`inference.GRPCInferenceService` to the deployment method of the same name (service/app.py); those
methods use what is here. Inputs arrive as `raw_input_contents` (what tritonclient sends) or as
typed `contents`; outputs go back as `raw_output_contents`.
"""

from __future__ import annotations

import grpc
import numpy as np

from service import oip
from service.oip_proto import open_inference_pb2 as pb

# HTTP status of an OipError / ApiError -> the gRPC status the protocol's clients expect.
GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

SERVICE = "inference.GRPCInferenceService"
SERVICER = "service.oip_proto.open_inference_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"

# Typed contents: which repeated field holds which datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _param(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_request(request: pb.ModelInferRequest) -> oip.InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise oip.bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one each, in order")
    inputs = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if t.datatype not in oip.DATATYPES:
            raise oip.bad(f"input '{t.name}': unknown datatype {t.datatype!r}")
        if raw:
            inputs.append(oip.from_raw(t.name, t.datatype, shape, raw[i]))
            continue
        if t.datatype not in _CONTENTS:
            raise oip.bad(f"input '{t.name}': {t.datatype} travels only as raw_input_contents")
        values = list(getattr(t.contents, _CONTENTS[t.datatype]))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if len(values) != count:
            raise oip.bad(f"input '{t.name}': shape {shape} holds {count} elements, the contents {len(values)}")
        if t.datatype == "BYTES":
            inputs.append(oip.Tensor(t.name, t.datatype, shape, values))
        else:
            inputs.append(
                oip.Tensor(t.name, t.datatype, shape, np.asarray(values, oip.NUMPY[t.datatype]).reshape(shape))
            )
    outputs = None
    if request.outputs:
        outputs = []
        for o in request.outputs:
            k = _param(o.parameters["classification"]) if "classification" in o.parameters else 0
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise oip.bad(f"output '{o.name}': classification must be a non-negative integer, got {k!r}")
            outputs.append(oip.RequestedOutput(o.name, True, k))
    return oip.InferRequest(inputs, outputs, request.id or None, True)


def encode_response(
    model: str, version: str, request_id: str | None, tensors: list[oip.Tensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for t in tensors:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(oip.tensor_bytes(t))
    return response


def model_metadata(doc: dict) -> pb.ModelMetadataResponse:
    """oip.model_metadata's dict as the protocol's message."""
    response = pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"])
    for field in ("inputs", "outputs"):
        for t in doc[field]:
            getattr(response, field).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return response
