"""The one preprocessing: uint8 image tensors in, normalised float tensors out.

Training's evaluation, `model.evaluate` and the serving path all call `EvalPreset`, so a
prediction served over HTTP equals the one measured offline for the same decoded image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Per-channel statistics of the CIFAR-10 training images (the usual published values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[H, W] or [C, H, W] with C in 1..4 -> [3, H, W]. Alpha is dropped, gray is repeated."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise ValueError(f"expected an image tensor [C, H, W], got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if channels in (1, 2):  # gray, gray + alpha
        return image[:1].expand(3, -1, -1)
    if channels in (3, 4):  # RGB, RGBA
        return image[:3]
    raise ValueError(f"expected 1 to 4 channels, got {channels}")


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (antialiased) and take the centre `size` x `size` crop.

    A 32x32 image, like every CIFAR-10 image, passes through untouched.
    """
    _, h, w = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(
        image.unsqueeze(0).float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[0, :, top : top + size, left : left + size]
    return cropped.round_().clamp_(0, 255).to(torch.uint8)


class EvalPreset:
    """uint8 image tensor(s) of any size and 1/3/4 channels -> normalised float32 [.., 3, S, S]."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]):
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std).view(3, 1, 1)

    def to_model_size(self, image: torch.Tensor) -> torch.Tensor:
        """One decoded image -> uint8 [3, S, S]: the geometric part of the preprocessing."""
        if image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image tensor, got {image.dtype}")
        return resize_uint8(to_rgb(image), self.input_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [3, S, S] or [N, 3, S, S] at model size -> float32, scaled and standardised."""
        # `.float()` returns a float input itself, so divide out of place: never modify the caller's tensor.
        # The statistics follow the images to their device (a batch normalised on the GPU).
        mean, inv_std = self._mean.to(images.device), self._inv_std.to(images.device)
        return (images.float() / 255.0 - mean).mul_(inv_std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One image or a batch [N, C, H, W] -> float32 [3, S, S] or [N, 3, S, S]."""
        if image.dim() == 4:
            return self.normalize(torch.stack([self.to_model_size(i) for i in image]))
        return self.normalize(self.to_model_size(image))

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}
