"""Feature-map renderings (service/featuremaps.py): JSON summaries and values, .npy, a PNG grid."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.layers import LayerInfo
from service.featuremaps import GAP_PX, TILE_MIN_PX, layer_json, to_npy, to_png_grid

GRID_BACKGROUND = 40


@pytest.fixture
def fmap() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(16, 8, 8) * 3 + torch.arange(16.0).view(16, 1, 1)


def info_for(t: torch.Tensor, name: str = "stage1") -> LayerInfo:
    return LayerInfo(name=name, shape=tuple(t.shape), stride=4, receptive_field=11)


#############################################
#                  JSON                     #
#############################################


def test_layer_json_summary(fmap):
    out = layer_json(info_for(fmap), fmap, include_values=False)
    assert json.loads(json.dumps(out)) == out  # plain JSON types only
    assert out["name"] == "stage1"
    assert out["shape"] == [16, 8, 8]
    assert (out["stride"], out["receptive_field"]) == (4, 11)
    assert "values" not in out
    assert len(out["channel_mean"]) == len(out["channel_max"]) == 16
    means = fmap.mean(dim=(1, 2)).tolist()
    maxes = fmap.amax(dim=(1, 2)).tolist()
    for got, want in zip(out["channel_mean"], means, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    for got, want in zip(out["channel_max"], maxes, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert all(m > a for m, a in zip(out["channel_max"], out["channel_mean"], strict=True))


def test_layer_json_values_decode_to_the_exact_tensor(fmap):
    out = layer_json(info_for(fmap), fmap, include_values=True)
    values = out["values"]
    assert (values["dtype"], values["encoding"]) == ("float32", "base64")
    array = np.frombuffer(base64.b64decode(values["data"]), dtype="<f4").reshape(out["shape"])
    assert torch.equal(torch.from_numpy(array.copy()), fmap)
    json.dumps(out)


def test_layer_json_values_of_a_non_contiguous_map(fmap):
    view = fmap.transpose(1, 2)  # a view in another memory order: values must still be C-order over `shape`
    out = layer_json(info_for(view), view, include_values=True)
    array = np.frombuffer(base64.b64decode(out["values"]["data"]), dtype=np.float32).reshape(out["shape"])
    assert torch.equal(torch.from_numpy(array.copy()), view)


def test_layer_json_of_a_vector():
    logits = torch.tensor([0.5, -2.0, 3.25, 0.0])
    out = layer_json(LayerInfo("head", (4,), 32, 32), logits, include_values=True)
    assert out["shape"] == [4]
    assert out["channel_mean"] == out["channel_max"] == [0.5, -2.0, 3.25, 0.0]
    array = np.frombuffer(base64.b64decode(out["values"]["data"]), dtype=np.float32)
    assert array.tolist() == logits.tolist()


#############################################
#                  .npy                     #
#############################################


def test_to_npy_round_trip(fmap):
    array = np.load(io.BytesIO(to_npy(fmap)), allow_pickle=False)
    assert array.dtype == np.float32
    assert array.shape == (16, 8, 8)
    assert np.array_equal(array, fmap.numpy())


def test_to_npy_of_other_dtypes_and_layouts(fmap):
    array = np.load(io.BytesIO(to_npy(fmap.double().transpose(0, 2))), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (8, 8, 16)
    assert np.array_equal(array, fmap.transpose(0, 2).contiguous().numpy())
    bf16 = fmap.to(torch.bfloat16)
    array = np.load(io.BytesIO(to_npy(bf16)), allow_pickle=False)
    assert np.array_equal(array, bf16.float().numpy())


#############################################
#                PNG grid                   #
#############################################


def _grid_size(c: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(width, height, tile height, tile width) of the grid the module documents."""
    scale = max(1, math.ceil(TILE_MIN_PX / max(h, w)))
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    return cols * (tw + GAP_PX) + GAP_PX, rows * (th + GAP_PX) + GAP_PX, th, tw


def _open(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.mode == "L"
    return np.array(img)


def test_png_grid_geometry_for_16_maps_of_8x8(fmap):
    grid = _open(to_png_grid(fmap))
    width, height, th, tw = _grid_size(16, 8, 8)
    assert (th, tw) == (48, 48)  # 8 px upscaled 6x to reach TILE_MIN_PX
    assert (width, height) == (4 * 50 + 2, 4 * 50 + 2)
    assert grid.shape == (height, width)


@pytest.mark.parametrize(("c", "h", "w"), [(10, 8, 8), (3, 15, 15), (1, 31, 31), (5, 60, 20), (2, 1, 1)])
def test_png_grid_geometry(c, h, w):
    grid = _open(to_png_grid(torch.rand(c, h, w)))
    width, height, th, tw = _grid_size(c, h, w)
    assert max(th, tw) >= TILE_MIN_PX
    assert grid.shape == (height, width)


def test_png_grid_of_a_vector_is_one_row():
    grid = _open(to_png_grid(torch.arange(10.0)))
    width, height, th, tw = _grid_size(1, 1, 10)
    assert grid.shape == (height, width) == (th + 2 * GAP_PX, tw + 2 * GAP_PX)
    cells = grid[GAP_PX, GAP_PX : GAP_PX + tw : tw // 10]
    assert cells[0] == 0 and cells[-1] == 255 and list(cells) == sorted(cells)


def test_png_grid_tiles_are_normalised_each_to_its_own_range():
    c, h, w = 16, 8, 8
    ramp = torch.arange(h * w, dtype=torch.float32).view(h, w)  # 0 .. 63
    maps = torch.stack([ramp * (k + 1) - 5 * k for k in range(c)])  # channel k: -5k .. 63(k+1) - 5k
    maps[7] = 2.5  # a constant channel: no division by zero, a flat tile
    grid = _open(to_png_grid(maps))
    _, _, th, tw = _grid_size(c, h, w)
    scale = th // h
    cols = math.ceil(math.sqrt(c))
    expected = (ramp / ramp.max() * 255).round().to(torch.uint8).numpy()
    for k in range(c):
        r, col = divmod(k, cols)
        y, x = GAP_PX + r * (th + GAP_PX), GAP_PX + col * (tw + GAP_PX)
        tile = grid[y : y + th, x : x + tw]
        # Every source pixel is a scale x scale block of one grey.
        blocks = tile.reshape(h, scale, w, scale)
        assert (blocks == blocks[:, :1, :, :1]).all()
        small = blocks[:, 0, :, 0]
        if k == 7:
            assert (small == small[0, 0]).all()
        else:
            assert small.min() == 0 and small.max() == 255
            assert np.array_equal(small, expected)
        # The gaps around the tile are background.
        assert (grid[y - GAP_PX : y, x : x + tw] == GRID_BACKGROUND).all()
        assert (grid[y : y + th, x - GAP_PX : x] == GRID_BACKGROUND).all()
