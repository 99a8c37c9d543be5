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


INGRESS, MODEL = "ConvServe", "ConvModel"  # the deployments (service/app.py, service/model_app.py)


def deployment_entry(doc: dict, name: str = INGRESS) -> dict:
    """The file's entry for a deployment: ConvServe (required: the fused replica, or the split
    topology's ingress) or ConvModel (the split topology's model deployment; {} when absent, and
    the code's defaults apply)."""
    deployments = app_entry(doc).get("deployments") or []
    names = [d.get("name") for d in deployments]
    if INGRESS not in names or any(n not in (INGRESS, MODEL) for n in names) or len(set(names)) != len(names):
        raise ServeConfigError(f"expected a deployment named {INGRESS} and optionally one named {MODEL}, got {names}")
    return next((d for d in deployments if d.get("name") == name), {})


def validate_serve_config(doc: dict) -> None:
    """Ray's schema, our typed app args and batching, and the invariants between them."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema(**doc)
    args = ServeConfig.model_validate(app_entry(doc).get("args") or {})
    dep = deployment_entry(doc)
    batching = BatchingConfig.model_validate(dep.get("user_config") or {})
    ongoing = dep.get("max_ongoing_requests", 5)
    if ongoing < batching.max_batch_size:
        raise ServeConfigError(
            f"max_ongoing_requests ({ongoing}) must be at least max_batch_size ({batching.max_batch_size}), "
            "or batches can never fill"
        )
    model = deployment_entry(doc, MODEL)
    if model and args.topology != "split":
        # Ray refuses a config entry for a deployment the application does not have.
        raise ServeConfigError(f"a {MODEL} deployment entry needs args.topology: split")
    if model and model.get("user_config") is not None and model["user_config"] != dep.get("user_config"):
        raise ServeConfigError(f"{MODEL}'s user_config must equal {INGRESS}'s: one batching for both levels")


def deployment_options(doc: dict, overrides: dict | None = None, name: str = INGRESS) -> dict:
    """`.options(...)` kwargs for a deployment from the file, with CLI overrides."""
    opts = copy.deepcopy({k: v for k, v in deployment_entry(doc, name).items() if k != "name"})
    for key, value in (overrides or {}).items():
        if key == "num_replicas":
            opts.pop("autoscaling_config", None)
            opts["num_replicas"] = value
        elif key in ("num_cpus", "num_gpus"):
            opts.setdefault("ray_actor_options", {})[key] = value
        else:
            opts[key] = value
    return opts
