"""The CUDA path: predictor with autocast, channels_last and pinned host memory; training on CUDA.

Skipped where torch sees no CUDA device (CI, the 2-core development machine). Run on a GPU machine:

    python -m pytest -q tests/test_cuda.py

The CPU predictor (float32) is the reference: bf16 autocast may move scores a little and flip a
near tie, never more than that.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from PIL import Image

import model
import service.gpu_decode as gpu_decode
from model.bundle import MANIFEST_FILE, load_bundle
from model.data import load_image_folder
from service.decode import decode_image_bytes
from service.gpu_decode import decode_batch
from service.predictor import BatchedPredictor, ItemResult, WorkItem
from tests.images import encode
from tests.test_gpu_decode import PAYLOADS, PHOTOS, corrupt, exif_jpeg

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


#############################################
#   Batched JPEG decode with nvjpeg         #
#############################################
# service/gpu_decode.py on CUDA against the CPU path (decode_image_bytes + to_model_size), both
# through the same float32 CPU predictor, so that only the decoder differs.
#
# Tolerances. nvjpeg is not libjpeg-turbo: its IDCT rounds differently and, as torchvision calls
# it (NVJPEG_FLAGS_DEFAULT), it upsamples chroma without libjpeg-turbo's "fancy" interpolation.
# torchvision's own test of decode_jpeg(device="cuda") bounds the mean absolute pixel difference to
# the CPU decode by 2. Measured on the CPU with libjpeg-turbo's own non-fancy upsampling
# (`djpeg -nosmooth`, with and without `-dct fast`) as a stand-in for nvjpeg:
# - photos (224x224 to 1280x960): after the antialiased downscale to 32x32 every model-size pixel
#   is within 3 levels (mean <= 0.9), top-1 unchanged, probabilities within 0.006. Bounds: mean
#   pixel difference <= 2, same top-1, probabilities within 0.03.
# - the 200 CIFAR-10 fixtures (32x32, 4:2:0): chroma edges move by up to 65 levels, mean 1.3-1.8;
#   top-1 agreement 95.5%, max probability difference 0.75 (near ties), mean per image 0.044. A
#   32x32 image is all edges to this model: bounds are mean pixel difference <= 2, top-1 agreement
#   >= 93% and mean per-image max probability difference <= 0.08, no bound on the single worst image.
#   (Small images are better decoded on the CPU anyway: a CPU takes about 0.05 ms for one.)

MAX_PIXELS = 40_000_000
CUDA = torch.device("cuda")


@pytest.fixture
def fallbacks(monkeypatch) -> collections.Counter:
    counter: collections.Counter[str] = collections.Counter()
    monkeypatch.setattr(gpu_decode, "FALLBACKS", counter)
    return counter


@pytest.fixture(scope="module")
def cpu_predictor() -> BatchedPredictor:
    return BatchedPredictor(load_bundle(model.DEFAULT_BUNDLE), device="cpu")


def _cpu_decode(bundle, datas: list[bytes]) -> list[torch.Tensor]:
    return [bundle.preprocess.to_model_size(decode_image_bytes(d, MAX_PIXELS)) for d in datas]


def _gpu_decode(bundle, datas: list[bytes]) -> list[torch.Tensor]:
    out = decode_batch(datas, bundle.preprocess, CUDA, MAX_PIXELS)
    size = bundle.preprocess.input_size
    for image in out:
        assert image is not None, f"left to the CPU: {dict(gpu_decode.FALLBACKS)}"
        assert image.is_cuda and image.dtype == torch.uint8 and tuple(image.shape) == (3, size, size)
    return out


def _predicted(bundle, predictor, uint8_images: list[torch.Tensor]) -> torch.Tensor:
    """[N, classes] probabilities from the CPU float32 predictor."""
    images = [bundle.preprocess.normalize(i.cpu()) for i in uint8_images]
    return _scores(_results(predictor, images, 50))


def _photos() -> list[bytes]:
    photos = [(PAYLOADS / name).read_bytes() for name in PHOTOS]
    ship = Image.open(PAYLOADS / PHOTOS[1])
    return photos + [
        encode(ship, "JPEG", quality=90, progressive=True),  # nvjpeg's software path, not the hardware one
        encode(ship.convert("L"), "JPEG", quality=90),  # gray, decoded to RGB
    ]


def test_cuda_decode_batch_of_photos_predicts_as_the_cpu_decode(bundle, cpu_predictor, fallbacks):
    datas = _photos()
    gpu, cpu = _gpu_decode(bundle, datas), _cpu_decode(bundle, datas)
    assert not fallbacks, fallbacks
    for g, c in zip(gpu, cpu, strict=True):
        assert (g.cpu().float() - c.float()).abs().mean() <= 2
    got, want = _predicted(bundle, cpu_predictor, gpu), _predicted(bundle, cpu_predictor, cpu)
    diff = (got - want).abs().max().item()
    print(f"photos: top-1 {got.argmax(1).tolist()} vs {want.argmax(1).tolist()}, max score difference {diff:.4f}")
    assert got.argmax(1).tolist() == want.argmax(1).tolist()
    assert diff <= 0.03


def test_cuda_decode_batch_of_fixture_jpegs_predicts_as_the_cpu_decode(bundle, cpu_predictor, sample_dir):
    datas = [p.read_bytes() for p in sorted(sample_dir.rglob("*.jpg"))]
    gpu, cpu = _gpu_decode(bundle, datas), _cpu_decode(bundle, datas)
    pixels = (torch.stack(gpu).cpu().float() - torch.stack(cpu).float()).abs()
    got, want = _predicted(bundle, cpu_predictor, gpu), _predicted(bundle, cpu_predictor, cpu)
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    per_image = (got - want).abs().max(1).values
    print(
        f"fixtures: mean pixel difference {pixels.mean():.2f} (max {pixels.max():.0f}), top-1 agreement "
        f"{agree:.3f}, score difference mean {per_image.mean():.4f} max {per_image.max():.4f}"
    )
    assert pixels.mean() <= 2
    assert agree >= 0.93
    assert per_image.mean() <= 0.08


@pytest.mark.parametrize("orientation", range(1, 9))
def test_cuda_decode_batch_applies_exif_orientation(bundle, orientation, fallbacks):
    # decode_jpeg ignores apply_exif_orientation on CUDA; decode_batch applies it itself.
    data = exif_jpeg(orientation)
    gpu, cpu = _gpu_decode(bundle, [data])[0], _cpu_decode(bundle, [data])[0]
    assert (gpu.cpu().float() - cpu.float()).abs().mean() <= 2  # a wrong turn moves the gradient by ~100
    assert not fallbacks


def test_cuda_bad_jpegs_in_a_batch_are_none_alone(bundle, fallbacks):
    good = [(PAYLOADS / name).read_bytes() for name in PHOTOS]
    ship = good[1]
    cmyk = encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=95)
    png = (PAYLOADS / "photo-ship-640x480.png").read_bytes()
    datas = [good[0], corrupt(ship), good[1], ship[: len(ship) // 2], png, cmyk, good[2]]
    out = decode_batch(datas, bundle.preprocess, CUDA, MAX_PIXELS)
    assert [o is None for o in out] == [False, True, False, True, True, True, False], (
        f"nvjpeg took a JPEG libjpeg-turbo refuses (the CPU path answers 400 for it): {dict(fallbacks)}"
    )
    for i, c in zip((0, 2, 6), _cpu_decode(bundle, [good[0], good[1], good[2]]), strict=True):
        assert out[i].is_cuda and (out[i].cpu().float() - c.float()).abs().mean() <= 2
    assert fallbacks["batch_retried"] == 1 and fallbacks["no_end_of_image"] == 1
    assert fallbacks["not_jpeg"] == 1 and fallbacks["components_4"] == 1
    assert sum(n for reason, n in fallbacks.items() if reason.startswith("refused_")) == 1
