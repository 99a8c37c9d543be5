"""All of convserve's settings, in one typed place.

`ServeConfig` is the application's own settings. Values come from (lowest to highest
precedence): the defaults below, the application `args` of the Serve config file
(deploy/serve_config.yaml), and environment variables named `CONVSERVE_<FIELD>` (for example
`CONVSERVE_BUNDLE_PATH`, `CONVSERVE_MAX_BATCH_SIZE`). Batching is also live-tunable through the
deployment's `user_config`, and for batching that is the one rule: the replica applies
`user_config` last (`ConvServe.reconfigure`), so it wins over the args and the environment.
`make serve` builds that `user_config` from the file's, with CONVSERVE_MAX_BATCH_SIZE /
CONVSERVE_BATCH_WAIT_TIMEOUT_S applied, so there the variables take effect; under `serve deploy`
or KubeRay, change `user_config` in the Serve config (the variables do not override it).
Replica options (replicas, autoscaling, CPUs/GPUs per replica, max_ongoing_requests,
max_queued_requests) are Ray Serve's and live in the Serve config file's
`deployments` section, validated by Ray's own schema (see service/serve_config.py).
Units are in the names.
"""

from __future__ import annotations

import os
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MiB = 1024 * 1024
MAX_BATCH_SIZE_LIMIT = 1024
MAX_FORWARD_LANES = 4


