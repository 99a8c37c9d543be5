"""The CUDA path: predictor with autocast, channels_last and pinned host memory; training on CUDA.

Skipped where torch sees no CUDA device (CI, the 2-core development machine). Run on a GPU machine:

    python -m pytest -q tests/test_cuda.py

The CPU predictor (float32) is the reference: bf16 autocast may move scores a little and flip a
near tie, never more than that.
"""

from __future__ import annotations

import json

import pytest
import torch

import model
from model.bundle import MANIFEST_FILE, load_bundle
from model.data import load_image_folder
from service.predictor import BatchedPredictor, ItemResult, WorkItem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(model.DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def images(bundle, sample_dir) -> list[torch.Tensor]:
    """The 200 fixture JPEGs, decoded and normalised by the bundle's preset."""
    data = load_image_folder(sample_dir, bundle.preprocess, classes=bundle.labels)
    return list(bundle.preprocess.normalize(data.images))


def _results(predictor: BatchedPredictor, images: list[torch.Tensor], batch: int, **kw) -> list[ItemResult]:
    out = []
    for i in range(0, len(images), batch):
        out += predictor.predict([WorkItem(x, top_k=10, **kw) for x in images[i : i + batch]])
    assert all(isinstance(r, ItemResult) for r in out)
    return out


def _scores(results: list[ItemResult]) -> torch.Tensor:
    """[N, classes] probabilities in class order."""
    rows = []
    for r in results:
        row = torch.zeros(len(r.predictions))
        for p in r.predictions:
            row[p.index] = p.score
        rows.append(row)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def cpu_scores(bundle, images) -> torch.Tensor:
    cpu = BatchedPredictor(load_bundle(model.DEFAULT_BUNDLE), device="cpu")
    return _scores(_results(cpu, images, 50))


@pytest.mark.parametrize("amp, max_diff, min_agree", [("off", 0.01, 1.0), ("bf16", 0.08, 0.97), ("fp16", 0.02, 0.99)])
def test_cuda_scores_match_the_cpu_float32_reference(bundle, images, cpu_scores, amp, max_diff, min_agree):
    gpu = BatchedPredictor(bundle, device="cuda", amp_dtype=amp)
    got = _scores(_results(gpu, images, 64))
    agree = (got.argmax(1) == cpu_scores.argmax(1)).float().mean().item()
    diff = (got - cpu_scores).abs().max().item()
    print(f"amp={amp}: top-1 agreement {agree:.3f}, max score difference {diff:.4f}")
    assert agree >= min_agree
    assert diff <= max_diff


def test_cuda_weights_and_inputs_are_channels_last_on_the_gpu(bundle, images):
    gpu = BatchedPredictor(bundle, device="cuda")
    assert gpu.device.type == "cuda" and gpu.amp_dtype == torch.bfloat16
    convs = [m for m in gpu.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_cuda for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    x = gpu._to_device(torch.stack(images[:8]))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.cpu(), torch.stack(images[:8]))  # the non-blocking copy arrived whole
    assert torch.backends.cudnn.benchmark


def test_cuda_batch_equals_single_calls_and_maps_come_back_as_cpu_float32(bundle, images):
    gpu = BatchedPredictor(bundle, device="cuda")
    layers = tuple(info.name for info in bundle.layers)
    batched = _results(gpu, images[:16], 16, layers=layers)
    singles = _results(gpu, images[:16], 1, layers=layers)
    assert [r.batch_size for r in batched] == [16] * 16
    for b, s in zip(batched, singles, strict=True):
        assert b.predictions[0].index == s.predictions[0].index
        assert b.predictions[0].score == pytest.approx(s.predictions[0].score, abs=0.03)
        for info in bundle.layers:
            fmap = b.feature_maps[info.name]
            assert fmap.device.type == "cpu" and fmap.dtype == torch.float32
            assert tuple(fmap.shape) == tuple(info.shape)


def test_cuda_warmup_and_health_check(bundle):
    gpu = BatchedPredictor(bundle, device="cuda")
    timings = gpu.warmup([1, 8, 32])
    assert sorted(timings) == [1, 8, 32] and all(t > 0 for t in timings.values())
    gpu.check_health()


def test_cuda_training_lowers_loss_and_writes_a_cpu_loadable_bundle(sample_dir, tmp_path):
    from model.train import parse_args, train

    out = tmp_path / "bundle"
    argv = [
        "--train-data", str(sample_dir), "--val-data", str(sample_dir), "--widths", "32,64,64",
        "--batch-size", "50", "--epochs", "8", "--out", str(out), "--device", "cuda",
    ]  # fmt: skip
    metrics = train(parse_args(argv), argv)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    history = manifest["training"]["history"]
    assert manifest["training"]["device"].startswith("cuda") and manifest["training"]["amp"] == "torch.bfloat16"
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    assert metrics["val_top1"] > 0.2  # trained and evaluated on the same 200 images: it must fit them a little
    loaded = load_bundle(out)
    assert next(loaded.model.parameters()).device.type == "cpu"
