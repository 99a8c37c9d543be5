"""The Ray Serve application: the `ConvServe` deployment, thin FastAPI routes around the batcher.

Per request, on the replica's event loop: read and limit the body, decode and resize each image
(so a bad image fails alone, before it can join a batch), then hand the items to the batcher:
`fused`, this replica's own ModelBatcher (service/batcher.py: `@serve.batch`, the forward pass on
worker threads, so the event loop keeps accepting and decoding while a batch computes); `split`,
the ConvModel deployment through a DeploymentHandle (service/model_app.py), which batches the
items of every ingress replica.
"""

import asyncio
import collections
import hmac
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import orjson
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model import DEFAULT_BUNDLE, load_bundle
from service import fast_classify, oip, oip_grpc
from service.batcher import ModelBatcher, make_predictor
from service.config import MAX_BATCH_SIZE_LIMIT, BatchingConfig, ServeConfig
from service.decode import check_pixels, decode_image_bytes, jpeg_size, sniff_format
from service.errors import ApiError, bad_request, not_found, shed, timed_out
from service.explain import (
    cam_layers,
    explanation_json,
    find_conv,
    has_conv,
    kernel_info,
    kernels_png,
    residual_blocks,
)
from service.explain import explain as explain_image
from service.fast_classify import CLASSIFY_PATH
from service.featuremaps import layer_json, to_npy, to_png_grid
from service.inputs import (
    RAW_IMAGE_TYPES,
    ImageRequest,
    parse_top_k,
    read_body,
    read_images,
    read_limited,
    single_image,
)
from service.lanes import ForwardLanes, claim_threads
from service.metrics import ServiceMetrics
from service.middleware import (
    OVERLOADED_RETRY_AFTER_S,
    admission_gate,
    admission_limit,
    admission_limit_overloaded,
    count_refusals_with,
    count_refused,
    error_body,
    grpc_token,
    resize_admission,
    resolve_auth_token,
    shed_with,
)
from service.middleware import configure as configure_middleware
from service.middleware import install as install_middleware
from service.model_app import ConvModel, RemoteModel
from service.oip import OipError
from service.oip_grpc import GRPC_STATUS
from service.oip_proto import open_inference_pb2 as pb
from service.pacing import Shed
from service.page import index_html, static_file
from service.predictor import (
    BatchedPredictor,
    ItemError,
    ItemResult,
    WorkItem,
    keep_large_allocations,
)

log = logging.getLogger("convserve")

# The replica answers 504 JSON this long before the ingress's request_timeout_s would cut the
# connection with a bare 408/504 of its own.
TIMEOUT_MARGIN_S = 1.0

_IMAGE_BODY = {
    "required": True,
    "content": {
        # every raw type the API accepts, so that clients and schemathesis see (and send) them all
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in sorted(RAW_IMAGE_TYPES)},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["image"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1},
                    "top_k": {"type": "integer", "minimum": 1},
                },
                "required": ["images"],
            }
        },
    },
}

api = FastAPI(
    title="convserve",
    version="1.0",
    description="Batched CNN inference: classification and feature maps. Errors are JSON "
    '{"error": {"code": ..., "message": ...}}.',
)
install_middleware(api)  # bearer auth on /v1/*, overload shedding (service/middleware.py)


