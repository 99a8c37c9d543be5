"""The explainer page (`GET /`) in a real headless Chromium against a real `python -m service`.

Chromium is Debian's (`apt-get install chromium`, as `.ci/run` does), driven by Playwright for
Python (a dev dependency) through `executable_path`: Playwright never downloads a browser here.
The tests skip only when no Chromium binary can be found. The service runs with bearer auth on, so
every test also shows that the page works with a token (asked for once).

Screenshots (390 x 844 and 1280 x 900, full page) are saved under results/explainer/.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from service.page import index_html
from tests.server_process import REPO_ROOT, ServiceProcess

pytestmark = pytest.mark.integration

TOKEN = "explainer-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cifar10-val-sample"
UPLOAD = FIXTURES / "dog" / "0003.jpg"  # not one of the page's samples
ARTEFACTS = REPO_ROOT / "results" / "explainer"
TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """$CONVSERVE_CHROMIUM, else Debian's chromium (or chromium-browser) on PATH."""
    for candidate in (os.environ.get("CONVSERVE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CONVSERVE_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def service(chromium_path):
    # The default ingress (HAProxy where a binary exists), as `make serve` runs it.
    svc = ServiceProcess(env={"CONVSERVE_AUTH_TOKEN": TOKEN}).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def browser(chromium_path, service):
    from playwright.sync_api import sync_playwright  # a dev dependency: missing is an error, not a skip

    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_info(service):
    return requests.get(service.base + "/v1/model", headers=AUTH, timeout=10).json()


class Watched:
    """A page with its console errors, uncaught exceptions and failed or refused requests recorded."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url}: HTTP {r.status}"))


def open_page(browser, service, viewport=(1280, 900), token: bool = True) -> Watched:
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    if token:
        context.add_init_script(f"sessionStorage.setItem('convserve-token', {TOKEN!r})")
    watched = Watched(context.new_page())
    watched.page.set_default_timeout(TIMEOUT_MS)
    watched.page.goto(service.base + "/")
    return watched


def wait_analysed(page, n: int) -> None:
    """Until the page has rendered its n-th image (1: the sample it loads by itself)."""
    page.wait_for_function(f"Number(document.body.dataset.analysed || 0) >= {n}", timeout=TIMEOUT_MS)


def upload(page, path: Path = UPLOAD) -> None:
    page.set_input_files("#file", str(path))
    wait_analysed(page, 2)


def classify_top1(service, body: bytes) -> str:
    resp = requests.post(
        service.base + "/v1/classify",
        data=body,
        headers={**AUTH, "Content-Type": "image/jpeg"},
        params={"top_k": 1},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"][0]["label"]


def test_explain_and_kernels_routes_share_the_api_contract(service, model_info):
    """Errors in the JSON envelope, auth, OpenAPI and metrics: what the page's two new routes share
    with the others (the browser is not needed for this, the service is)."""
    jpeg = UPLOAD.read_bytes()
    url = service.base + "/v1/explain"
    ok = requests.post(url, data=jpeg, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"top_k": 3}, timeout=30)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["model"] == model_info["model"] and len(body["predictions"]) == 3
    assert body["predictions"][0]["label"] == classify_top1(service, jpeg)
    assert body["cam"]["exact"] and body["cam"]["shape"] == [len(model_info["labels"]), 3, 3]
    cam = np.frombuffer(base64.b64decode(body["cam"]["values"]["data"]), "<f4").reshape(body["cam"]["shape"])
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), body["logits"], atol=1e-4)  # CAM mean = logit
    cases = [
        (requests.post(url, data=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=10), 401, "unauthorized"),
        (requests.post(url, data=b"x", headers={**AUTH, "Content-Type": "text/plain"}, timeout=10), 415, None),
        (
            requests.post(url, data=b"x", headers={**AUTH, "Content-Type": "image/png"}, timeout=10),
            400,
            "invalid_image",
        ),
        (
            requests.post(url, data=jpeg, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"top_k": 0}),
            400,
            None,
        ),
        (
            requests.post(url, data=jpeg, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"block": "stem"}),
            404,
            "unknown_block",
        ),
        (requests.get(service.base + "/v1/kernels", params={"layer": "nope"}, headers=AUTH), 404, "unknown_layer"),
        (requests.get(service.base + "/v1/kernels", params={"format": "gif"}, headers=AUTH), 400, "invalid_parameter"),
        (requests.get(service.base + "/v1/kernels", timeout=10), 401, "unauthorized"),
        (requests.get(service.base + "/static/../service/app.py", timeout=10), 404, None),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (resp.url, resp.text)
        err = resp.json()["error"]
        assert {"code", "message"} <= set(err) and (code is None or err["code"] == code), err
    png = requests.get(service.base + "/v1/kernels", params={"layer": "stage1", "format": "png"}, headers=AUTH)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    spec = requests.get(service.base + "/openapi.json", timeout=10).json()
    assert {"/v1/explain", "/v1/kernels"} <= set(spec["paths"])
    assert "/" not in spec["paths"]  # the page is not part of the API


def test_page_asks_for_the_token_once_then_explains_an_uploaded_image(browser, service, model_info):
    w = open_page(browser, service, token=False)
    page = w.page
    page.wait_for_selector("#auth:not([hidden])")
    assert page.locator("#arch .arch-item[data-name]").count() == 0  # nothing asked of /v1 before the token
    page.fill("#auth-token", TOKEN)
    page.press("#auth-token", "Enter")
    wait_analysed(page, 1)
    assert page.locator("#auth").is_hidden()
    upload(page)

    # the top-1 label equals /v1/classify's for the same bytes
    assert page.inner_text("#top1-label") == classify_top1(service, UPLOAD.read_bytes())
    # every feature-map image (and the other pictures) decoded
    widths = page.eval_on_selector_all(
        ".tile img, #rf-map-img, #seen, #cam-img, #kernels-img, #res-row img", "els => els.map(e => e.naturalWidth)"
    )
    n_tiles = sum(
        layer["shape"][0] for layer in model_info["layers"] if len(layer["shape"]) == 3 and layer["shape"][1] > 1
    )
    assert len(widths) >= n_tiles + 5 and all(wd > 0 for wd in widths), widths
    assert page.eval_on_selector_all("img", "els => els.filter(e => !e.alt).length") == 0  # text alternatives

    # the architecture blocks match /v1/model layer by layer
    blocks = page.eval_on_selector_all(
        "#arch .arch-item[data-name]",
        "els => els.map(e => [e.dataset.name, e.dataset.shape, e.dataset.stride, e.dataset.rf, e.dataset.start,"
        " e.innerText])",
    )
    assert [b[0] for b in blocks] == [layer["name"] for layer in model_info["layers"]]
    for (name, shape, stride, rf, start, text), layer in zip(blocks, model_info["layers"], strict=True):
        assert shape == "x".join(map(str, layer["shape"])), name
        assert (stride, rf, start) == (str(layer["stride"]), str(layer["receptive_field"]), str(layer["start"]))
        assert " \u00d7 ".join(map(str, layer["shape"])) in text and f"RF {layer['receptive_field']} px" in text
    heights = {b[0]: page.eval_on_selector(f'.arch-item[data-name="{b[0]}"] .arch-block', "e => e.offsetHeight")
               for b in blocks}  # fmt: skip
    assert heights["stem"] > heights["stage1"] > heights["stage2"]  # maps shrink...
    widths = {b[0]: page.eval_on_selector(f'.arch-item[data-name="{b[0]}"] .arch-block', "e => e.offsetWidth")
              for b in blocks}  # fmt: skip
    assert widths["stem"] < widths["stage1"] < widths["stage2"]  # ...while channels grow

    # a click on another class shows its CAM
    second = page.locator("#bars button").nth(1)
    second.click()
    assert page.get_attribute("#cam-img", "data-index") == second.get_attribute("data-index")
    assert "exact" in page.inner_text("#cam-cap")

    # asked once: a reload in the same tab does not ask again
    page.reload()
    wait_analysed(page, 1)
    assert page.locator("#auth").is_hidden()

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "explainer-desktop.png"), full_page=True)
    assert not w.errors, w.errors
    assert not w.failed, w.failed


def _outline(page) -> dict:
    return page.eval_on_selector("#rf-outline", "e => Object.assign({}, e.dataset)")


def test_receptive_field_outline_follows_stride_and_is_clipped(browser, service, model_info):
    w = open_page(browser, service)
    page = w.page
    wait_analysed(page, 1)
    layer = next(layer for layer in model_info["layers"] if layer["name"] == "stage2")
    stride, rf, start = layer["stride"], layer["receptive_field"], layer["start"]
    size = model_info["input_size"]
    page.click('.tile[data-layer="stage2"]')
    expected_cells = layer["shape"][1] * layer["shape"][2]
    assert page.locator("#rf-cells .cell").count() == expected_cells
    input_box = page.locator("#rf-input").bounding_box()
    seen = []
    for row, col in [(3, 4), (3, 5), (0, 0), (6, 6)]:
        page.hover(f'#rf-cells .cell[data-row="{row}"][data-col="{col}"]')
        got = {k: int(v) for k, v in _outline(page).items() if k in ("x0", "y0", "x1", "y1")}
        y0, x0 = start + row * stride, start + col * stride
        want = {
            "x0": max(0, x0),
            "y0": max(0, y0),
            "x1": min(size - 1, x0 + rf - 1),
            "y1": min(size - 1, y0 + rf - 1),
        }
        assert got == want, (row, col)
        # drawn at that size on the input picture (in CSS pixels, to within a pixel)
        box = page.locator("#rf-outline").bounding_box()
        scale = input_box["width"] / size
        assert math.isclose(box["width"], (want["x1"] - want["x0"] + 1) * scale, abs_tol=1.5)
        assert math.isclose(box["height"], (want["y1"] - want["y0"] + 1) * scale, abs_tol=1.5)
        seen.append(got)
    assert seen[1]["x0"] - seen[0]["x0"] == stride  # one cell right: the field moves by the stride
    assert seen[0]["x1"] == seen[1]["x1"] == size - 1  # ...clipped at the right border
    # keyboard: the same with the arrow keys on the focused map
    page.focus("#rf-map")
    page.keyboard.press("Home")
    assert int(_outline(page)["x0"]) == max(0, start)
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    assert int(_outline(page)["x0"]) == max(0, start + 5 * stride)
    assert not w.errors and not w.failed, (w.errors, w.failed)


def test_sliding_kernel_output_equals_the_served_feature_map(browser, service, model_info):
    w = open_page(browser, service)
    page = w.page
    wait_analysed(page, 1)
    upload(page)
    first = model_info["layers"][0]
    kernels = requests.get(service.base + "/v1/kernels", params={"layer": first["name"]}, headers=AUTH, timeout=10)
    assert kernels.status_code == 200, kernels.text
    k = kernels.json()
    npy = requests.post(
        service.base + "/v1/feature-maps",
        params={"layer": first["name"], "format": "npy"},
        data=UPLOAD.read_bytes(),
        headers={**AUTH, "Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert npy.status_code == 200, npy.text
    served = np.load(io.BytesIO(npy.content), allow_pickle=False)
    channel = 5
    page.select_option("#slide-channel", str(channel))
    page.check('input[name="stride"][value="1"]')
    got = page.evaluate("window.convserve.sliding()")
    assert (got["channel"], got["stride"]) == (channel, 1)
    values = np.array(got["values"]).reshape(got["rows"], got["cols"])
    assert values.shape == served.shape[1:]
    np.testing.assert_allclose(values, served[channel], rtol=1e-4, atol=1e-4)
    assert "largest difference" in page.inner_text("#slide-check")

    (pt, pb), (pl, pr) = k["padding"]
    kh = k["shape"][2]
    size = model_info["input_size"]
    for stride in (2, 3):
        page.check(f'input[name="stride"][value="{stride}"]')
        got = page.evaluate("window.convserve.sliding()")
        assert got["rows"] == (size + pt + pb - kh) // stride + 1
        assert f"= {got['rows']} rows" in page.inner_text("#slide-formula")
    # the animation steps cell by cell
    page.click("#slide-step")
    shown = page.inner_text("#slide-cell")
    page.click("#slide-step")
    assert page.inner_text("#slide-cell") != shown
    assert not w.errors and not w.failed, (w.errors, w.failed)


def test_samples_drop_and_paste_each_explain_their_image(browser, service):
    w = open_page(browser, service)
    page = w.page
    wait_analysed(page, 1)
    page.click('.sample[data-name="ship.jpg"]')
    wait_analysed(page, 2)
    ship = (REPO_ROOT / "service" / "static" / "samples" / "ship.jpg").read_bytes()
    assert page.inner_text("#top1-label") == classify_top1(service, ship)
    jpeg = list((FIXTURES / "horse").glob("*.jpg"))[0].read_bytes()
    make_file = (
        "bytes => { const dt = new DataTransfer();"
        " dt.items.add(new File([new Uint8Array(bytes)], 'x.jpg', {type: 'image/jpeg'})); return dt; }"
    )
    page.evaluate(
        f"bytes => document.getElementById('drop').dispatchEvent("
        f"new DragEvent('drop', {{dataTransfer: ({make_file})(bytes), bubbles: true, cancelable: true}}))",
        list(jpeg),
    )
    wait_analysed(page, 3)
    assert page.inner_text("#top1-label") == classify_top1(service, jpeg)
    page.evaluate(
        f"bytes => document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: ({make_file})(bytes)}}))",
        list(UPLOAD.read_bytes()),
    )
    wait_analysed(page, 4)
    assert page.inner_text("#top1-label") == classify_top1(service, UPLOAD.read_bytes())
    # keyboard: a feature-map tile is a button; Enter enlarges it in the receptive-field view
    page.focus('.tile[data-layer="stage1"]')
    page.keyboard.press("Enter")
    assert page.get_attribute("#rf-map", "data-layer") == "stage1"
    assert page.evaluate("document.activeElement.id") == "rf-map"
    assert not w.errors and not w.failed, (w.errors, w.failed)


def test_a_refused_image_shows_the_api_error_message(browser, service):
    w = open_page(browser, service)
    page = w.page
    wait_analysed(page, 1)
    page.set_input_files("#file", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_selector("#error:not([hidden])")
    expected = requests.post(
        service.base + "/v1/explain", data=b"not an image", headers={**AUTH, "Content-Type": "image/png"}, timeout=10
    ).json()["error"]
    text = page.inner_text("#error")
    assert expected["code"] in text and expected["message"] in text and "broken.png" in text
    assert page.evaluate("document.body.dataset.state") == "error"
    assert not [e for e in w.errors if "uncaught" in e], w.errors  # a 400, not a broken page


def test_phone_width_is_readable(browser, service):
    w = open_page(browser, service, viewport=(390, 844))
    page = w.page
    wait_analysed(page, 1)
    time.sleep(0.3)
    # no sideways scrolling: everything fits 390 px
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "explainer-phone.png"), full_page=True)
    assert not w.errors and not w.failed, (w.errors, w.failed)


def test_page_works_under_a_route_prefix(browser, service):
    """Serve passes an application's route_prefix as the ASGI root_path, and `GET /` then sets
    `<base href="ROOT_PATH/">` (service/page.py). Here the browser sees the service under /convserve/
    (requests forwarded with the prefix taken off, the page rendered as for that root_path): every
    request the page makes must stay under the prefix."""
    prefix = "/convserve"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('convserve-token', {TOKEN!r})")
    paths: list[str] = []

    def forward(route):
        path = route.request.url[len(service.base) :]
        paths.append(path)
        if path == prefix + "/":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=index_html(prefix, auth=True))
        elif path.startswith(prefix + "/"):
            route.fulfill(response=route.fetch(url=service.base + path[len(prefix) :]))
        else:
            route.fulfill(status=404, content_type="text/plain", body="outside the prefix")

    context.route(service.base + "/**", forward)
    w = Watched(context.new_page())
    w.page.set_default_timeout(TIMEOUT_MS)
    w.page.goto(service.base + prefix + "/")
    wait_analysed(w.page, 1)
    assert all(p.startswith(prefix + "/") for p in paths), paths
    assert {prefix + "/v1/model", prefix + "/v1/explain?top_k=10"} <= set(paths)
    assert not w.errors and not w.failed, (w.errors, w.failed)
    context.close()


def test_explain_and_kernels_are_counted_in_metrics(service):
    """Run last: the requests of the tests above (the page's and the API contract test's) have had
    time to reach Ray's metrics export by now."""
    wanted = {("explain", "200"), ("explain", "400"), ("kernels", "200"), ("kernels", "404")}
    deadline = time.monotonic() + 20
    while True:
        text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
        seen = {
            (labels.get("endpoint"), labels.get("status"))
            for line in text.splitlines()
            if line.startswith("ray_convserve_requests_total{")
            for labels in [dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))]
        }
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= seen, seen
