"""The model bundle: a directory with `model.safetensors` and `bundle.json`.

`bundle.json` says how to rebuild the network (architecture name and arguments), how to
preprocess (input size, mean, std), what the outputs mean (labels), and where the weights came
from (SHA-256, training command and configuration, measured accuracy, torch version, git commit).
Weights load only through safetensors after the hash matches: no pickle on the load path.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.layers import LayerInfo, describe_layers, named_layers
from model.net import ConvServeNet
from model.presets import EvalPreset

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "bundle.json"
FORMAT_VERSION = 1
CONVSERVE_ARCH = "convserve:convservenet"


class BundleError(Exception):
    """A bundle that cannot be loaded: missing file, wrong hash, unknown architecture."""


def build_model(arch: str, arch_args: dict) -> nn.Module:
    """An untrained network for `arch`: ours, or any `torchvision:<name>` classifier."""
    if not isinstance(arch_args, dict):
        raise BundleError(f"arch_args must be a JSON object, got {type(arch_args).__name__}")
    if arch == CONVSERVE_ARCH:
        args = dict(arch_args)
        if "widths" in args:
            args["widths"] = tuple(args["widths"])
        return _construct(arch, ConvServeNet, args)
    if arch.startswith("torchvision:"):
        from torchvision import models

        name = arch.split(":", 1)[1]
        if name not in models.list_models(module=models):
            raise BundleError(f"unknown architecture {arch!r}: torchvision has no classification model {name!r}")
        return _construct(arch, lambda **kw: models.get_model(name, weights=None, **kw), arch_args)
    raise BundleError(f"unknown architecture {arch!r}: use {CONVSERVE_ARCH!r} or 'torchvision:<model name>'")


def _construct(arch: str, factory, args: dict) -> nn.Module:
    """The network, or a BundleError naming the bad arguments (a typo in bundle.json, say)."""
    try:
        return factory(**args)
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot build {arch} from arch_args {args}: {e}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:  # no commit yet (git still echoes "HEAD" on stdout) or not a repository
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Bundle:
    """A loaded bundle: eval-mode network, the shared preprocessing, labels, layer geometry."""

    path: Path
    name: str
    version: str
    arch: str
    arch_args: dict
    model: nn.Module
    preprocess: EvalPreset
    labels: list[str]
    layers: list[LayerInfo]
    weights_sha256: str
    manifest: dict = field(repr=False)

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)


def save_bundle(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_args: dict,
    labels: list[str],
    preset: EvalPreset,
    name: str,
    version: str,
    training: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write `model.safetensors` and `bundle.json` under `path` and return the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS_FILE
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors writes 0600; a bundle is meant to be read by a serving user
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "arch": arch,
        "arch_args": arch_args,
        "labels": list(labels),
        "preprocess": preset.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "training": training or {},
        "metrics": metrics or {},
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (a bundle is a directory with {MANIFEST_FILE} and weights)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from None
    missing = [k for k in ("arch", "arch_args", "labels", "preprocess", "weights_sha256") if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: missing keys {missing}")
    return manifest


def load_bundle(path: str | Path, *, describe: bool = True) -> Bundle:
    """Verify and load a bundle. Raises BundleError with a message that says what is wrong."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / manifest.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file missing")
    actual = sha256_file(weights)
    if actual != manifest["weights_sha256"]:
        raise BundleError(
            f"{weights}: SHA-256 mismatch (bundle.json says {manifest['weights_sha256']}, file is {actual}); "
            "the weights are corrupted or were replaced"
        )
    model = build_model(manifest["arch"], manifest["arch_args"])
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - safetensors header errors, missing or unexpected keys, shapes
        raise BundleError(f"{weights}: cannot load into {manifest['arch']}: {e}") from None
    model.eval()
    pre = manifest["preprocess"]
    preset = EvalPreset(pre["input_size"], pre["mean"], pre["std"])
    labels = list(manifest["labels"])
    layers = describe_layers(model, preset.input_size, named_layers(model)) if describe else []
    return Bundle(
        path=path,
        name=manifest.get("name", path.name),
        version=str(manifest.get("version", manifest["weights_sha256"][:12])),
        arch=manifest["arch"],
        arch_args=manifest["arch_args"],
        model=model,
        preprocess=preset,
        labels=labels,
        layers=layers,
        weights_sha256=actual,
        manifest=manifest,
    )
