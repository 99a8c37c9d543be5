"""What the explainer page (`GET /`) shows, computed from the served network: plain PyTorch, no Ray.

- `kernel_info` / `kernels_png`: the learned kernels of any convolution, with the geometry a reader
  needs to slide them by hand (stride, padding, dilation) and what the named layer does after it.
- `explain`: one forward pass of one image that records the class activation maps (CAM) of every
  class and the parts of one residual block.

CAM: for a network that ends in global average pooling and an affine head,
logit_c = mean_ij(cam_c[i, j]) with cam_c = W_c . A[:, i, j] + b_c, where A are the last spatial
stage's maps and W, b the head's effective weights (derived by evaluating the head, so a fixed
logit scale is part of W). A model with mirror averaging (`tta_flip`) scores x and its mirror
image; its CAM is the mean of both maps, the mirror's flipped back. `exact` says whether the
mean of each map equals the served logit (checked, not assumed).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.layers import LayerInfo

log = logging.getLogger(__name__)

KERNEL_TILE_MIN_PX = 24  # upscale small kernels so one is at least this many pixels across
GAP_PX = 2

# What a named layer may do to its first convolution's output; checked numerically (`output_activation`).
_CANDIDATE_ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def b64_float32(t: torch.Tensor) -> dict:
    """Little-endian float32, C order, base64: the `values` encoding of /v1/feature-maps."""
    array = t.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False)
    return {"dtype": "float32", "encoding": "base64", "data": base64.b64encode(array.tobytes()).decode()}


def from_b64_float32(obj: dict, shape: list[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["data"]), dtype="<f4").reshape(shape)


# --- kernels ------------------------------------------------------------------------------------


def conv_modules(model: nn.Module) -> list[str]:
    """Every Conv2d of the model by module path, in registration (for these nets: forward) order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def find_conv(model: nn.Module, name: str) -> tuple[str, nn.Conv2d]:
    """The convolution named `name` (a module path), or the first one inside the module `name`
    (a named layer such as `stem`). KeyError when there is none."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if module is None:
        raise KeyError(name)
    if isinstance(module, nn.Conv2d):
        return name, module
    for sub, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.{sub}", m
    raise KeyError(name)


def has_conv(model: nn.Module, name: str) -> bool:
    try:
        find_conv(model, name)
    except KeyError:
        return False
    return True


def conv_padding(conv: nn.Conv2d) -> list[list[int]]:
    """[[top, bottom], [left, right]] zero padding, with PyTorch's split for padding='same'."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [[0, 0], [0, 0]]
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            out.append([total // 2, total - total // 2])
        return out
    return [[p, p] for p in conv.padding]


@torch.no_grad()
def output_activation(layer: nn.Module, conv: nn.Conv2d) -> str | None:
    """What `layer`'s output is in terms of `conv`'s: 'identity', 'relu', 'gelu', ... when
    layer(x) == act(conv(x)) on a random input, else None (the layer does more than that)."""
    if layer is conv:
        return "identity"
    k = max(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, 3 * k + 5, 3 * k + 5, generator=torch.Generator().manual_seed(0))
    x = x.to(conv.weight.device, conv.weight.dtype)
    try:
        out = layer(x)
    except (RuntimeError, TypeError, ValueError) as e:  # the layer takes more than this conv's input
        log.info("layer_output unknown: %s does not run on a probe of its first conv's input (%s: %s)",
                 type(layer).__name__, type(e).__name__, e)  # fmt: skip
        return None
    pre = conv(x)
    if not isinstance(out, torch.Tensor) or out.shape != pre.shape:
        return None
    for name, act in _CANDIDATE_ACTIVATIONS.items():
        if torch.allclose(out, act(pre), rtol=1e-5, atol=1e-5):
            return name
    return None


def kernel_info(model: nn.Module, name: str, named: list[str]) -> dict:
    """JSON-ready description of a convolution's kernels (`name`: named layer or module path)."""
    path, conv = find_conv(model, name)
    layer_name = name if name in named else None
    layer = model.get_submodule(name) if layer_name else None
    weight = conv.weight.detach().float().cpu()
    return {
        "layer": name,
        "module": path,
        "shape": list(weight.shape),  # [out_channels, in_channels / groups, kh, kw]
        "stride": list(conv.stride),
        "padding": conv_padding(conv),  # [[top, bottom], [left, right]]
        "padding_mode": conv.padding_mode,
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "weights": b64_float32(weight),
        "bias": b64_float32(conv.bias) if conv.bias is not None else None,
        # The named layer's output as a function of this convolution's (checked numerically), e.g.
        # 'gelu': layer(x) = gelu(conv(x)); null when the layer does more than one activation after it.
        "layer_output": output_activation(layer, conv) if layer is not None else None,
        "convs": [f"{name}.{c}" for c in conv_modules(model.get_submodule(name)) if c],  # others inside it
    }


def kernels_png(weight: torch.Tensor) -> bytes:
    """[out, in, kh, kw] kernels as a grid of tiles, one per output channel.

    Three input channels: an RGB tile per kernel, 0 at mid-grey, each scaled to its own largest
    |weight|. Otherwise: a grey tile of the kernel summed over its input channels, same scaling.
    """
    w = weight.detach().float().cpu()
    tiles = w if w.shape[1] == 3 else w.sum(dim=1, keepdim=True)
    scale = tiles.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    tiles = ((tiles / scale) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    n, c, kh, kw = tiles.shape
    up = max(1, math.ceil(KERNEL_TILE_MIN_PX / max(kh, kw)))
    tiles = tiles.repeat_interleave(up, dim=2).repeat_interleave(up, dim=3)
    th, tw = kh * up, kw * up
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (th + GAP_PX) + GAP_PX, cols * (tw + GAP_PX) + GAP_PX), 40, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = GAP_PX + r * (th + GAP_PX), GAP_PX + col * (tw + GAP_PX)
        grid[:, y : y + th, x : x + tw] = tiles[i]
    array = grid.permute(1, 2, 0).numpy() if c == 3 else grid[0].numpy()
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB" if c == 3 else "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --- one explained forward pass -------------------------------------------------------------------


@dataclass
class ResidualParts:
    """One residual block: output = activation(input' + branch), input' = the shortcut of the input."""

    block: str
    input: torch.Tensor  # [C, H, W] what enters the block
    shortcut: torch.Tensor  # the input as added (a projection where the block has one)
    branch: torch.Tensor  # the residual branch's output
    sum: torch.Tensor  # shortcut + branch
    output: torch.Tensor  # the block's output
    activation: str | None  # output = activation(sum), checked numerically


@dataclass
class Explanation:
    logits: torch.Tensor  # [K] as served (mirror-averaged where the model does that)
    probabilities: torch.Tensor  # [K]
    cam_layer: str
    cam: torch.Tensor  # [K, h, w]
    cam_exact: bool  # every map's mean equals its logit
    pool_is_average: bool
    residual: ResidualParts | None = None
    notes: list[str] = field(default_factory=list)


def residual_blocks(model: nn.Module) -> list[str]:
    """Module paths of the residual blocks `explain` can take apart, in registration order."""
    return [name for name, m in model.named_modules() if _branch_end(m) is not None]


def _branch_end(block: nn.Module) -> str | None:
    """The submodule whose output is the residual branch's output, for the block types known here:
    ConvServeNet's ResidualBlock (norm2) and torchvision's BasicBlock (bn2) and Bottleneck (bn3)."""
    from model.net import ResidualBlock

    if isinstance(block, ResidualBlock):
        return "norm2"
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if isinstance(block, BasicBlock):
        return "bn2"
    if isinstance(block, Bottleneck):
        return "bn3"
    return None


def _record(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """`model(x)`, with the first input and the output of each named submodule (this thread's pass only)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(name: str, args: tuple, out: torch.Tensor) -> None:
        if threading.get_ident() == owner and name not in outputs:
            # copies: later in-place operations (torchvision's `out += identity`, ReLU(inplace=True))
            # would change what was recorded
            inputs[name] = args[0].clone() if args else None
            outputs[name] = out.clone()

    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, a, o, n=n: hook(n, a, o)) for n in dict.fromkeys(names)
    ]
    try:
        result = model(x)
    finally:
        for h in handles:
            h.remove()
    return result, inputs, outputs


def cam_layers(layers: list[LayerInfo]) -> tuple[str, str, str] | None:
    """(last spatial stage, global pool, head) from the named layers: the head is the last layer
    (a vector), the pool the one before it (C x 1 x 1), the stage the one before that (C x H x W)."""
    if len(layers) < 3:
        return None
    stage, pool, head = layers[-3], layers[-2], layers[-1]
    if len(head.shape) != 1 or len(pool.shape) not in (1, 3) or len(stage.shape) != 3:
        return None
    if len(pool.shape) == 3 and pool.shape[1:] != (1, 1):
        return None
    return stage.name, pool.name, head.name


def _head_affine(head: nn.Module, example_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective (W [K, C], b [K]) of `head`, by evaluating it at 0 and at each basis vector."""
    shape = example_input.shape[1:]
    c = int(np.prod(shape))
    basis = torch.cat([torch.zeros(1, c), torch.eye(c)]).to(example_input.device, example_input.dtype)
    out = head(basis.view(c + 1, *shape)).float()
    b = out[0]
    return (out[1:] - b).T.contiguous(), b


@torch.no_grad()
def explain(model: nn.Module, image: torch.Tensor, layers: list[LayerInfo], block: str | None = None) -> Explanation:
    """One forward pass of one preprocessed image [3, S, S]: logits, CAM of every class, one
    residual block's parts (`block`, a module path; default the first one found; none if the model
    has none)."""
    found = cam_layers(layers)
    if found is None:
        raise ValueError("the named layers do not end in a spatial stage, a global pool and a head")
    stage_name, pool_name, head_name = found
    blocks = residual_blocks(model)
    if block is None and blocks:
        block = blocks[0]
    if block is not None and block not in blocks:
        raise KeyError(block)
    names = [stage_name, pool_name, head_name]
    if block is not None:
        end = _branch_end(model.get_submodule(block))
        names += [block, f"{block}.{end}"]
        if getattr(model.get_submodule(block), "downsample", None) is not None:
            names.append(f"{block}.downsample")
    param = next(model.parameters())
    x = image.unsqueeze(0).to(param.device, param.dtype)
    logits, ins, outs = _record(model, names, x)
    logits = logits[0].float().cpu()
    maps = outs[stage_name].float()
    pooled = outs[pool_name].float()
    head_in = ins[head_name].float()
    notes = []
    pool_is_average = torch.allclose(
        pooled.reshape(len(pooled), -1), maps.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5
    ) and torch.allclose(head_in.reshape(len(head_in), -1), pooled.reshape(len(pooled), -1))
    if not pool_is_average:
        notes.append(f"{pool_name} is not a global average of {stage_name}: the maps below are not exact")
    head = model.get_submodule(head_name)
    weight, bias = _head_affine(head, head_in[:1])
    cams = torch.einsum("kc,nchw->nkhw", weight, maps) + bias.view(1, -1, 1, 1)
    if len(cams) == 2 and getattr(model, "tta_flip", False):  # x and its mirror image (model.net)
        cam = 0.5 * (cams[0] + cams[1].flip(-1))
        notes.append("mirror averaging: the map is the mean of the image's and its mirror's, flipped back")
    else:
        cam = cams[0]
    cam = cam.cpu()
    exact = pool_is_average and torch.allclose(cam.mean(dim=(1, 2)), logits, rtol=1e-3, atol=1e-3)
    residual = None
    if block is not None:
        end = _branch_end(model.get_submodule(block))
        block_in = ins[block][0].float().cpu()
        branch = outs[f"{block}.{end}"][0].float().cpu()
        shortcut = outs[f"{block}.downsample"][0].float().cpu() if f"{block}.downsample" in outs else block_in
        total = shortcut + branch
        output = outs[block][0].float().cpu()
        activation = next(
            (
                n
                for n, act in _CANDIDATE_ACTIVATIONS.items()
                if torch.allclose(act(total), output, rtol=1e-4, atol=1e-4)
            ),
            None,
        )
        residual = ResidualParts(block, block_in, shortcut, branch, total, output, activation)
    return Explanation(
        logits=logits,
        probabilities=torch.softmax(logits, dim=0),
        cam_layer=stage_name,
        cam=cam,
        cam_exact=bool(exact),
        pool_is_average=bool(pool_is_average),
        residual=residual,
        notes=notes,
    )


def explanation_json(
    e: Explanation, image: torch.Tensor, layers: list[LayerInfo], labels: list[str], top_k: int, preset
) -> dict:
    """The body of POST /v1/explain (tensors as base64 float32, like /v1/feature-maps' values)."""
    scores, indices = e.probabilities.topk(min(top_k, len(labels)))
    info = next(i for i in layers if i.name == e.cam_layer)
    body = {
        "predictions": [
            {"label": labels[i], "index": i, "score": round(s, 6)}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ],
        "logits": [round(v, 6) for v in e.logits.tolist()],
        "input": {
            "shape": list(image.shape),
            "mean": list(preset.mean),
            "std": list(preset.std),
            "values": b64_float32(image),
        },
        "cam": {
            "layer": e.cam_layer,
            "shape": list(e.cam.shape),
            "stride": info.stride,
            "receptive_field": info.receptive_field,
            "start": info.start,
            "exact": e.cam_exact,
            "method": "head weights of each class applied to the last stage's maps at every position, plus "
            "the head's bias; each map's mean is the class's logit when the pool is a global average",
            "values": b64_float32(e.cam),
        },
        "notes": e.notes,
        "residual": None,
    }
    r = e.residual
    if r is not None:
        body["residual"] = {
            "block": r.block,
            "shape": list(r.output.shape),
            "activation": r.activation,
            "input": b64_float32(r.input),
            "shortcut_is_input": bool(r.shortcut is r.input),
            "shortcut": b64_float32(r.shortcut),
            "branch": b64_float32(r.branch),
            "sum": b64_float32(r.sum),
            "output": b64_float32(r.output),
        }
    return body
