"""Unit tests for the model package: layer geometry, preprocessing, data, training, bundles.

No Ray, no service: everything here runs on the CPU in-process (plus one `python -m model.evaluate`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

import model
from model import (
    STAGES,
    BundleError,
    ConvServeNet,
    EvalPreset,
    build_model,
    describe_layers,
    load_bundle,
    named_layers,
    save_bundle,
)
from model.bundle import CONVSERVE_ARCH, MANIFEST_FILE, WEIGHTS_FILE, git_commit
from model.data import load_image_folder
from model.evaluate import accuracy, predict_logits
from model.layers import capture
from model.presets import CIFAR10_MEAN, CIFAR10_STD

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _preset() -> EvalPreset:
    return EvalPreset(32, CIFAR10_MEAN, CIFAR10_STD)


def _pair(v: int | tuple[int, ...]) -> int:
    """Square kernels/strides only: an int or (n, n) -> n."""
    if isinstance(v, int):
        return v
    assert len(set(v)) == 1, f"non-square {v}"
    return v[0]


#############################################
#              Layer geometry               #
#############################################


@pytest.fixture(scope="module")
def convservenet() -> ConvServeNet:
    torch.manual_seed(0)
    return ConvServeNet().eval()  # default widths (80, 320, 320), as shipped


@pytest.fixture(scope="module")
def convservenet_layers(convservenet: ConvServeNet) -> dict:
    return {info.name: info for info in describe_layers(convservenet, 32)}


def test_named_layers_convservenet(convservenet, convservenet_layers):
    assert named_layers(convservenet) == list(STAGES)
    assert list(convservenet_layers) == list(STAGES)


def test_stem_geometry(convservenet, convservenet_layers):
    stem = convservenet_layers["stem"]
    assert _pair(convservenet.stem.conv.kernel_size) == 2
    assert stem.receptive_field == 2  # one unit sees exactly its 2x2 kernel
    assert stem.stride == 1


def test_shapes_match_forward_pass(convservenet, convservenet_layers):
    # Run the stages by hand (not through the hooks describe_layers uses) and compare shapes.
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for name in STAGES:
            x = getattr(convservenet, name)(x)
            assert convservenet_layers[name].shape == tuple(x.shape[1:]), name
    assert convservenet_layers["stem"].shape == (24, 31, 31)
    assert convservenet_layers["stage3"].shape == (320, 3, 3)
    assert convservenet_layers["head"].shape == (10,)


def test_strides_double_per_stage(convservenet_layers):
    strides = [convservenet_layers[name].stride for name in ("stem", "stage1", "stage2", "stage3")]
    assert strides == [1, 2, 4, 8]
    for prev, cur in pairwise(strides):
        assert cur == 2 * prev


def test_receptive_fields_grow(convservenet_layers):
    rfs = [convservenet_layers[name].receptive_field for name in ("stem", "stage1", "stage2", "stage3")]
    assert all(b > a for a, b in pairwise(rfs)), rfs


def test_global_layers(convservenet_layers):
    for name in ("pool", "head"):
        assert convservenet_layers[name].receptive_field == 32, name
    assert convservenet_layers["pool"].shape == (320, 1, 1)


@pytest.mark.parametrize("mode, reduce", [("avg", torch.mean), ("max", torch.amax)])
def test_global_pool_is_average_or_max_over_height_and_width(mode, reduce):
    torch.manual_seed(0)
    net = ConvServeNet(widths=(8, 16, 16), pool=mode).eval()
    _, maps = capture(net, ["stage3", "pool"], torch.randn(2, 3, 32, 32))
    assert maps["pool"].shape == (2, 16, 1, 1)
    torch.testing.assert_close(maps["pool"].flatten(1), reduce(maps["stage3"], dim=(2, 3)))


def test_global_pool_mode_is_checked_and_saved_with_the_bundle(tmp_path):
    with pytest.raises(ValueError, match="pool must be"):
        ConvServeNet(pool="sum")
    assert ConvServeNet().pool.mode == "avg"
    net = ConvServeNet(widths=(8, 16, 16), pool="max").eval()  # not the default: it must come from the bundle
    save_bundle(
        tmp_path, net, arch=CONVSERVE_ARCH, arch_args={"widths": [8, 16, 16], "pool": "max"},
        labels=CIFAR10_CLASSES, preset=EvalPreset(32, CIFAR10_MEAN, CIFAR10_STD), name="n", version="1",
    )  # fmt: skip
    assert load_bundle(tmp_path).model.pool.mode == "max"
    shipped = json.loads((model.DEFAULT_BUNDLE / MANIFEST_FILE).read_text())
    assert shipped["arch_args"]["pool"] == "avg"  # explicit, so a later default cannot change how it loads


def _textbook_geometry(modules: list[nn.Module]) -> tuple[int, int]:
    """Receptive field and cumulative stride by the recurrence rf += (k - 1) * jump; jump *= s.

    Only convolutions and pooling change the geometry; residual shortcuts never see further than
    the convolution path beside them.
    """
    rf, jump = 1, 1
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s = _pair(m.kernel_size), _pair(m.stride)
            dilation = _pair(m.dilation) if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else 1
            rf += (k - 1) * dilation * jump
            jump *= s
    return rf, jump


@pytest.mark.parametrize("upto", ["stage1", "stage2", "stage3"])
def test_receptive_field_matches_textbook_recurrence(convservenet, convservenet_layers, upto):
    stages = STAGES[: STAGES.index(upto) + 1]
    modules = [m for name in stages for m in getattr(convservenet, name).modules()]
    # The stage modules are registered in forward order (conv, down, ..., block.conv1, block.conv2).
    rf, jump = _textbook_geometry(modules)
    assert convservenet_layers[upto].receptive_field == rf
    assert convservenet_layers[upto].stride == jump
    if upto == "stage1":
        assert rf == 13  # 2 (stem) + 2 (conv) + 1 (pool) + 4 + 4 (block, at stride 2)


def test_torchvision_resnet18_layers():
    net = build_model("torchvision:resnet18", {"num_classes": 10})
    names = named_layers(net)
    assert [n for n in names if n.startswith("layer")] == ["layer1", "layer2", "layer3", "layer4"]
    assert names.index("conv1") < names.index("layer1") < names.index("fc")
    # 64 x 64 instead of 224 x 224 to stay fast; cumulative strides do not depend on the input size.
    infos = {info.name: info for info in describe_layers(net, 64)}
    assert infos["conv1"].stride == 2 and infos["conv1"].receptive_field == 7
    assert infos["layer1"].stride == 4
    assert infos["layer4"].stride == 32
    assert infos["layer4"].shape == (512, 2, 2)
    assert infos["layer4"].receptive_field == 435  # the published ResNet-18 value, wider than the input
    assert infos["fc"].shape == (10,)


#############################################
#              Preprocessing                #
#############################################


def _expected(image_u8: torch.Tensor) -> torch.Tensor:
    """Reference normalisation of a [3, 32, 32] uint8 image, written out independently."""
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (image_u8.float() / 255.0 - mean) / std


@pytest.fixture
def rgb32() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)


def _check_output(out: torch.Tensor) -> None:
    assert out.dtype == torch.float32
    assert out.shape == (3, 32, 32)
    assert torch.isfinite(out).all()


def test_preset_rgb_32_is_not_resized(rgb32):
    preset = _preset()
    assert torch.equal(preset.to_model_size(rgb32), rgb32)
    out = preset(rgb32)
    _check_output(out)
    torch.testing.assert_close(out, _expected(rgb32))


def test_preset_normalize_leaves_its_input_alone(rgb32):
    as_float = rgb32.float()
    before = as_float.clone()
    out = _preset().normalize(as_float)
    assert torch.equal(as_float, before)  # a float input is not scaled in place
    assert torch.allclose(out, _preset().normalize(rgb32))


def test_preset_gray_2d_and_1_channel(rgb32):
    preset = _preset()
    gray = rgb32[0]
    out_2d = preset(gray)
    out_1c = preset(gray.unsqueeze(0))
    _check_output(out_2d)
    _check_output(out_1c)
    assert torch.equal(out_2d, out_1c)
    torch.testing.assert_close(out_2d, _expected(gray.expand(3, -1, -1)))


def test_preset_rgba_drops_alpha(rgb32):
    preset = _preset()
    alpha = torch.full((1, 32, 32), 7, dtype=torch.uint8)
    out = preset(torch.cat([rgb32, alpha]))
    _check_output(out)
    assert torch.equal(out, preset(rgb32))


def test_preset_non_square_is_resized_and_center_cropped():
    preset = _preset()
    # 32 x 96: the short side is already 32, so only the centre crop acts: it must keep the middle third.
    wide = torch.zeros(3, 32, 96, dtype=torch.uint8)
    wide[:, :, 32:64] = 200
    wide[:, :, 64:] = 50
    assert torch.equal(preset.to_model_size(wide), torch.full((3, 32, 32), 200, dtype=torch.uint8))
    # A big, tall image of one colour: resized (short side 60 -> 32), cropped, colour unchanged.
    tall = torch.empty(3, 100, 60, dtype=torch.uint8)
    tall[0], tall[1], tall[2] = 10, 128, 250
    small = preset.to_model_size(tall)
    assert small.dtype == torch.uint8 and small.shape == (3, 32, 32)
    assert torch.equal(small, tall[:, :32, :32])
    out = preset(tall)
    _check_output(out)
    torch.testing.assert_close(out, _expected(tall[:, :32, :32]))
    # A random large non-square image: only the output contract.
    g = torch.Generator().manual_seed(2)
    _check_output(preset(torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8, generator=g)))


def test_preset_batch_equals_per_image():
    preset = _preset()
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = preset(batch)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 32, 32)
    assert torch.equal(out, torch.stack([preset(image) for image in batch]))
    big = torch.randint(0, 256, (2, 4, 48, 40), dtype=torch.uint8, generator=g)
    assert torch.equal(preset(big), torch.stack([preset(image) for image in big]))


def test_preset_rejects_bad_input(rgb32):
    preset = _preset()
    with pytest.raises(ValueError, match="uint8"):
        preset(rgb32.float())
    with pytest.raises(ValueError, match="channels"):
        preset(torch.zeros(5, 32, 32, dtype=torch.uint8))


#############################################
#                   Data                    #
#############################################


def test_load_image_folder_dir_and_tar_gz_agree(sample_dir, tmp_path):
    preset = _preset()
    from_dir = load_image_folder(sample_dir, preset)
    archive = tmp_path / "sample.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sample_dir, arcname="val")
    from_tar = load_image_folder(archive, preset)

    for ds in (from_dir, from_tar):
        assert ds.classes == CIFAR10_CLASSES
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (200, 3, 32, 32)
        assert ds.labels.dtype == torch.int64
        assert torch.bincount(ds.labels, minlength=10).tolist() == [20] * 10
    assert torch.equal(from_dir.images, from_tar.images)
    assert torch.equal(from_dir.labels, from_tar.labels)
    assert [Path(p).parts[-2:] for p in from_dir.paths] == [Path(p).parts[-2:] for p in from_tar.paths]
    assert from_dir.paths[0] == str(Path("airplane") / "0000.jpg")
    # Images are not all alike (decoding really happened).
    assert from_dir.images.float().std() > 10


def test_load_image_folder_fixed_classes_and_limit(sample_dir):
    ds = load_image_folder(sample_dir, _preset(), classes=list(reversed(CIFAR10_CLASSES)), limit_per_class=3)
    assert len(ds.labels) == 30
    assert ds.labels[0].item() == 9  # airplane comes first on disk, and is the last class given
    with pytest.raises(ValueError, match="not among"):
        load_image_folder(sample_dir, _preset(), classes=["cat", "dog"])


#############################################
#              Smoke training               #
#############################################


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_smoke_training_lowers_loss_and_writes_a_loadable_bundle(sample_dir, tmp_path, optimizer):
    from model.train import parse_args, train

    out = tmp_path / "bundle"
    argv = [
        "--train-data", str(sample_dir), "--val-data", "none", "--widths", "16,32,32",
        "--batch-size", "50", "--epochs", "6", "--optimizer", optimizer, "--out", str(out),
    ]  # fmt: skip
    train(parse_args(argv), argv)

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    history = manifest["training"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    assert manifest["arch"] == CONVSERVE_ARCH
    assert manifest["arch_args"]["widths"] == [16, 32, 32]
    assert manifest["training"]["command"].startswith("python -m model.train ")

    bundle = load_bundle(out)
    assert bundle.labels == CIFAR10_CLASSES
    assert [info.name for info in bundle.layers] == list(STAGES)
    assert bundle.layer("stage1").shape == (16, 15, 15)
    assert not bundle.model.training
    data = load_image_folder(sample_dir, bundle.preprocess, classes=bundle.labels, limit_per_class=2)
    logits = predict_logits(bundle.model, bundle.preprocess.normalize(data.images))
    assert logits.shape == (20, 10) and torch.isfinite(logits).all()


def test_orthogonalize_evens_out_singular_values():
    from model.train import orthogonalize

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    spread = torch.logspace(0, -3, 16)  # condition number 1000
    g = (u * spread) @ v.T  # 64 x 16: exercises the tall case
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.max() < 1.3 and s[:8].min() > 0.5, s  # was 1 ... 0.001; now all of a similar size
    assert s.min() > 10 * spread.min()
    assert orthogonalize(g.T).shape == (16, 64)


def test_muon_step_normalises_filters_and_descends():
    from model.train import Muon, orthogonalize

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 5)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    Muon([w], lr=0.1, momentum=0.0).step()
    normalised = before * (8**0.5 / before.norm())
    expected = normalised - 0.1 * orthogonalize(w.grad.reshape(8, -1)).view(w.shape)
    assert torch.allclose(w.detach(), expected, atol=1e-5)
    assert (w.detach() - normalised).flatten() @ w.grad.flatten() < 0  # a step against the gradient


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_optimizers_split_the_parameters(optimizer):
    from model.train import make_optimizers, parse_args

    net = ConvServeNet(widths=(16, 32, 32))
    cfg = parse_args(["--optimizer", optimizer])
    optimizers = make_optimizers(net, cfg)
    ids = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable)  # each trainable parameter exactly once
    assert id(net.stem.conv.weight) not in ids  # the whitening kernels stay frozen
    if optimizer == "muon":
        muon_params = optimizers[1].param_groups[0]["params"]
        assert len(muon_params) == 9 and all(p.ndim == 4 for p in muon_params)  # 3 stages x 3 convs


#############################################
#                 Bundles                   #
#############################################


def _trained_looking_net() -> ConvServeNet:
    """A small ConvServeNet with non-default BatchNorm statistics, so a lost buffer would show."""
    torch.manual_seed(0)
    net = ConvServeNet(widths=(16, 32, 32))
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32) * 3 + 1)
    return net.eval()


def _save_small(path: Path) -> tuple[ConvServeNet, Path]:
    net = _trained_looking_net()
    save_bundle(
        path, net, arch=CONVSERVE_ARCH, arch_args={"num_classes": 10, "widths": [16, 32, 32]},
        labels=CIFAR10_CLASSES, preset=_preset(), name="test-net", version="7",
    )  # fmt: skip
    return net, path


def _edit_manifest(path: Path, **changes) -> None:
    manifest_path = path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest))


def test_bundle_round_trip(tmp_path):
    net, path = _save_small(tmp_path / "b")
    bundle = load_bundle(path)
    assert bundle.model_id == "test-net@7"
    assert bundle.labels == CIFAR10_CLASSES
    assert bundle.preprocess.to_dict() == _preset().to_dict()
    assert bundle.weights_sha256 == json.loads((path / MANIFEST_FILE).read_text())["weights_sha256"]
    assert not bundle.model.training
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(net(x), bundle.model(x))
    for key, value in net.state_dict().items():
        assert torch.equal(value, bundle.model.state_dict()[key]), key


def test_bundle_corrupted_weights_refused(tmp_path):
    _, path = _save_small(tmp_path / "b")
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(path)


def test_bundle_wrong_hash_refused(tmp_path):
    _, path = _save_small(tmp_path / "b")
    _edit_manifest(path, weights_sha256="0" * 64)
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(path)


def test_bundle_missing_weights_refused(tmp_path):
    _, path = _save_small(tmp_path / "b")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)


def test_bundle_missing_or_broken_manifest_refused(tmp_path):
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("arch", ["torchvision:not_a_model", "foo:bar"])
def test_unknown_architecture_refused(tmp_path, arch):
    with pytest.raises(BundleError, match="unknown architecture"):
        build_model(arch, {})
    _, path = _save_small(tmp_path / "b")
    _edit_manifest(path, arch=arch)  # the weights still match their hash; the architecture does not exist
    with pytest.raises(BundleError, match="unknown architecture"):
        load_bundle(path)


def test_weights_not_matching_architecture_refused(tmp_path):
    _, path = _save_small(tmp_path / "b")
    _edit_manifest(path, arch_args={"num_classes": 10, "widths": [16, 32, 64]})
    with pytest.raises(BundleError, match="cannot load"):
        load_bundle(path)


@pytest.mark.parametrize(
    "arch, arch_args",
    [
        ("convserve:convservenet", {"num_classes": 10, "widhts": [16, 32, 64]}),  # a typo
        ("torchvision:resnet18", {"num_clases": 10}),
        ("convserve:convservenet", [10]),
    ],
)
def test_bad_arch_args_refused_with_a_bundle_error(tmp_path, arch, arch_args):
    _, path = _save_small(tmp_path / "b")
    _edit_manifest(path, arch=arch, arch_args=arch_args)
    with pytest.raises(BundleError, match="arch_args"):
        load_bundle(path)


def test_saved_weights_are_readable_by_others(tmp_path):
    _, path = _save_small(tmp_path / "b")
    assert (path / WEIGHTS_FILE).stat().st_mode & 0o044 == 0o044


def test_torchvision_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_model("torchvision:resnet18", {"num_classes": 10}).eval()
    path = save_bundle(
        tmp_path / "r18", net, arch="torchvision:resnet18", arch_args={"num_classes": 10},
        labels=CIFAR10_CLASSES, preset=_preset(), name="resnet18", version="1",
    )  # fmt: skip
    bundle = load_bundle(path, describe=False)
    assert bundle.arch == "torchvision:resnet18"
    assert isinstance(bundle.model, type(net))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(net(x), bundle.model(x))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_is_a_hash_or_none(tmp_path, monkeypatch):
    commit = git_commit()  # the test runs inside the repository, which may have no commit yet
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit), commit
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    assert git_commit() is None  # a repository without commits: `git rev-parse HEAD` prints "HEAD" and fails


#############################################
#             The shipped bundle            #
#############################################


def test_the_embedded_bundle_is_committed():
    """Serving, bench and reliability tests need it; its absence fails the suite, never skips it."""
    for name in (MANIFEST_FILE, "model.safetensors"):
        assert (model.DEFAULT_BUNDLE / name).is_file(), f"{model.DEFAULT_BUNDLE / name} is missing: `make train`"


@pytest.fixture(scope="module")
def shipped_accuracy(sample_dir) -> float:
    bundle = load_bundle(model.DEFAULT_BUNDLE, describe=False)
    data = load_image_folder(sample_dir, bundle.preprocess, classes=bundle.labels)
    assert len(data.labels) == 200
    logits = predict_logits(bundle.model, bundle.preprocess.normalize(data.images))
    return accuracy(logits, data.labels)


def test_shipped_bundle_accuracy(shipped_accuracy):
    # The full 1,000-image validation accuracy is recorded in bundle.json `metrics` (expected about
    # 0.92 or better). On these 200 images the binomial standard error is about 2 points
    # (sqrt(0.92 * 0.08 / 200) = 0.019), so 0.85 leaves a margin of about 3 standard errors while
    # still catching a broken or untrained model (10% on ten classes).
    assert shipped_accuracy >= 0.85


@pytest.mark.slow
def test_evaluate_cli_matches_in_process(shipped_accuracy):
    command = [
        sys.executable, "-m", "model.evaluate",
        "--bundle", str(model.DEFAULT_BUNDLE), "--data", "tests/fixtures/cifar10-val-sample",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"top1: ([01]\.\d{4})", last)
    assert match, last
    assert match.group(1) == f"{shipped_accuracy:.4f}"
    assert "on 200 images" in result.stdout


def test_evaluate_in_bf16_compares_with_float32(shipped_accuracy, sample_dir, capsys):
    """`--cpu-amp-dtype bf16` measures what the service computes with cpu_amp_dtype bf16, beside
    the float32 reference (README, "CPU precision")."""
    from model.evaluate import main

    top1 = main(["--data", str(sample_dir), "--cpu-amp-dtype", "bf16"])
    out = capsys.readouterr().out
    match = re.search(r"against float32: top1 ([01]\.\d{4}), the same top-1 class for ([01]\.\d{4}) of the images", out)
    assert match, out
    assert match.group(1) == f"{shipped_accuracy:.4f}"  # the reference is the float32 path
    assert float(match.group(2)) >= 0.97 and abs(top1 - shipped_accuracy) <= 0.03
    assert out.strip().splitlines()[-1] == f"top1: {top1:.4f}"


class _FixedSizeNet(torch.nn.Module):
    """A conv whose field (41 px) is wider than a 32 px image, then a head that only takes 32 x 32
    inputs: the larger probe describe_layers needs to see the whole field cannot run."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 2, 41, padding=20)
        self.head = torch.nn.Linear(2 * 32 * 32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_a_receptive_field_no_probe_can_show_is_unknown_not_a_clipped_guess():
    (info,) = describe_layers(_FixedSizeNet(), 32, ["features"])
    assert info.stride is None and info.receptive_field is None  # not the 32 px the image clipped it to