def json_response(obj: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(request: Request, status: int, code: str, message: str, headers=None) -> Response:
    return json_response(error_body(request.url.path, code, message), status, headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(request, exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(OipError)
async def _oip_error(_request: Request, exc: OipError) -> Response:
    return json_response(exc.to_dict(), exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    count_refused(request.url.path, 400)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
    return error_response(request, 400, "invalid_parameter", f"{where}: {first.get('msg', 'invalid')}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(request, 500, "internal_error", "internal server error")


# Defaults for a bare `serve run service.app:build_app`; deploy/serve_config.yaml sets the real ones.
@serve.deployment(name="ConvServe", max_ongoing_requests=256, max_queued_requests=512)
@serve.ingress(api)
class ConvServe:
    def __init__(self, config: dict | None = None, model: DeploymentHandle | None = None):
        """`model`: the split topology's model deployment (service/model_app.py); None: fused,
        this replica batches and computes itself."""
        self.config = ServeConfig.from_env(config)
        configure_middleware(self.config)
        if model is None:  # the forward lanes' threads; one for everything else (service/lanes.py)
            self.config = self.config.model_copy(update={"torch_threads": claim_threads(self.config.torch_threads)})
        keep_large_allocations()  # the forward thread reuses activation memory (service/predictor.py)
        self.bundle = load_bundle(self.config.bundle_path or DEFAULT_BUNDLE)
        self.layer_names = [info.name for info in self.bundle.layers]
        if model is None:
            self.predictor = make_predictor(self.config, self.bundle)
            self.metrics = ServiceMetrics(MAX_BATCH_SIZE_LIMIT, self.predictor.device.type)
            self.batcher = ModelBatcher(self.config, self.metrics, self.predictor)
            self.lanes = self.batcher.lanes  # /v1/explain's pass runs on them too
            self.remote = None
        else:
            # The ingress keeps a CPU copy of the model for what is not batched: /v1/kernels reads
            # its weights, /v1/explain runs one guarded pass on it (on one thread of this replica).
            self.predictor = BatchedPredictor(self.bundle, "cpu", "off", self.config.channels_last)
            self.metrics = ServiceMetrics(MAX_BATCH_SIZE_LIMIT, "cpu")
            self.batcher = None
            self.lanes = ForwardLanes(1, 1)
            self.remote = RemoteModel(model, self.config.batching.max_batch_size, self.config.ingress_group_wait_s)
        count_refusals_with(self.metrics.count_answer)  # 401/503/400 answered before a route
        shed_with(self.batcher.shed if self.batcher else None)  # as an overload starts (AdmissionGate.refused)
        # split: asked of the model deployment when first needed (model_runs_on)
        self._model_runs_on = (
            None if self.remote else {"device": self.predictor.device.type, "precision": self.predictor.precision}
        )
        self._apply_batching(self.config.batching)
        fast_classify.answer_with(self.classify_raw)  # raw-body classify without FastAPI's routing
        self.ready = True

    # --- Serve hooks --------------------------------------------------------------------

    def reconfigure(self, user_config: dict) -> None:
        """Live batching changes from the Serve config's user_config."""
        batching = BatchingConfig.model_validate({**self.config.batching.model_dump(), **(user_config or {})})
        self.config = self.config.model_copy(update={"batching": batching})
        self._apply_batching(batching)

    def _apply_batching(self, batching: BatchingConfig) -> None:
        if self.batcher is not None:
            self.batcher.apply(batching)
        else:
            self.remote.resize(batching.max_batch_size)  # a group is at most one batch of items
        resize_admission(batching.max_batch_size)

    async def check_health(self) -> None:
        """Fused: a tiny forward pass (ModelBatcher.check_health). Split: the model deployment has
        its own health check; this replica's event loop answering is its health."""
        if self.batcher is not None:
            await self.batcher.check_health()

    async def model_runs_on(self) -> dict:
        """Where and in what precision the forward pass runs: this replica's, or the model deployment's."""
        if self._model_runs_on is None:
            model = await self.remote.handle.describe.remote()
            self._model_runs_on = {key: model[key] for key in ("device", "precision")}
        return self._model_runs_on

    async def model_device(self) -> str:
        """Where the forward pass runs: "cpu" or "cuda"."""
        return (await self.model_runs_on())["device"]

    # --- helpers ------------------------------------------------------------------------

    def _prepare(
        self, data: bytes | ItemError, top_k: int, layers: tuple[str, ...], on_model: bool = False
    ) -> WorkItem | ItemError:
        """Decode and preprocess one image before it joins a batch; with `on_model`, a JPEG large
        enough to be worth it travels encoded and is decoded with its batch on the model's device."""
        if isinstance(data, ItemError):
            return data
        start = time.perf_counter()
        try:
            if on_model and self._worth_decoding_on_model(data):
                return WorkItem(image=None, encoded=data, top_k=top_k, layers=layers, enqueued_at=start)
            image = decode_image_bytes(data, self.config.limits.max_image_pixels)
            tensor = self.bundle.preprocess.to_model_size(image)  # uint8: the model's side normalises
        except ApiError as e:
            return ItemError(e.code, e.message, e.status)
        except Exception:  # noqa: BLE001 - not a bad image (decode.BAD_IMAGE_ERRORS are 400s): a bug of ours
            log.exception("decoding or preprocessing an image failed in convserve's own code")
            return ItemError("internal_error", "internal server error", 500)
        self.metrics.observe_preprocess(time.perf_counter() - start)
        return WorkItem(image=tensor, top_k=top_k, layers=layers, enqueued_at=time.perf_counter())

    def _worth_decoding_on_model(self, data: bytes) -> bool:
        """A JPEG whose header declares at least model_decode_min_pixels (ApiError 413 above the
        limit, as the CPU path answers); anything else is decoded here."""
        if sniff_format(data) != "jpeg" or (size := jpeg_size(data)) is None:
            return False
        check_pixels(size[0], size[1], self.config.limits.max_image_pixels)
        return size[0] * size[1] >= self.config.model_decode_min_pixels

    async def _decodes_on_model(self) -> bool:
        """Whether JPEGs go to the model's device encoded (ServeConfig.model_decode)."""
        mode = self.config.model_decode
        return mode == "on" or (mode == "auto" and await self.model_device() == "cuda")

    async def _prepare_all(
        self, images: list[bytes | ItemError], top_k: int, deadline: float, layers: tuple[str, ...] = ()
    ) -> list[WorkItem | ItemError]:
        """Decode a request's images, yielding to the event loop between them: a 64-image request
        must not hold up every other request's start (and deadline) while it decodes."""
        on_model = await self._decodes_on_model()
        prepared = []
        for i, data in enumerate(images):
            if i:
                await asyncio.sleep(0)
                if time.perf_counter() > deadline:
                    raise self._timeout_error()
            prepared.append(self._prepare(data, top_k, layers, on_model))
        return prepared

    def _timeout_error(self) -> ApiError:
        return timed_out(
            f"no answer within {self._time_budget_s():g} s (request_timeout_s less a margin); "
            "the service is busy, retry later"
        )

    def _time_budget_s(self) -> float:
        return max(0.1, self.config.request_timeout_s - TIMEOUT_MARGIN_S)

    async def _run(self, prepared: list[WorkItem | ItemError], deadline: float) -> list[ItemResult | ItemError]:
        """Batch the prepared items; 504 `timeout` past `deadline` (time.perf_counter()).

        Fused: on timeout the waiting callers are cancelled, and Ray drops cancelled callers from a
        batch before it runs. Split: the items carry the deadline to the model replica, which skips
        what expired while it queued."""
        work = [p for p in prepared if isinstance(p, WorkItem)]
        budget_s = max(0.0, deadline - time.perf_counter())
        try:
            async with asyncio.timeout(budget_s):
                if self.batcher is not None:
                    results = await self.batcher.run(work, others_coming=self.metrics.inflight > 1)
                else:
                    results = await self.remote.run(work, budget_s)
        except TimeoutError:
            raise self._timeout_error() from None
        except Shed:  # taken off the pacer's gate as an overload started (ModelBatcher.shed)
            raise shed(OVERLOADED_RETRY_AFTER_S) from None
        if any(isinstance(r, ItemError) and r.status == 504 for r in results):
            raise self._timeout_error()  # expired in the model replica's queue
        done = iter(results)
        return [next(done) if isinstance(p, WorkItem) else p for p in prepared]

    def _deadline(self) -> float:
        return time.perf_counter() + self._time_budget_s()

    def _predictions(self, result: ItemResult) -> list[dict]:
        return [{"label": p.label, "index": p.index, "score": round(p.score, 6)} for p in result.predictions]

    def _headers(self, results: list[ItemResult | ItemError], started: float) -> dict[str, str]:
        """X-Batch-Size (images in the largest forward pass that served this request) and
        Server-Timing (ms in the replica: waiting for a batch, in the forward pass, in all)."""
        done = [r for r in results if isinstance(r, ItemResult)]
        if not done:
            return {}
        queue_ms = 1000 * max(r.queue_s for r in done)
        inference_ms = 1000 * max(r.inference_s for r in done)
        total_ms = 1000 * (time.perf_counter() - started)
        return {
            "X-Batch-Size": str(max(r.batch_size for r in done)),
            "Server-Timing": f"queue;dur={queue_ms:.2f}, inference;dur={inference_ms:.2f}, total;dur={total_ms:.2f}",
        }

    async def _images(self, request: Request, endpoint: str) -> ImageRequest:
        req = await read_images(request, self.config.limits)
        self.metrics.count_images(endpoint, len(req.images))
        return req

    # --- routes -------------------------------------------------------------------------

    @api.post(CLASSIFY_PATH, openapi_extra={"requestBody": _IMAGE_BODY})
    async def classify(
        self, request: Request, top_k: int | None = Query(None, description="how many classes, 1..number of classes")
    ) -> Response:
        self.metrics.request_started()
        started = time.perf_counter()
        status = 500
        try:
            req = await self._images(request, "classify")
            body, headers = await self._classify(req, top_k, started)
            status = 200
            return json_response(body, headers=headers)
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.request_finished("classify", status)

    async def classify_raw(
        self, declared_length: str | None, chunks: AsyncIterator[bytes], top_k: int | None
    ) -> tuple[int, bytes, dict[str, str]] | None:
        """POST /v1/classify with one raw image, for service/fast_classify.py: (status, JSON body,
        headers) as the route would answer, or None if the client went away before its body came."""
        self.metrics.request_started()
        started = time.perf_counter()
        status = 500
        try:
            data = await read_limited(declared_length, chunks, self.config.limits.max_body_bytes)
            self.metrics.count_images("classify", 1)
            body, headers = await self._classify(ImageRequest(images=[data], multi=False), top_k, started)
            status = 200
            return 200, orjson.dumps(body), headers
        except ApiError as e:
            status = e.status
            return status, orjson.dumps(error_body(CLASSIFY_PATH, e.code, e.message)), e.headers or {}
        except ClientDisconnect:
            status = 499  # nginx's "client closed request": nobody to answer
            return None
        except Exception:  # noqa: BLE001 - as the app's handler of unexpected errors answers (_internal_error)
            log.exception("unhandled error")
            return status, orjson.dumps(error_body(CLASSIFY_PATH, "internal_error", "internal server error")), {}
        finally:
            self.metrics.request_finished("classify", status)

    async def _classify(self, req: ImageRequest, top_k: int | None, started: float) -> tuple[dict, dict[str, str]]:
        """The answer to a classify request, body and headers; ApiError if it fails as a whole."""
        deadline = started + self._time_budget_s()
        k = parse_top_k(
            req.top_k if req.top_k is not None else top_k, self.config.limits.default_top_k, len(self.bundle.labels)
        )
        prepared = await self._prepare_all(req.images, k, deadline)
        if not req.multi and isinstance(prepared[0], ItemError):
            err = prepared[0]
            raise ApiError(err.status, err.code, err.message)
        results = await self._run(prepared, deadline)
        model_id = self.bundle.model_id
        if not req.multi and isinstance(results[0], ItemError):  # e.g. a JPEG the model's side could not decode
            err = results[0]
            raise ApiError(err.status, err.code, err.message)
        if not req.multi:
            body = {"model": model_id, "predictions": self._predictions(results[0])}
        else:
            entries = [
                {"predictions": self._predictions(r)}
                if isinstance(r, ItemResult)
                else {"error": {"code": r.code, "message": r.message}}
                for r in results
            ]
            body = {"model": model_id, "results": entries}
        return body, self._headers(results, started)

    @api.post("/v1/feature-maps", openapi_extra={"requestBody": _IMAGE_BODY})
    async def feature_maps(
        self,
        request: Request,
        layer: list[str] | None = Query(None, description="layer name; may repeat; all named layers when absent"),
        format: str = Query("json", description="json | png | npy (png and npy take one layer)"),
        include: str | None = Query(None, description="'values' adds the maps themselves (base64 float32)"),
    ) -> Response:
        self.metrics.request_started()
        started = time.perf_counter()
        deadline = self._deadline()
        status = 500
        try:
            if format not in ("json", "png", "npy"):
                raise bad_request("invalid_parameter", f"format must be json, png or npy, got {format!r}")
            if include not in (None, "values"):
                raise bad_request("invalid_parameter", f"include must be 'values', got {include!r}")
            layers = tuple(layer) if layer else tuple(self.layer_names)
            unknown = [name for name in layers if name not in self.layer_names]
            if unknown:
                raise not_found("unknown_layer", f"unknown layer {unknown[0]!r}; layers: {', '.join(self.layer_names)}")
            if format != "json" and len(layers) != 1:
                raise bad_request("invalid_parameter", f"format={format} takes exactly one layer (?layer=NAME)")
            req = await self._images(request, "feature-maps")
            prepared = self._prepare(single_image(req), 1, layers)
            if isinstance(prepared, ItemError):
                raise ApiError(prepared.status, prepared.code, prepared.message)
            result = (await self._run([prepared], deadline))[0]
            headers = self._headers([result], started)
            if format == "png":
                response = Response(
                    to_png_grid(result.feature_maps[layers[0]]), media_type="image/png", headers=headers
                )
            elif format == "npy":
                response = Response(
                    to_npy(result.feature_maps[layers[0]]), media_type="application/octet-stream", headers=headers
                )
            else:
                body = {
                    "model": self.bundle.model_id,
                    "layers": [
                        layer_json(self.bundle.layer(name), result.feature_maps[name], include == "values")
                        for name in layers
                    ],
                }
                response = json_response(body, headers=headers)
            status = 200
            return response
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.request_finished("feature-maps", status)

    @api.get("/v1/model")
    async def model_info(self) -> Response:
        b = self.bundle
        metrics = b.manifest.get("metrics", {})
        return json_response(
            {
                "name": b.name,
                "version": b.version,
                "model": b.model_id,
                "architecture": b.arch,
                "architecture_args": b.arch_args,
                "labels": b.labels,
                "input_size": b.preprocess.input_size,
                "layers": [info.to_dict() for info in b.layers],
                "weights_sha256": b.weights_sha256,
                "accuracy": {k: v for k, v in metrics.items() if "top1" in k},
                **await self.model_runs_on(),  # device, precision
                "topology": self.config.topology,
                "batching": self.config.batching.model_dump(),
                "admission_limit": admission_limit(),  # follows max_batch_size (service/middleware.py)
                "admission_limit_overloaded": admission_limit_overloaded(),  # while refusing
                # split: one model replica's counters (the handle picks the replica)
                **({"model_replica": await self.remote.handle.describe.remote()} if self.remote else {}),
            }
        )

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return json_response({"status": "ok"})

    @api.get("/readyz")
    async def readyz(self) -> Response:
        if getattr(self, "ready", False):
            return json_response({"status": "ready", "model": self.bundle.model_id})
        return json_response({"error": {"code": "not_ready", "message": "model is loading"}}, 503)

    # --- the Open Inference Protocol (KServe V2) over HTTP: service/oip.py ---------------------------

    def _v2_model(self, name: str, version: str | None) -> None:
        if name != self.bundle.name or version not in (None, "", self.bundle.version):
            shown = f"{name!r}" + (f" version {version!r}" if version else "")
            raise OipError(
                404, f"unknown model {shown}; this server has '{self.bundle.name}' version '{self.bundle.version}'"
            )

    async def _v2_infer(self, req: oip.InferRequest, deadline: float) -> tuple[list[oip.Tensor], list[ItemResult]]:
        """Run an infer request through the same decode, batcher and model as V1; one tensor per
        requested output (default: probabilities). Any bad item fails the request, naming it."""
        if len(req.inputs) != 1 or req.inputs[0].name not in (oip.IMAGE_INPUT, oip.TENSOR_INPUT):
            names = [t.name for t in req.inputs]
            raise oip.bad(
                f"the model takes one input, '{oip.IMAGE_INPUT}' (BYTES [N]) or '{oip.TENSOR_INPUT}' "
                f"(FP32 or UINT8 [N,3,S,S]); got {names}"
            )
        wanted = req.outputs or [oip.RequestedOutput(oip.PROBABILITIES, req.binary_output)]
        layers = tuple(dict.fromkeys(o.name for o in wanted if o.name != oip.PROBABILITIES))
        unknown = [n for n in layers if n not in self.layer_names]
        if unknown:
            raise oip.bad(f"unknown output(s) {unknown}; outputs: {[oip.PROBABILITIES, *self.layer_names]}")
        x, num_classes = req.inputs[0], len(self.bundle.labels)
        n = x.shape[0] if x.shape else 0
        if n > self.config.limits.max_images_per_request:
            raise OipError(413, f"at most {self.config.limits.max_images_per_request} images per request, got {n}")
        if x.name == oip.IMAGE_INPUT:
            if x.datatype != "BYTES" or len(x.shape) not in (1, 2) or x.shape[1:] not in ([], [1]):
                raise oip.bad(f"input 'image' is BYTES [N] (encoded images), got {x.datatype} {x.shape}")
            self.metrics.count_images("v2/infer", n)
            prepared = await self._prepare_all(list(x.data), num_classes, deadline, layers)
        else:
            s = self.bundle.preprocess.input_size
            if x.datatype not in ("FP32", "UINT8") or x.shape[1:] != [3, s, s]:
                raise oip.bad(f"input 'input' is FP32 or UINT8 [N,3,{s},{s}], got {x.datatype} {x.shape}")
            if x.datatype == "FP32" and not np.isfinite(x.data).all():
                raise oip.bad("input 'input' holds NaN or infinite values")
            self.metrics.count_images("v2/infer", n)
            now = time.perf_counter()
            prepared = [
                WorkItem(
                    image=self.bundle.preprocess.to_model_size(torch.from_numpy(a.copy()))
                    if x.datatype == "UINT8"
                    else torch.from_numpy(a.copy()),
                    top_k=num_classes,
                    layers=layers,
                    enqueued_at=now,
                )
                for a in x.data
            ]
        results = await self._run(prepared, deadline)
        for i, r in enumerate(results):
            if isinstance(r, ItemError):
                raise OipError(r.status, f"input '{x.name}' element {i}: {r.message}")
        tensors = []
        for out in wanted:
            if out.name == oip.PROBABILITIES:
                probs = np.zeros((len(results), num_classes), dtype=np.float32)
                for row, r in enumerate(results):
                    for pred in r.predictions:
                        probs[row, pred.index] = pred.score
                if out.classification:
                    k = min(out.classification, num_classes)
                    rows = [oip.classification(p, k, self.bundle.labels) for p in probs]
                    tensors.append(oip.Tensor(out.name, "BYTES", [len(rows), k], [e for row in rows for e in row]))
                else:
                    tensors.append(oip.Tensor(out.name, "FP32", list(probs.shape), probs))
            else:
                maps = np.stack([r.feature_maps[out.name].numpy() for r in results]).astype(np.float32)
                tensors.append(oip.Tensor(out.name, "FP32", list(maps.shape), maps))
        return tensors, results

    @api.post("/v2/models/{model_name}/infer", tags=["v2"])
    @api.post("/v2/models/{model_name}/versions/{model_version}/infer", tags=["v2"])
    async def v2_infer(self, request: Request, model_name: str, model_version: str | None = None) -> Response:
        """Open Inference Protocol infer: JSON tensors, or the binary tensor data extension."""
        self.metrics.request_started()
        started, deadline, status = time.perf_counter(), self._deadline(), 500
        try:
            self._v2_model(model_name, model_version)
            # an ApiError (413 body, 504 deadline) is answered in the protocol's shape on /v2 too (error_response)
            body = await read_body(request, self.config.limits.max_body_bytes)
            req = oip.parse_http(body, request.headers.get(oip.HEADER_LENGTH))
            tensors, results = await self._v2_infer(req, deadline)
            binary = {o.name: o.binary for o in req.outputs} if req.outputs else {}
            payload, headers = oip.encode_http(
                self.bundle.name,
                self.bundle.version,
                req.id,
                [(t, binary.get(t.name, req.binary_output)) for t in tensors],
            )
            status = 200
            return Response(payload, headers={**headers, **self._headers(results, started)})
        except (OipError, ApiError) as e:
            status = e.status
            raise
        finally:
            self.metrics.request_finished("v2/infer", status, time.perf_counter() - started)

    V2_SERVER = {
        "name": "convserve",
        "version": api.version,
        "extensions": ["binary_tensor_data", "classification", "statistics"],
    }

    def _v2_model_metadata(self, name: str, version: str | None) -> dict:
        self._v2_model(name, version)
        b = self.bundle
        layers = [{"name": info.name, "shape": list(info.shape)} for info in b.layers]
        return oip.model_metadata(b.name, b.version, b.preprocess.input_size, len(b.labels), layers)

    @api.get("/v2", tags=["v2"])
    async def v2_server(self) -> Response:
        """Server metadata."""
        return json_response(self.V2_SERVER)

    @api.get("/v2/health/live", tags=["v2"])
    async def v2_live(self) -> Response:
        return json_response({"live": True})

    @api.get("/v2/health/ready", tags=["v2"])
    async def v2_ready(self) -> Response:
        ready = getattr(self, "ready", False)
        return json_response({"ready": ready}, 200 if ready else 503)

    @api.get("/v2/models/{model_name}", tags=["v2"])
    @api.get("/v2/models/{model_name}/versions/{model_version}", tags=["v2"])
    async def v2_model(self, model_name: str, model_version: str | None = None) -> Response:
        """Model metadata: the inputs (one of two forms) and the outputs, every named layer included."""
        return json_response(self._v2_model_metadata(model_name, model_version))

    @api.get("/v2/models/{model_name}/ready", tags=["v2"])
    @api.get("/v2/models/{model_name}/versions/{model_version}/ready", tags=["v2"])
    async def v2_model_ready(self, model_name: str, model_version: str | None = None) -> Response:
        self._v2_model(model_name, model_version)
        ready = getattr(self, "ready", False)
        return json_response({"name": model_name, "ready": ready}, 200 if ready else 503)

    @api.get("/v2/models/{model_name}/stats", tags=["v2"])
    @api.get("/v2/models/{model_name}/versions/{model_version}/stats", tags=["v2"])
    async def v2_model_stats(self, model_name: str, model_version: str | None = None) -> Response:
        """Triton's statistics extension, from this replica's own counters since it started (split:
        the batches from the model replica the handle picks)."""
        self._v2_model(model_name, model_version)
        t, last_inference_ms = dict(self.metrics.totals), self.metrics.last_inference_ms
        if self.remote is not None:
            model = await self.remote.handle.describe.remote()
            t |= {k: model[k] for k in ("batches", "images", "inference_ns", "queue_ns")}
            last_inference_ms = model["last_inference_ms"]
        t = collections.Counter(t)
        ok = self.metrics.answers_total

        def stat(count: int, ns: int) -> dict:
            return {"count": count, "ns": ns}

        return json_response(
            {
                "model_stats": [
                    {
                        "name": self.bundle.name,
                        "version": self.bundle.version,
                        "last_inference": int(last_inference_ms),
                        "inference_count": t["images"],
                        "execution_count": t["batches"],
                        "inference_stats": {
                            "success": stat(ok["success"], ok["success_ns"]),
                            "fail": stat(ok["fail"], ok["fail_ns"]),
                            "queue": stat(t["images"], t["queue_ns"]),
                            "compute_input": stat(t["images"], t["preprocess_ns"]),
                            "compute_infer": stat(t["batches"], t["inference_ns"]),
                            "compute_output": stat(0, 0),
                        },
                        "batch_stats": [],
                    }
                ]
            }
        )

    # --- the Open Inference Protocol over gRPC: Ray Serve's gRPC ingress calls these by RPC name ---

    def _grpc_refused(self, grpc_context, code, message: str, endpoint: str):
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        self.metrics.count_answer(endpoint, code.name)

    def _grpc_authorized(self, grpc_context, endpoint: str) -> bool:
        """The bearer token, from the call's `authorization` metadata, as for HTTP."""
        token = grpc_token()
        if token is None:
            return True
        metadata = dict(grpc_context.invocation_metadata())
        scheme, _, given = (metadata.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
            return True
        self._grpc_refused(grpc_context, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", endpoint)
        return False

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=getattr(self, "ready", False))

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context=None) -> pb.ModelReadyResponse:
        if not self._grpc_authorized(grpc_context, "grpc/ready"):
            return pb.ModelReadyResponse()
        known = request.name == self.bundle.name and request.version in ("", self.bundle.version)
        return pb.ModelReadyResponse(ready=known and getattr(self, "ready", False))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context=None) -> pb.ServerMetadataResponse:
        if not self._grpc_authorized(grpc_context, "grpc/metadata"):
            return pb.ServerMetadataResponse()
        return pb.ServerMetadataResponse(**self.V2_SERVER)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context=None) -> pb.ModelMetadataResponse:
        if not self._grpc_authorized(grpc_context, "grpc/metadata"):
            return pb.ModelMetadataResponse()
        try:
            doc = self._v2_model_metadata(request.name, request.version or None)
        except OipError as e:
            self._grpc_refused(
                grpc_context, GRPC_STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message, "grpc/metadata"
            )
            return pb.ModelMetadataResponse()
        return oip_grpc.model_metadata(doc)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context=None) -> pb.ModelInferResponse:
        """The same batcher and model as HTTP; admission control and auth as for HTTP."""
        endpoint = "grpc/infer"
        if not self._grpc_authorized(grpc_context, endpoint):
            return pb.ModelInferResponse()
        gate = admission_gate()
        if gate is not None and not gate.try_enter():
            message = f"the service is at capacity ({gate.in_flight} requests in progress); retry later"
            self._grpc_refused(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, endpoint)
            return pb.ModelInferResponse()
        self.metrics.request_started()
        started, deadline, status = time.perf_counter(), self._deadline(), 500
        try:
            self._v2_model(request.model_name, request.model_version or None)
            req = oip_grpc.parse_request(request)
            tensors, _ = await self._v2_infer(req, deadline)
            status = 200
            return oip_grpc.encode_response(self.bundle.name, self.bundle.version, req.id, tensors)
        except (OipError, ApiError) as e:
            status = e.status
            grpc_context.set_code(GRPC_STATUS.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
            return pb.ModelInferResponse()
        except Exception:  # noqa: BLE001 - a bug of ours: INTERNAL, logged, never the trace to the client
            log.exception("ModelInfer failed")
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details("internal server error")
            return pb.ModelInferResponse()
        finally:
            if gate is not None:
                gate.leave()
            code = "OK" if status == 200 else GRPC_STATUS.get(status, grpc.StatusCode.INTERNAL).name
            self.metrics.request_finished(endpoint, code, time.perf_counter() - started)

    # --- the explainer page (`GET /`, service/static/) and what it reads beyond the routes above ---

    @api.get("/", include_in_schema=False)
    async def explainer_page(self, request: Request) -> Response:
        """The explainer page (service/static/index.html), its base set to this application's root."""
        return Response(
            index_html(request.scope.get("root_path", ""), auth=resolve_auth_token(self.config) is not None),
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    @api.get("/static/{name:path}", include_in_schema=False)
    async def explainer_static(self, name: str) -> Response:
        found = static_file(name)
        if found is None:
            raise not_found("not_found", f"no static file {name!r}")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})

    @api.get("/v1/kernels", responses={200: {"content": {"image/png": {}}}})
    async def kernels(
        self,
        layer: str | None = Query(
            None,
            description="named layer (its first convolution) or a convolution's module "
            "path, e.g. stage1.block.conv2; default: the first named layer with one",
        ),
        format: str = Query("json", description="json (shape, stride, padding, base64 float32 weights) | png"),
    ) -> Response:
        """The learned kernels of one convolution: as JSON with its geometry, or as a PNG grid."""
        status = 500
        try:
            if format not in ("json", "png"):
                raise bad_request("invalid_parameter", f"format must be json or png, got {format!r}")
            response = self._kernels_cached(layer, format)
            status = 200
            return response
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.count_answer("kernels", status)

    def _kernels_cached(self, layer: str | None, format: str) -> Response:
        cache = self.__dict__.setdefault("_kernel_answers", {})
        named = [info.name for info in self.bundle.layers]
        model = self.predictor.model
        if layer is None:
            layer = next((n for n in named if has_conv(model, n)), None)
        if (layer, format) not in cache:
            if layer is None or not has_conv(model, layer):
                convs = ", ".join(n for n in named if has_conv(model, n))
                raise not_found("unknown_layer", f"no convolution named {layer!r}; layers with one: {convs}")
            info = kernel_info(model, layer, named)
            if format == "png":
                cache[(layer, format)] = (kernels_png(find_conv(model, layer)[1].weight), "image/png")
            else:
                cache[(layer, format)] = (orjson.dumps({"model": self.bundle.model_id, **info}), "application/json")
        content, media_type = cache[(layer, format)]
        return Response(content, media_type=media_type)

    @api.post("/v1/explain", openapi_extra={"requestBody": _IMAGE_BODY})
    async def explain(
        self,
        request: Request,
        top_k: int | None = Query(None, description="how many classes, 1..number of classes"),
        block: str | None = Query(None, description="residual block (module path) to take apart; default the first"),
    ) -> Response:
        """One image: top-k classes, the class activation map (CAM) of every class on the last stage
        (exact for global average pooling and a linear head: each map's mean is its logit), the
        preprocessed input the model saw, and one residual block's input, branch, sum and output.
        Tensors are base64 little-endian float32 in C order over their `shape`."""
        self.metrics.request_started()
        started = time.perf_counter()
        deadline = self._deadline()
        status = 500
        try:
            model = self.predictor.model
            if cam_layers(self.bundle.layers) is None:
                raise bad_request("unsupported_model", "this model's named layers do not end in a pool and a head")
            blocks = residual_blocks(model)
            if block is not None and block not in blocks:
                raise not_found("unknown_block", f"no residual block {block!r}; blocks: {', '.join(blocks) or 'none'}")
            req = await self._images(request, "explain")
            k = parse_top_k(
                req.top_k if req.top_k is not None else top_k, self.config.limits.default_top_k, len(self.bundle.labels)
            )
            prepared = self._prepare(single_image(req), k, ())
            if isinstance(prepared, ItemError):
                raise ApiError(prepared.status, prepared.code, prepared.message)
            layers = self.bundle.layers
            image = self.bundle.preprocess.normalize(prepared.image)  # what the model sees
            try:
                async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                    result = await asyncio.wrap_future(self.lanes.submit(explain_image, model, image, layers, block))
            except TimeoutError:
                raise self._timeout_error() from None
            body = explanation_json(result, image, layers, self.bundle.labels, k, self.bundle.preprocess)
            total_ms = 1000 * (time.perf_counter() - started)
            status = 200
            return json_response(
                {"model": self.bundle.model_id, **body}, headers={"Server-Timing": f"total;dur={total_ms:.2f}"}
            )
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.request_finished("explain", status)


def build_app(args: dict) -> serve.Application:
    """Application builder: the Serve config's `import_path`; its `args` arrive here."""
    return build_app_with_options(args)


def build_app_with_options(
    args: dict | None = None, options: dict | None = None, model_options: dict | None = None
) -> serve.Application:
    """The application with deployment `options` (see service/serve_config.py), for `make serve`;
    `model_options` for the split topology's ConvModel deployment.

    Under `serve deploy` / KubeRay, Ray applies the config file's `deployments` section itself.
    """
    config = ServeConfig.from_env(args or {})
    deployment = ConvServe.options(**(options or {}))
    # Ray 2.5x removed `version` from Deployment.options() but still deploys `_version` when set
    # (serve/_private/client.py: `deployment._version or get_random_string()`); a random version
    # restarts the replicas on every `serve.run`, even for a user_config change.
    # tests/test_serving.py (test_a_user_config_redeploy_reconfigures_the_running_replica) checks
    # that the replica is reconfigured in place, so a Ray that stops honouring it fails the tests.
    deployment._version = code_version(config)
    if config.topology == "fused":
        return deployment.bind(config.model_dump())
    model = ConvModel.options(**(model_options or {}))
    model._version = deployment._version
    return deployment.bind(config.model_dump(), model.bind(config.model_dump()))


def code_version(config: ServeConfig) -> str:
    """The deployment's version: the same for two deploys that differ only in `user_config`, so
    that Serve applies such a change by calling `reconfigure()` on the running replicas (no
    restart, no request lost); any other setting, this code or the bundle changes it, and Serve
    replaces the replicas. Without a version Serve makes a random one per deploy and restarts."""
    import hashlib
    from pathlib import Path

    # A secret dumps as "**********". The overload signal's token is made anew at each start of
    # `python -m service` (service/server.py): a second driver's redeploy does not know it.
    settings = config.model_dump(mode="json", exclude={"batching", "overload_signal_token"})
    if config.auth_token is not None:  # so that a new token counts as a change
        settings["auth_token"] = hashlib.sha256(config.auth_token.get_secret_value().encode()).hexdigest()
    source = b"".join(path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py")))
    bundle = Path(config.bundle_path or DEFAULT_BUNDLE) / "bundle.json"
    digest = hashlib.sha256(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS) + source)
    digest.update(bundle.read_bytes() if bundle.is_file() else b"")
    return digest.hexdigest()[:16]
