"""Evaluate a bundle on labelled images.

    python -m model.evaluate --bundle model/bundles/convservenet-cifar10 \
        --data ../shared/datasets/cifar10/cifar10-val.tar.gz

Prints per-class accuracy, optionally writes a confusion-matrix PNG, and ends with `top1: 0.XXXX`.
Uses the bundle's own preprocessing (`EvalPreset`), the same code the service runs.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits for normalised images [N, 3, S, S], in batches, in eval mode; returned on the CPU.
    `autocast_dtype`: compute in it, as the service does with `cpu_amp_dtype` / `amp_dtype`."""
    was_training = model.training
    model.eval()
    outs = []
    device_type = torch.device(device).type
    for chunk in images.split(batch_size):
        chunk = chunk.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
            outs.append(model(chunk).float().cpu())
    model.train(was_training)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    index = labels * num_classes + predicted
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def save_confusion_png(matrix: torch.Tensor, classes: list[str], path: str | Path) -> None:
    from PIL import Image, ImageDraw

    n, cell, margin = len(classes), 44, 90
    img = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    row_norm = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 3), classes[i][:12], fill="black")
        draw.text((margin + i * cell + 2, margin - 20 - (i % 2) * 14), classes[i][:7], fill="black")
        for j in range(n):
            shade = int(255 * (1 - row_norm[i, j].item()))
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline="gray")
            draw.text((x0 + 6, y0 + cell // 3), str(int(matrix[i, j])), fill="black" if shade > 120 else "white")
    draw.text((4, 4), "rows: true class, columns: predicted", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> float:
    from model.bundle import load_bundle
    from model.data import load_image_folder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model)")
    p.add_argument("--data", required=True, help="ImageFolder directory or .tar/.tar.gz of one")
    p.add_argument("--confusion-png", default=None, help="write a confusion-matrix PNG here")
    p.add_argument("--batch-size", type=int, default=500, help="(default: %(default)s)")
    p.add_argument(
        "--cpu-amp-dtype",
        choices=["off", "bf16"],
        default="off",
        help="compute in bf16 as the service does with cpu_amp_dtype bf16, and compare with float32 (default: off)",
    )
    a = p.parse_args(argv)

    from model import DEFAULT_BUNDLE

    bundle = load_bundle(a.bundle or DEFAULT_BUNDLE, describe=False)
    data = load_image_folder(a.data, bundle.preprocess, classes=bundle.labels)
    images = bundle.preprocess.normalize(data.images)
    autocast_dtype = torch.bfloat16 if a.cpu_amp_dtype == "bf16" else None
    logits = predict_logits(bundle.model, images, batch_size=a.batch_size, autocast_dtype=autocast_dtype)
    predicted = logits.argmax(1)
    matrix = confusion_matrix(predicted, data.labels, len(bundle.labels))
    print(f"model {bundle.model_id} ({bundle.arch}) on {len(data.labels)} images from {a.data}")
    for i, label in enumerate(bundle.labels):
        total = int(matrix[i].sum())
        if total:
            print(f"  {label:<12} {int(matrix[i, i]) / total:.4f}  ({int(matrix[i, i])}/{total})")
    if a.confusion_png:
        save_confusion_png(matrix, bundle.labels, a.confusion_png)
        print(f"confusion matrix written to {a.confusion_png}")
    top1 = accuracy(logits, data.labels)
    if autocast_dtype is not None:
        reference = predict_logits(bundle.model, images, batch_size=a.batch_size)
        same = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
        moved = (logits.softmax(1) - reference.softmax(1)).abs().max().item()
        print(
            f"against float32: top1 {accuracy(reference, data.labels):.4f}, the same top-1 class for {same:.4f} "
            f"of the images, largest score difference {moved:.4f}"
        )
    print(f"top1: {top1:.4f}")
    return top1


if __name__ == "__main__":
    main()
