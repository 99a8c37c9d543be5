"""Unit tests (no Ray) for what the explainer page shows: start offsets, kernels, CAM, residual parts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.layers import describe_layers
from model.net import ConvServeNet
from service.explain import (
    conv_padding,
    explain,
    explanation_json,
    from_b64_float32,
    kernel_info,
    kernels_png,
    output_activation,
    residual_blocks,
)
from service.page import index_html, static_file

# --- start offsets (model/layers.py) -------------------------------------------------------------


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        *[
            nn.Conv2d(3, 4, 3, padding=1),  # "0": stride 1, rf 3, start -1
            nn.MaxPool2d(2, 2),  # "1": stride 2, rf 4, start -1
            nn.Conv2d(4, 4, 3, stride=2),  # "2": stride 4, rf 4 + 2 * 2 = 8, start -1
            nn.Conv2d(4, 4, 5, padding=2),  # "3": stride 4, rf 8 + 4 * 4 = 24, start -1 - 2 * 4 = -9
        ]
    ).eval()


def test_start_offsets_of_a_known_small_net():
    infos = {i.name: i for i in describe_layers(_small_net(), 32, ["0", "1", "2", "3"])}
    got = {n: (i.stride, i.receptive_field, i.start) for n, i in infos.items()}
    assert got == {"0": (1, 3, -1), "1": (2, 4, -1), "2": (4, 8, -1), "3": (4, 24, -9)}
    assert infos["3"].to_dict()["start"] == -9


def test_start_offsets_of_convservenet_and_the_exact_region_of_every_cell():
    torch.manual_seed(0)
    net = ConvServeNet(widths=(8, 16, 16)).eval()
    infos = {i.name: i for i in describe_layers(net, 32)}
    assert [infos[n].start for n in ("stem", "stage1", "stage2", "stage3")] == [0, -5, -15, -35]
    assert infos["pool"].start == 0 and infos["head"].start == 0
    # Gradient support of each cell of stage1 (a positive, linear copy of the net) is exactly
    # start + i * stride .. + receptive_field - 1, clipped to the image.
    from model.layers import _linearised

    lin = _linearised(net)
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    out = lin.stage1(lin.stem(x))
    info = infos["stage1"]
    for i, j in [(0, 0), (3, 5), (7, 14), (14, 14)]:
        grad = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)[0][0].abs().sum(0)
        rows = (grad.sum(1) > 0).nonzero().flatten()
        cols = (grad.sum(0) > 0).nonzero().flatten()
        y0, x0 = info.start + i * info.stride, info.start + j * info.stride
        assert (int(rows[0]), int(rows[-1])) == (max(0, y0), min(31, y0 + info.receptive_field - 1))
        assert (int(cols[0]), int(cols[-1])) == (max(0, x0), min(31, x0 + info.receptive_field - 1))


# --- kernels ----------------------------------------------------------------------------------------


def test_kernels_json_shape_geometry_and_weights(tiny_bundle):
    model = tiny_bundle.model
    named = [i.name for i in tiny_bundle.layers]
    info = kernel_info(model, "stem", named)
    conv = model.stem.conv
    assert info["module"] == "stem.conv"
    assert info["shape"] == list(conv.weight.shape) == [24, 3, 2, 2]
    assert info["stride"] == [1, 1] and info["padding"] == [[0, 0], [0, 0]] and info["dilation"] == [1, 1]
    weights = from_b64_float32(info["weights"], info["shape"])
    np.testing.assert_array_equal(weights, conv.weight.detach().numpy())
    np.testing.assert_array_equal(from_b64_float32(info["bias"], [24]), conv.bias.detach().numpy())
    assert info["layer_output"] == "gelu"  # the stem is GELU(conv(x)): what the page's animation applies
    deep = kernel_info(model, "stage1.block.conv2", named)
    assert deep["shape"] == [16, 16, 3, 3] and deep["padding"] == [[1, 1], [1, 1]] and deep["bias"] is None
    assert kernel_info(model, "stage1", named)["layer_output"] is None  # conv, pool, norm, block: more than that
    with pytest.raises(KeyError):
        kernel_info(model, "nope", named)


def test_output_activation_and_padding_are_derived_from_the_modules():
    conv = nn.Conv2d(3, 4, 3, padding="same")
    assert conv_padding(conv) == [[1, 1], [1, 1]]
    assert conv_padding(nn.Conv2d(3, 4, 4, padding="same")) == [[1, 2], [1, 2]]
    assert output_activation(conv, conv) == "identity"
    assert output_activation(nn.Sequential(conv, nn.ReLU()), conv) == "relu"
    assert output_activation(nn.Sequential(conv, nn.BatchNorm2d(4).eval().requires_grad_(False)), conv) in (
        None,
        "identity",  # a fresh BatchNorm is the identity up to eps
    )
    assert output_activation(nn.Sequential(conv, nn.Conv2d(4, 4, 1)), conv) is None


def test_kernels_png_is_a_grid_of_rgb_tiles(tiny_bundle):
    png = kernels_png(tiny_bundle.model.stem.conv.weight)
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB" and image.width > 24 * 4
    grey = Image.open(io.BytesIO(kernels_png(tiny_bundle.model.stage1.conv.weight)))
    assert grey.mode == "L"


# --- CAM and residual parts ------------------------------------------------------------------------


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bundle_name", ["tiny_bundle", "tiny_bundle_tta"])
def test_cam_is_the_head_weights_applied_to_the_last_stage_maps(bundle_name, request):
    bundle = request.getfixturevalue(bundle_name)
    model = bundle.model
    x = _image()
    e = explain(model, x, bundle.layers)
    assert e.cam_layer == "stage3" and e.cam.shape == (10, 3, 3)
    with torch.no_grad():
        logits = model(x[None])[0]

        def cam_of(img: torch.Tensor) -> torch.Tensor:
            maps = model.stage3(model.stage2(model.stage1(model.stem(img[None]))))[0]  # [C, h, w]
            w = model.head.linear.weight * model.head.scale  # [K, C], the head's fixed logit scale included
            return torch.einsum("kc,chw->khw", w, maps)

        expected = cam_of(x)
        if model.tta_flip:  # the served logits average the image and its mirror image
            expected = 0.5 * (expected + cam_of(x.flip(-1)).flip(-1))
    torch.testing.assert_close(e.cam, expected, rtol=1e-4, atol=1e-4)
    # exact for global average pooling + a linear head: each map's mean is that class's served logit
    torch.testing.assert_close(e.cam.mean(dim=(1, 2)), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e.logits, logits)
    assert e.cam_exact and e.pool_is_average


def test_cam_of_a_max_pooled_net_is_not_called_exact():
    torch.manual_seed(0)
    net = ConvServeNet(widths=(8, 16, 16), pool="max").eval()
    e = explain(net, _image(), describe_layers(net, 32))
    assert not e.pool_is_average and not e.cam_exact and e.notes


def test_residual_parts_add_up(tiny_bundle):
    model = tiny_bundle.model
    assert residual_blocks(model) == ["stage1.block", "stage2.block", "stage3.block"]
    x = _image(1)
    e = explain(model, x, tiny_bundle.layers)
    r = e.residual
    assert r.block == "stage1.block" and r.activation == "gelu"
    with torch.no_grad():
        stem = model.stem(x[None])
        s = model.stage1
        block_in = s.activ(s.norm(s.down(s.conv(stem))))[0]
        branch = s.block.norm2(s.block.conv2(s.block.activ(s.block.norm1(s.block.conv1(block_in[None])))))[0]
    torch.testing.assert_close(r.input, block_in)
    torch.testing.assert_close(r.branch, branch)
    torch.testing.assert_close(r.sum, block_in + branch)
    torch.testing.assert_close(r.output, F.gelu(block_in + branch))
    other = explain(model, x, tiny_bundle.layers, block="stage3.block").residual
    assert other.block == "stage3.block" and other.output.shape == (32, 3, 3)
    with pytest.raises(KeyError):
        explain(model, x, tiny_bundle.layers, block="stage1")


def test_torchvision_resnet_cam_and_basic_block_with_projection():
    from model import build_model

    net = build_model("torchvision:resnet18", {"num_classes": 10}).eval()
    layers = describe_layers(net, 64)
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    e = explain(net, x, layers, block="layer2.0")  # layer2.0 has a 1x1 stride-2 projection shortcut
    assert e.cam_layer == "layer4" and e.cam_exact
    r = e.residual
    assert r.activation == "relu" and not torch.equal(r.shortcut, r.input)
    torch.testing.assert_close(r.output, F.relu(r.sum))


def test_explanation_json_round_trips(tiny_bundle):
    x = _image(2)
    e = explain(tiny_bundle.model, x, tiny_bundle.layers)
    body = explanation_json(e, x, tiny_bundle.layers, tiny_bundle.labels, 3, tiny_bundle.preprocess)
    assert len(body["predictions"]) == 3
    assert body["predictions"][0]["index"] == int(e.logits.argmax())
    cam = from_b64_float32(body["cam"]["values"], body["cam"]["shape"])
    np.testing.assert_array_equal(cam, e.cam.numpy())
    assert (body["cam"]["stride"], body["cam"]["receptive_field"], body["cam"]["start"]) == (8, 79, -35)
    np.testing.assert_array_equal(from_b64_float32(body["input"]["values"], [3, 32, 32]), x.numpy())
    assert body["residual"]["shape"] == [16, 15, 15] and body["residual"]["shortcut_is_input"]


# --- the page's files -------------------------------------------------------------------------------


def test_index_html_sets_base_and_auth():
    page = index_html("")
    assert '<base href="/">' in page and 'content="none"' in page
    prefixed = index_html("/convserve", auth=True)
    assert '<base href="/convserve/">' in prefixed and 'content="bearer"' in prefixed
    assert "<!--BASE-->" not in prefixed and "<!--AUTH-->" not in prefixed
    # every URL the page uses is relative, so it resolves under the base (a prefix)
    for ref in ('src="static/', 'href="static/'):
        assert ref in page
    assert 'src="/' not in page and 'href="/' not in page.replace('<base href="/">', "")


def test_static_files_are_served_and_nothing_outside_them():
    content, media_type = static_file("explainer.js")
    assert media_type.startswith("text/javascript") and b"v1/explain" in content
    assert static_file("samples/cat.jpg")[1] == "image/jpeg"
    for name in ("../page.py", "/etc/passwd", "..%2fpage.py", "", "samples/../../app.py", "nope.js", "index.py"):
        assert static_file(name) is None, name
    js = static_file("explainer.js")[0].decode()
    assert "http://" not in js and "https://" not in js  # no CDN, nothing outside the service
