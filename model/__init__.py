"""convserve's model package: the network, its training, evaluation and the bundle format."""

from pathlib import Path

from model.bundle import Bundle, BundleError, build_model, load_bundle, save_bundle
from model.layers import LayerInfo, describe_layers, named_layers
from model.net import STAGES, ConvServeNet
from model.presets import EvalPreset

# The embedded default model, trained by `make train` and committed with the code.
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "convservenet-cifar10"

__all__ = [
    "DEFAULT_BUNDLE", "STAGES", "Bundle", "BundleError", "ConvServeNet", "EvalPreset", "LayerInfo",
    "build_model", "describe_layers", "load_bundle", "named_layers", "save_bundle",
]  # fmt: skip
