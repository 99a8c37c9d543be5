"""Response checks for the load tests: plain functions, no locust import.

Each `check_*` takes what came back (status, Content-Type, body) and what was asked, and returns
None when the response keeps the HTTP API contract (README.md, "HTTP API"), or a short message
saying what is wrong; the locustfile fails the request with that message.
"""

from __future__ import annotations

import json
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Bad(Exception):
    """One broken expectation; its message becomes the request's failure."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise Bad(message)


def _status_and_type(status: int, content_type: str | None, body: bytes, media: str) -> None:
    if status != 200:
        _expect(False, f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
    _expect((content_type or "").split(";")[0].strip().lower() == media, f"Content-Type {content_type!r}, not {media}")


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise Bad(f"body is not JSON: {e}") from None
    _expect(isinstance(doc, dict), f"body is JSON {type(doc).__name__}, not an object")
    return doc


def _model_id(doc: dict) -> None:
    _expect(
        isinstance(doc.get("model"), str) and bool(doc["model"]),
        f"'model' is not a non-empty string: {doc.get('model')!r}",
    )


def _predictions(preds: Any, top_k: int, labels: list[str] | None, where: str = "predictions") -> None:
    _expect(isinstance(preds, list), f"'{where}' is not a list")
    _expect(len(preds) == top_k, f"'{where}' has {len(preds)} entries, asked top_k={top_k}")
    scores = []
    for p in preds:
        _expect(isinstance(p, dict), f"'{where}' entry is not an object: {p!r}")
        label, score = p.get("label"), p.get("score")
        _expect(isinstance(label, str) and bool(label), f"label is not a string: {label!r}")
        _expect(labels is None or label in labels, f"label {label!r} is not one of the model's labels")
        _expect(isinstance(p.get("index"), int), f"index is not an integer: {p.get('index')!r}")
        _expect(isinstance(score, int | float) and 0.0 <= score <= 1.0, f"score not in [0, 1]: {score!r}")
        scores.append(score)
    _expect(scores == sorted(scores, reverse=True), f"scores not sorted in descending order: {scores}")


def _run(fn, *args) -> str | None:
    try:
        fn(*args)
    except Bad as e:
        return str(e)
    return None


def check_classify(status: int, content_type: str | None, body: bytes, top_k: int, labels=None) -> str | None:
    """One raw image: {"model", "predictions": [{"label", "index", "score"}] * top_k}."""

    def check():
        _status_and_type(status, content_type, body, "application/json")
        doc = _json(body)
        _model_id(doc)
        _predictions(doc.get("predictions"), top_k, labels)

    return _run(check)


def check_classify_multi(
    status: int, content_type: str | None, body: bytes, top_k: int, n_images: int, labels=None
) -> str | None:
    """Several images: {"model", "results": [{"predictions"}] * n_images}; every image here is valid."""

    def check():
        _status_and_type(status, content_type, body, "application/json")
        doc = _json(body)
        _model_id(doc)
        results = doc.get("results")
        _expect(isinstance(results, list), "'results' is not a list")
        _expect(len(results) == n_images, f"'results' has {len(results)} entries for {n_images} images")
        for i, entry in enumerate(results):
            _expect(isinstance(entry, dict), f"results[{i}] is not an object")
            _expect("error" not in entry, f"results[{i}] is an error: {entry.get('error')!r}")
            _predictions(entry.get("predictions"), top_k, labels, f"results[{i}].predictions")

    return _run(check)


def check_feature_maps_json(status: int, content_type: str | None, body: bytes, layers=None) -> str | None:
    """{"model", "layers": [{"name", "shape", ...}]}; with `layers`, exactly those names in order."""

    def check():
        _status_and_type(status, content_type, body, "application/json")
        doc = _json(body)
        _model_id(doc)
        got = doc.get("layers")
        _expect(isinstance(got, list) and bool(got), "'layers' is not a non-empty list")
        for entry in got:
            _expect(isinstance(entry, dict), f"layer entry is not an object: {entry!r}")
            _expect(isinstance(entry.get("name"), str), f"layer name is not a string: {entry.get('name')!r}")
            shape = entry.get("shape")
            _expect(
                isinstance(shape, list) and bool(shape) and all(isinstance(d, int) and d > 0 for d in shape),
                f"layer {entry.get('name')!r}: shape is not a list of positive integers: {shape!r}",
            )
        names = [entry["name"] for entry in got]
        _expect(layers is None or names == list(layers), f"layers {names}, expected {list(layers or [])}")

    return _run(check)


def check_png(status: int, content_type: str | None, body: bytes) -> str | None:
    """A PNG image (feature-map grid)."""

    def check():
        _status_and_type(status, content_type, body, "image/png")
        _expect(body.startswith(PNG_MAGIC), f"body does not start with the PNG signature: {body[:8]!r}")

    return _run(check)


def check_model_info(status: int, content_type: str | None, body: bytes) -> tuple[str | None, dict]:
    """GET /v1/model: (problem or None, the document)."""
    doc: dict = {}

    def check():
        nonlocal doc
        _status_and_type(status, content_type, body, "application/json")
        doc = _json(body)
        labels = doc.get("labels")
        _expect(isinstance(labels, list) and bool(labels), "'labels' is not a non-empty list")
        _expect(all(isinstance(x, str) for x in labels), "'labels' are not all strings")
        layers = doc.get("layers")
        _expect(
            isinstance(layers, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in layers),
            "bad 'layers'",
        )

    return _run(check), doc
