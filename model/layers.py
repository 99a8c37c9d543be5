"""Describe a network's named layers: output shape, cumulative stride, receptive field, start offset.

Nothing here is a hand-written table. Shapes come from a forward pass on a dummy input.
Stride and receptive field come from the modules themselves: a copy of the network is made
linear and positive (every conv kernel all ones, activations and normalisation removed, max
pooling replaced by average pooling of the same geometry), so the gradient of one output unit
with respect to the input is non-zero exactly on the pixels that unit can see. Its extent is
the receptive field; how far it moves between neighbouring units is the stride; where the first
unit's would begin (negative where padding reaches past the border) is the start offset, so that
unit i of a layer sees input pixels start + i * stride ... start + i * stride + receptive_field - 1,
clipped to the image.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.net import STAGES, ConvServeNet

log = logging.getLogger(__name__)

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
    nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Dropout2d, nn.LocalResponseNorm,
)  # fmt: skip


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # (C, H, W) for feature maps, (C,) for vectors
    stride: int | None  # input pixels between neighbouring output units
    receptive_field: int | None  # input pixels (one side) that one output unit sees
    # Input pixel where unit 0's receptive field starts (negative: padding reaches past the border);
    # unit i sees pixels start + i * stride .. start + i * stride + receptive_field - 1 (clip to the image).
    start: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def named_layers(model: nn.Module) -> list[str]:
    """The layers a user can ask for, in forward order.

    ConvServeNet names its stages. For torchvision models the names come from torchvision's
    feature-extraction utilities: the graph nodes that are top-level modules.
    """
    if isinstance(model, ConvServeNet):
        return list(STAGES)
    from torchvision.models.feature_extraction import get_graph_node_names

    _, eval_nodes = get_graph_node_names(model)
    top = {name for name, _ in model.named_children()}
    seen: list[str] = []
    for node in eval_nodes:
        head = node.split(".")[0]
        if head in top and head not in seen:
            seen.append(head)
    return seen


def capture(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `model(x)` once and return its output and the outputs of the named submodules.

    Safe while other threads run the same model: a hook records only the pass of the thread that
    registered it (serving runs forward passes side by side, service/lanes.py)."""
    outputs: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def record(name: str, out: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            outputs[name] = out

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out)))
    try:
        result = model(x)
    finally:
        for h in handles:
            h.remove()
    return result, outputs


def _linearised(model: nn.Module) -> nn.Module:
    """A positive linear copy of `model` with the same geometry (see the module docstring)."""
    lin = copy.deepcopy(model).float().eval()
    if isinstance(lin, ConvServeNet):
        lin.tta_flip = False

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                child.weight.data.fill_(1.0)
                if child.bias is not None:
                    child.bias.data.zero_()
            elif isinstance(child, nn.Linear):
                child.weight.data.fill_(1.0)
                if child.bias is not None:
                    child.bias.data.zero_()
            elif isinstance(child, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm) + _ACTIVATIONS):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
            else:
                swap(child)

    swap(lin)
    # ConvServeNet pools with a functional global avg or max; averaging has the same (global) geometry.
    if isinstance(lin, ConvServeNet):
        lin.pool = nn.AdaptiveAvgPool2d(1)
    return lin


def _support(grad: torch.Tensor) -> tuple[int, int]:
    """First and last input column with non-zero gradient."""
    cols = (grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten()
    return int(cols[0]), int(cols[-1])


def _geometry(lin: nn.Module, name: str, size: int) -> tuple[int | None, int | None, int | None, bool]:
    """(stride, receptive field, start offset, clipped) of layer `name` measured on a size x size input.

    The start offset is where unit 0's field would begin: the measured unit's first pixel less its
    index times the stride (the same at any input size: convolutions and pooling align at the top left)."""
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    _, outs = capture(lin, [name], x)
    out = outs[name]
    if out.dim() != 4:
        return None, None, False
    h, w = out.shape[-2:]
    cy, cx = h // 2, w // 2
    grad = torch.autograd.grad(out[0, :, cy, cx].sum(), x, retain_graph=True)[0]
    lo, hi = _support(grad)
    clipped = lo == 0 or hi == size - 1
    stride = None
    if w > 1:
        grad_next = torch.autograd.grad(out[0, :, cy, cx - 1].sum(), x)[0]
        lo_prev, hi_prev = _support(grad_next)
        stride = hi - hi_prev if hi < size - 1 and hi_prev < size - 1 else lo - lo_prev
    start = lo - cx * stride if stride is not None else None
    return stride, hi - lo + 1, start, clipped


def describe_layers(model: nn.Module, input_size: int, names: list[str] | None = None) -> list[LayerInfo]:
    """Shape, cumulative stride and receptive field of each named layer for `input_size` inputs.

    Receptive fields larger than the image are measured on a larger input, so they are the
    network's own (theoretical) values; global layers see the whole image at any size.
    """
    names = names or named_layers(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.zeros(1, 3, input_size, input_size)
        if isinstance(model, ConvServeNet):
            saved, model.tta_flip = model.tta_flip, False
        _, outs = capture(model, names, probe)
        if isinstance(model, ConvServeNet):
            model.tta_flip = saved
    model.train(was_training)
    lin = _linearised(model)
    infos = []
    for name in names:
        out = outs[name]
        shape = tuple(out.shape[1:]) if out.dim() in (2, 4) else tuple(out.shape[1:])
        stride = rf = start = None
        if out.dim() == 4 and out.shape[-1] > 1:
            size = input_size
            for _ in range(4):  # grow the probe until the receptive field fits inside it
                try:
                    stride, rf, start, clipped = _geometry(lin, name, size)
                except RuntimeError as e:
                    if size == input_size:  # not even at the input size: nothing to report
                        raise ValueError(f"cannot derive stride and receptive field of layer {name!r}: {e}") from e
                    # A larger probe does not fit the network: what was seen so far is clipped by
                    # the image border (the stride too, once both ends are), so both are unknown
                    # (null in /v1/model) rather than a clipped guess.
                    log.warning("layer %r: receptive field wider than the %d px probes that fit; unknown", name, size)
                    stride = rf = start = None
                    break
                if not clipped:
                    break
                size *= 2
        else:  # global layers (pooled maps, logits) see the whole image
            rf = input_size
            stride = input_size
            start = 0
        if out.dim() == 4 and len(shape) == 3 and shape[1:] == (1, 1):
            rf = stride = input_size
            start = 0
        infos.append(LayerInfo(name=name, shape=shape, stride=stride, receptive_field=rf, start=start))
    return infos
