"""Locust load tests for convserve: real images against the HTTP API, every response checked.

Usually run through `make loadtest` / `python -m loadtests.run` (see README.md, "Load tests").
Directly:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 MixedUser                 # web UI
    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s --host URL MixedUser        # no shape
    LOAD_SHAPE=spike locust -f loadtests/locustfile.py --headless -u 8 -t 60s --host URL MixedUser

User classes (name one or more at the end of the command line, or list them, space-separated, in
the LOCUST_USER_CLASSES environment variable; with none named locust runs all of them, evenly):

    SingleImageClassify  POST /v1/classify, one CIFAR-10 JPEG as a raw image/jpeg body
    LargePhotoClassify   POST /v1/classify, one larger photo (224x224..1280x960; PNG, JPEG or WebP)
    MultiImageClassify   POST /v1/classify, multipart/form-data with 2-8 images, larger photos among them
    FeatureMapsJson      POST /v1/feature-maps, default JSON (every layer's shape and statistics)
    FeatureMapsPng       POST /v1/feature-maps?layer=stage1&format=png
    MixedUser            all of the above: 70% single, 10% multi, 10% larger photo, 5% fm json, 5% fm png

Each user waits 0-100 ms between requests. Every response is checked (loadtests/checks.py):
status 200, Content-Type, and the body's schema (model id, top_k predictions with known labels and
descending scores in [0, 1], one result per image sent, layers with name and shape, PNG
signature); a response that breaks the contract fails its request with a message saying how.

Load shape, from environment variables (read when this file is imported):

    LOAD_SHAPE       none (default: locust's -u/-r/-t alone), steady, step or spike (loadtests/shapes.py)
    LOAD_USERS       users (the peak for step and spike); default: -u, else 8
    LOAD_SPAWN_RATE  users started per second; default: -r, else the users
    LOAD_TIME_S      seconds the shape runs; default: -t, else 30

Payloads come from loadtests/payloads/ (`python -m loadtests.make_payloads` makes them).
"""

from __future__ import annotations

import csv
import os
import random
import sys
import uuid
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # locust puts only this file's directory on sys.path
    sys.path.insert(0, _ROOT)

from loadtests import checks, shapes  # noqa: E402

DEFAULT_HOST = "http://127.0.0.1:8000"
PAYLOADS = Path(__file__).resolve().parent / "payloads"
MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
TOP_KS = (1, 3, 5)
MAX_MULTIPART_BYTES = 6 * 1024 * 1024  # the service refuses bodies over 8 MiB (max_body_bytes)
FEATURE_MAP_PNG_LAYER = "stage1"


