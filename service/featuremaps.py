"""Feature maps as a person or a program wants them: JSON summaries, a PNG grid, a .npy array."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

from model.layers import LayerInfo

TILE_MIN_PX = 48  # upscale small maps so one channel is at least this many pixels across
GAP_PX = 2  # gap between tiles


def layer_json(info: LayerInfo, fmap: torch.Tensor, include_values: bool) -> dict:
    """Shape, geometry and per-channel statistics of one layer; values on request.

    Values are float32 little-endian, C-order over `shape`, base64-encoded: about 1.33 bytes per
    byte of the array against 8-10 for a JSON list of floats, and `numpy.frombuffer` reads them.
    """
    flat = fmap.reshape(fmap.shape[0], -1) if fmap.dim() > 1 else fmap.reshape(-1, 1)
    out = {
        "name": info.name,
        "shape": list(fmap.shape),
        "stride": info.stride,
        "receptive_field": info.receptive_field,
        "channel_mean": [round(v, 6) for v in flat.mean(dim=1).tolist()],
        "channel_max": [round(v, 6) for v in flat.amax(dim=1).tolist()],
    }
    if include_values:
        array = fmap.float().contiguous().numpy().astype("<f4", copy=False)
        out["values"] = {"dtype": "float32", "encoding": "base64", "data": base64.b64encode(array.tobytes()).decode()}
    return out


def to_npy(fmap: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, fmap.float().contiguous().numpy().astype(np.float32, copy=False), allow_pickle=False)
    return buf.getvalue()


def to_png_grid(fmap: torch.Tensor) -> bytes:
    """All channels of a [C, H, W] map as a grid of grey tiles, each normalised to its own range.

    A [C] vector (pooled features, logits) is drawn as one row of C cells.
    """
    maps = fmap.float()
    if maps.dim() == 1:
        maps = maps.view(1, 1, -1)  # one tile, one pixel row
    elif maps.dim() == 2:
        maps = maps.unsqueeze(0)
    c, h, w = maps.shape
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    tiles = ((maps - lo) / (hi - lo).clamp(min=1e-12) * 255.0).round().to(torch.uint8)
    scale = max(1, math.ceil(TILE_MIN_PX / max(h, w)))
    tiles = tiles.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = torch.full((rows * (th + GAP_PX) + GAP_PX, cols * (tw + GAP_PX) + GAP_PX), 40, dtype=torch.uint8)
    for i in range(c):
        r, col = divmod(i, cols)
        y, x = GAP_PX + r * (th + GAP_PX), GAP_PX + col * (tw + GAP_PX)
        grid[y : y + th, x : x + tw] = tiles[i]
    buf = io.BytesIO()
    Image.fromarray(grid.numpy(), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
