"""Read an image-classification dataset once into uint8 tensors.

Accepts an ImageFolder directory (`root/<class>/<image>`) or a `.tar` / `.tar.gz` of one
(members like `train/<class>/0001.jpg`). Images are decoded with torchvision's decoders and
brought to the model's input size by the shared preset, so training sees exactly what
evaluation and serving see.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torchvision.io import ImageReadMode, decode_image

from model.presets import EvalPreset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    paths: list[str]


def _read_encoded(path: Path) -> list[tuple[str, str, bytes]]:
    """(class name, relative path, encoded bytes) for every image under `path`."""
    items: list[tuple[str, str, bytes]] = []
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                rel = file.relative_to(path)
                items.append((rel.parts[-2] if len(rel.parts) >= 2 else "", str(rel), file.read_bytes()))
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if member.isfile() and name.suffix.lower() in IMAGE_SUFFIXES:
                    data = tar.extractfile(member).read()
                    items.append((name.parts[-2] if len(name.parts) >= 2 else "", member.name, data))
        items.sort(key=lambda item: item[1])
    else:
        raise FileNotFoundError(f"{path}: not an ImageFolder directory or a .tar/.tar.gz of one")
    if not items:
        raise FileNotFoundError(f"{path}: no images found")
    return items


def load_image_folder(
    path: str | Path, preset: EvalPreset, classes: list[str] | None = None, limit_per_class: int | None = None
) -> ImageDataset:
    """Decode every image once into a uint8 tensor at the preset's input size.

    `classes` fixes the label order (pass the training classes when reading evaluation data).
    """
    items = _read_encoded(Path(path))
    if classes is None:
        classes = sorted({cls for cls, _, _ in items})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({cls for cls, _, _ in items if cls not in index})
    if unknown:
        raise ValueError(f"{path}: classes {unknown} are not among {classes}")
    if limit_per_class is not None:
        counts: dict[str, int] = {}
        kept = []
        for item in items:
            counts[item[0]] = counts.get(item[0], 0) + 1
            if counts[item[0]] <= limit_per_class:
                kept.append(item)
        items = kept
    images = torch.empty((len(items), 3, preset.input_size, preset.input_size), dtype=torch.uint8)
    for i, (_, _, data) in enumerate(items):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        images[i] = preset.to_model_size(decode_image(encoded, mode=ImageReadMode.UNCHANGED))
    labels = torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.int64)
    return ImageDataset(images=images, labels=labels, classes=list(classes), paths=[p for _, p, _ in items])