def _load(pattern: str) -> list[tuple[str, bytes, str]]:
    files = sorted(PAYLOADS.glob(pattern))
    if not files:
        raise SystemExit(f"no {pattern} in {PAYLOADS}: run `python -m loadtests.make_payloads`")
    return [(p.name, p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in files]


CIFAR = _load("cifar-*.jpg")  # (name, bytes, media type)
PHOTOS = _load("photo-*.*")

# Labels and layer names from GET /v1/model, fetched by the first user to start (per process).
MODEL: dict[str, list[str]] = {}


_ENVIRONMENT = {}


@events.init.add_listener
def _remember_environment(environment, **_kwargs) -> None:
    _ENVIRONMENT["env"] = environment


@events.quit.add_listener
def _write_final_csv(**_kwargs) -> None:
    """Locust rewrites its --csv files every second while it runs, but not when it stops; write them
    once more at the end so that locust_stats.csv holds the same final figures as the printed summary."""
    env = _ENVIRONMENT.get("env")
    prefix = getattr(env.parsed_options, "csv_prefix", None) if env and env.parsed_options else None
    if not prefix:
        return
    stats_csv = StatsCSV(env, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        stats_csv.requests_csv(csv.writer(f))
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        stats_csv.failures_csv(csv.writer(f))


def multipart(images: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one part named `image` per image, and its Content-Type."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in data for _, data, _ in images):
        boundary = uuid.uuid4().hex
    parts = []
    for name, data, media in images:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        parts.append(head.encode() + f"Content-Type: {media}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _verdict(resp, problem: str | None) -> None:
    """Mark a catch_response request; a transport error (status 0) says what it was."""
    if problem and resp.status_code == 0:
        problem = f"no response: {getattr(resp, 'error', None)!r}"
    if problem:
        resp.failure(problem)
    else:
        resp.success()


def _content_type(resp) -> str | None:
    return resp.headers.get("content-type") if resp.headers else None


class ConvServeUser(FastHttpUser):
    """The requests every user class draws on; not run by itself."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.rng = random.Random()
        if not MODEL:
            self.fetch_model()

    def fetch_model(self) -> None:
        with self.client.get("/v1/model", name="/v1/model", catch_response=True) as resp:
            problem, doc = checks.check_model_info(resp.status_code, _content_type(resp), resp.content or b"")
            _verdict(resp, problem)
        if problem is None:
            MODEL["labels"] = list(doc["labels"])
            MODEL["layers"] = [layer["name"] for layer in doc["layers"]]

    def _classify_raw(self, payload: tuple[str, bytes, str], name: str) -> None:
        _, data, media = payload
        top_k = self.rng.choice(TOP_KS)
        with self.client.post(
            f"/v1/classify?top_k={top_k}",
            data=data,
            headers={"Content-Type": media},
            name=name,
            catch_response=True,
        ) as resp:
            content = resp.content or b""
            problem = checks.check_classify(resp.status_code, _content_type(resp), content, top_k, MODEL.get("labels"))
            # Name the image only when the service refused it; otherwise equal problems group together.
            _verdict(resp, problem and (f"{payload[0]}: {problem}" if resp.status_code >= 400 else problem))

    def classify_cifar(self) -> None:
        self._classify_raw(self.rng.choice(CIFAR), "/v1/classify [cifar jpeg]")

    def classify_photo(self) -> None:
        self._classify_raw(self.rng.choice(PHOTOS), "/v1/classify [larger photo]")

    def classify_multi(self) -> None:
        n = self.rng.randint(2, 8)
        images = [self.rng.choice(PHOTOS)]  # at least one larger photo
        size = len(images[0][1])
        while len(images) < n:
            pick = self.rng.choice(PHOTOS) if self.rng.random() < 0.2 else self.rng.choice(CIFAR)
            if size + len(pick[1]) > MAX_MULTIPART_BYTES:
                pick = self.rng.choice(CIFAR)
            images.append(pick)
            size += len(pick[1])
        self.rng.shuffle(images)
        body, content_type = multipart(images)
        top_k = self.rng.choice(TOP_KS)
        with self.client.post(
            f"/v1/classify?top_k={top_k}",
            data=body,
            headers={"Content-Type": content_type},
            name="/v1/classify [multipart 2-8]",
            catch_response=True,
        ) as resp:
            problem = checks.check_classify_multi(
                resp.status_code, _content_type(resp), resp.content or b"", top_k, n, MODEL.get("labels")
            )
            _verdict(resp, problem)

    def feature_maps_json(self) -> None:
        _, data, media = self.rng.choice(CIFAR)
        with self.client.post(
            "/v1/feature-maps",
            data=data,
            headers={"Content-Type": media},
            name="/v1/feature-maps [json]",
            catch_response=True,
        ) as resp:
            problem = checks.check_feature_maps_json(
                resp.status_code, _content_type(resp), resp.content or b"", MODEL.get("layers")
            )
            _verdict(resp, problem)

    def feature_maps_png(self) -> None:
        _, data, media = self.rng.choice(CIFAR)
        with self.client.post(
            f"/v1/feature-maps?layer={FEATURE_MAP_PNG_LAYER}&format=png",
            data=data,
            headers={"Content-Type": media},
            name=f"/v1/feature-maps [png {FEATURE_MAP_PNG_LAYER}]",
            catch_response=True,
        ) as resp:
            _verdict(resp, checks.check_png(resp.status_code, _content_type(resp), resp.content or b""))


class SingleImageClassify(ConvServeUser):
    @task
    def classify(self) -> None:
        self.classify_cifar()


class LargePhotoClassify(ConvServeUser):
    @task
    def classify(self) -> None:
        self.classify_photo()


class MultiImageClassify(ConvServeUser):
    @task
    def classify(self) -> None:
        self.classify_multi()


class FeatureMapsJson(ConvServeUser):
    @task
    def feature_maps(self) -> None:
        self.feature_maps_json()


class FeatureMapsPng(ConvServeUser):
    @task
    def feature_maps(self) -> None:
        self.feature_maps_png()


class MixedUser(ConvServeUser):
    @task(70)
    def single(self) -> None:
        self.classify_cifar()

    @task(10)
    def multi(self) -> None:
        self.classify_multi()

    @task(10)
    def photo(self) -> None:
        self.classify_photo()

    @task(5)
    def fm_json(self) -> None:
        self.feature_maps_json()

    @task(5)
    def fm_png(self) -> None:
        self.feature_maps_png()


LOAD_SHAPE = os.environ.get("LOAD_SHAPE", "none").strip().lower() or "none"
if LOAD_SHAPE not in shapes.SHAPES:
    raise SystemExit(f"LOAD_SHAPE={LOAD_SHAPE!r}: choose one of {', '.join(shapes.SHAPES)}")


def _setting(env: str, options, option: str, default: float) -> float:
    """An env var, else the locust option (-u, -r, -t), else the default."""
    if os.environ.get(env):
        return float(os.environ[env])
    value = getattr(options, option, None)
    return float(value) if value else default


if LOAD_SHAPE != "none":
    # Defined only when a shape is asked for: locust uses a LoadTestShape whenever the file has one.

    class SelectedShape(LoadTestShape):
        """The LOAD_SHAPE shape from loadtests/shapes.py; reads -u/-r/-t where LOAD_* are unset."""

        use_common_options = True  # -u, -r and -t feed the shape rather than being ignored

        def __init__(self) -> None:
            super().__init__()
            self._shape: shapes.Shape | None = None

        @property
        def shape(self) -> shapes.Shape:
            if self._shape is None:
                options = self.runner.environment.parsed_options if self.runner else None
                users = int(_setting("LOAD_USERS", options, "num_users", 8))
                rate = _setting("LOAD_SPAWN_RATE", options, "spawn_rate", users)
                time_s = _setting("LOAD_TIME_S", options, "run_time", 30)
                self._shape = shapes.make_shape(LOAD_SHAPE, users, rate, time_s)
            return self._shape

        def tick(self) -> tuple[int, float] | None:
            return self.shape.tick(self.get_run_time())