class Limits(BaseModel):
    """What one request may ask of the service. Each refusal is a 4xx with a JSON error."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 * MiB, gt=0, description="413 above this many request-body bytes")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="413 for an image declaring more pixels (checked before decoding)"
    )
    max_images_per_request: int = Field(64, gt=0, description="413 for a multi-image request with more")
    default_top_k: int = Field(5, gt=0, description="top_k when the request gives none")


class BatchingConfig(BaseModel):
    """Dynamic batching knobs; changeable at run time through the deployment's user_config."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, gt=0, le=MAX_BATCH_SIZE_LIMIT, description="images per forward pass, at most")
    batch_wait_timeout_s: float = Field(
        0.004, ge=0, le=1.0, description="how long the first request of a batch waits for company"
    )


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Topology (service/model_app.py): `fused`, one deployment does HTTP, decode, batching and the
    # forward pass; `split`, CPU ingress replicas decode and hand uint8 tensors through a
    # DeploymentHandle to a model deployment that batches across all of them (for GPUs).
    topology: Literal["fused", "split"] = Field(
        "fused", description="fused: one deployment; split: ingress deployment + model deployment (ConvModel)"
    )

    ingress_group_wait_s: float | None = Field(
        0.002,
        ge=0,
        le=1.0,
        description="split: how long an ingress replica's group of items waits for company while a call to "
        "the model deployment is in flight (service/grouping.py); None = no grouping, one call per request",
    )

    # The model
    bundle_path: str | None = Field(None, description="bundle directory; None = the embedded default model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp_dtype: Literal["bf16", "fp16", "off"] = Field("bf16", description="autocast dtype on CUDA")
    cpu_amp_dtype: Literal["bf16", "off"] = Field(
        "off",
        description="autocast dtype on a CPU; off = float32, the reference results. bf16 pays where the CPU "
        "has bf16 units (AVX512-BF16, AMX): 1.6x the images/s served at 128 connections on the 2-core machine, "
        "top-1 0.920 against 0.921 on the validation split (README, 'CPU precision')",
    )
    channels_last: bool = True
    torch_threads: int | None = Field(
        None, gt=0, description="intra-op threads per replica; None = Ray's default (the replica's num_cpus)"
    )
    forward_lanes: int | None = Field(
        None,
        gt=0,
        le=MAX_FORWARD_LANES,
        description="batches computed side by side, each on torch_threads / forward_lanes threads "
        "(service/lanes.py); None = 1 on a GPU, 2 on a CPU with 2 or more threads",
    )
    model_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="decode JPEGs in batches on the model's device (service/gpu_decode.py): auto = when the "
        "model runs on CUDA; on = also on a CPU (libjpeg-turbo in the forward lane; for tests); off = never",
    )
    model_decode_min_pixels: int = Field(
        16384,
        ge=0,
        description="only JPEGs declaring at least this many pixels go to the model's device: a 32x32 CIFAR "
        "image decodes in ~0.05 ms on a CPU, a 640x480 photo in ~2 ms (python -m loadtests.microbench decode)",
    )
    noop_forward: bool = Field(
        False,
        description="benchmarks only (python -m loadtests.bench --overhead): the forward pass is replaced by "
        "zeros of the same shapes, to measure what everything else costs; never set when serving",
    )
    warmup_batch_sizes: list[int] | None = Field(None, description="None = powers of two up to max_batch_size")

    # Batching defaults (the deployment's user_config overrides them, live)
    batching: BatchingConfig = BatchingConfig()

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    metrics_export_port: int = Field(8080, gt=0, lt=65536)
    grpc_port: int = Field(
        9000, ge=0, lt=65536, description="the Open Inference Protocol's gRPC port (Ray Serve's default); 0: no gRPC"
    )
    request_timeout_s: float = Field(30.0, gt=0)
    ingress: Literal["auto", "proxy", "haproxy"] = Field(
        "auto", description="auto = HAProxy when a haproxy binary is available, else Ray's Python proxy"
    )

    limits: Limits = Limits()

    # Reliability and security (service/middleware.py, docs/reliability.md)
    admission_batches: float = Field(
        4.0,
        ge=0,
        description="admission control: 503 `overloaded` at once while this many batches of max_batch_size "
        "requests are in the replica, so an admitted request waits about this many batch durations; 0 = off",
    )
    admission_batches_overloaded: float = Field(
        2.0,
        gt=0,
        description="the admission limit in batches while the replica is refusing (a refusal in the last "
        "second): under sustained overload admitted requests wait this many batches, not admission_batches",
    )
    haproxy_admission: bool = Field(
        True,
        description="with the HAProxy ingress of `python -m service`, HAProxy refuses past the admission limits "
        "itself, before a replica spends work on the refusal (service/haproxy_gate.py)",
    )
    overload_signal_token: SecretStr | None = Field(
        None,
        description="set by `python -m service` when HAProxy's gate is in front (a random value per start): the "
        "gate sends the first refusal of an overload on to the replica with this value in a header, and the "
        "replica sheds its newest waiting requests (docs/reliability.md, 'Overload'); None: no such signal",
    )
    auth_token: SecretStr | None = Field(
        None, description="bearer token required on /v1/* (CONVSERVE_AUTH_TOKEN); None = no auth"
    )
    auth_token_file: str | None = Field(
        None, description="file holding the bearer token (CONVSERVE_AUTH_TOKEN_FILE); used when auth_token is unset"
    )

    @classmethod
    def from_env(cls, base: dict | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
        """`base` (e.g. Serve config args) overridden by CONVSERVE_* environment variables."""
        environ = os.environ if environ is None else environ
        data = dict(base or {})
        batching = dict(data.pop("batching", {}) or {})
        limits = dict(data.pop("limits", {}) or {})
        for key, value in environ.items():
            if not key.startswith("CONVSERVE_"):
                continue
            field = key[len("CONVSERVE_") :].lower()
            if field in BatchingConfig.model_fields:
                batching[field] = value
            elif field in Limits.model_fields:
                limits[field] = value
            elif field in cls.model_fields and field not in ("batching", "limits"):
                if value.lower() == "none" and type(None) in typing.get_args(cls.model_fields[field].annotation):
                    data[field] = None  # an optional setting turned off, e.g. CONVSERVE_INGRESS_GROUP_WAIT_S=none
                else:
                    data[field] = value.split(",") if field == "warmup_batch_sizes" else value
            else:  # a typo would otherwise be ignored in silence
                known = sorted([*cls.model_fields, *BatchingConfig.model_fields, *Limits.model_fields])
                known = [f"CONVSERVE_{k.upper()}" for k in known if k not in ("batching", "limits")]
                raise ValueError(f"{key} is not a convserve setting; known: {', '.join(known)}")
        return cls.model_validate({**data, "batching": batching, "limits": limits})
