"""The Serve config file (deploy/serve_config.yaml): read, validate, and apply to the app.

Ray Serve's own schema (`ServeDeploySchema`) validates the file; `ServeConfig` validates the
application `args` and `BatchingConfig` the deployment's `user_config`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from service.config import BatchingConfig, ServeConfig

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve_config.yaml"


class ServeConfigError(ValueError):
    pass


def load_serve_config(path: str | Path = DEFAULT_SERVE_CONFIG) -> dict:
    doc = yaml.safe_load(Path(path).read_text())
    validate_serve_config(doc)
    return doc


def app_entry(doc: dict) -> dict:
    apps = doc.get("applications") or []
    if len(apps) != 1:
        raise ServeConfigError(f"expected exactly one application, found {len(apps)}")
    return apps[0]


def deployment_entry(doc: dict) -> dict:
    deployments = app_entry(doc).get("deployments") or []
    if len(deployments) != 1 or deployments[0].get("name") != "ConvServe":
        raise ServeConfigError("expected exactly one deployment named ConvServe")
    return deployments[0]


def validate_serve_config(doc: dict) -> None:
    """Ray's schema, our typed app args and batching, and the invariants between them."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema(**doc)
    ServeConfig.model_validate(app_entry(doc).get("args") or {})
    dep = deployment_entry(doc)
    batching = BatchingConfig.model_validate(dep.get("user_config") or {})
    ongoing = dep.get("max_ongoing_requests", 5)
    if ongoing < batching.max_batch_size:
        raise ServeConfigError(
            f"max_ongoing_requests ({ongoing}) must be at least max_batch_size ({batching.max_batch_size}), "
            "or batches can never fill"
        )


def deployment_options(doc: dict, overrides: dict | None = None) -> dict:
    """`.options(...)` kwargs for the ConvServe deployment from the file, with CLI overrides."""
    opts = copy.deepcopy({k: v for k, v in deployment_entry(doc).items() if k != "name"})
    for key, value in (overrides or {}).items():
        if key == "num_replicas":
            opts.pop("autoscaling_config", None)
            opts["num_replicas"] = value
        elif key in ("num_cpus", "num_gpus"):
            opts.setdefault("ray_actor_options", {})[key] = value
        else:
            opts[key] = value
    return opts
