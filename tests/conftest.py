"""Shared pytest fixtures. Keep it small: feature-specific fixtures live in their test files.

Markers (`slow`, `integration`) are registered in pyproject.toml.
"""

import os
from pathlib import Path

import pytest

# Ray clusters started for tests use token authentication (Ray's default for a new local
# cluster, token in ~/.ray/auth_token). Say so before anything imports ray, so that a test can
# attach a second driver (ray.init(address=...)) to a service's cluster to read serve.status().
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A service on 127.0.0.1 runs its Ray on the loopback address (service/server.py,
# configure_loopback_env). A driver attaching to it must resolve 127.0.0.1 as loopback too, not
# as this host's routable address, which Ray does on Linux unless told so by this variable.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """200 CIFAR-10 validation JPEGs, 20 per class, ImageFolder layout (see fixtures/README.md)."""
    return FIXTURES / "cifar10-val-sample"


@pytest.fixture(scope="session")
def bundle():
    """The embedded bundle (model/bundles/), loaded as the service loads it."""
    from model import DEFAULT_BUNDLE, load_bundle

    return load_bundle(DEFAULT_BUNDLE)


CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _make_tiny_bundle(directory: Path, *, tta_flip: bool):
    """A small untrained ConvServeNet (widths 16/32/32) saved and reloaded as a real bundle."""
    import torch

    from model.bundle import CONVSERVE_ARCH, load_bundle, save_bundle
    from model.net import ConvServeNet
    from model.presets import CIFAR10_MEAN, CIFAR10_STD, EvalPreset

    torch.manual_seed(0)
    net = ConvServeNet(widths=(16, 32, 32), tta_flip=tta_flip)
    net.stem.init_whitening(torch.randn(64, 3, 32, 32))
    save_bundle(
        directory,
        net,
        arch=CONVSERVE_ARCH,
        arch_args={"num_classes": 10, "widths": [16, 32, 32], "tta_flip": tta_flip},
        labels=CIFAR10_LABELS,
        preset=EvalPreset(32, CIFAR10_MEAN, CIFAR10_STD),
        name="tiny",
        version="t",
    )
    return load_bundle(directory)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A loaded model.bundle.Bundle of a tiny untrained ConvServeNet; independent of model/bundles/."""
    return _make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"), tta_flip=False)


@pytest.fixture(scope="session")
def tiny_bundle_tta(tmp_path_factory: pytest.TempPathFactory):
    """Same as `tiny_bundle`, with test-time flip augmentation on (the stages see 2N images)."""
    return _make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle_tta"), tta_flip=True)
