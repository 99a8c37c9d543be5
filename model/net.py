"""ConvServeNet: a small ResNet-style CNN for 32x32 RGB images.

The network reads like the ideas it embodies:

    image (3 x 32 x 32)
      -> stem    learned 2x2 kernels (initialised to whiten image patches)   24 x 31 x 31
      -> stage1  conv 3x3, stride-2 max-pool step, residual block           80 x 15 x 15
      -> stage2  conv 3x3, stride-2 max-pool step, residual block          320 x  7 x  7
      -> stage3  conv 3x3, stride-2 max-pool step, residual block          320 x  3 x  3
      -> pool    global average pooling: one number per channel            320 x  1 x  1
      -> head    linear classifier                                          10 logits

Each stage halves height and width while the channel count grows, so later kernels see a
larger part of the image (their receptive field) through fewer, richer feature maps.

The design follows the airbench family of fast CIFAR-10 trainers (Keller Jordan): a frozen
whitening stem, BatchNorm with a frozen scale, GELU, and identity-initialised
convolutions, with airbench96's residual blocks (they pay off with longer training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The named stages, in forward order. Feature maps are exposed under these names.
STAGES = ("stem", "stage1", "stage2", "stage3", "pool", "head")


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen scale (airbench): the scale is redundant before a following
    convolution, and freezing it leaves the optimiser less to do."""

    def __init__(self, num_features: int, eps: float = 1e-12):
        super().__init__(num_features, eps=eps)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    """3x3 'same' convolution whose first filters start as the identity (dirac)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut: out = GELU(x + f(x))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv(channels, channels)
        self.norm1 = BatchNorm(channels)
        self.conv2 = Conv(channels, channels)
        self.norm2 = BatchNorm(channels)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activ(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.activ(x + y)


class Stage(nn.Module):
    """Widen the channels with a 3x3 conv, halve H and W with a stride-2 pool, then refine."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = Conv(channels_in, channels_out)
        self.down = nn.MaxPool2d(kernel_size=2, stride=2)
        self.norm = BatchNorm(channels_out)
        self.activ = nn.GELU()
        self.block = ResidualBlock(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm(self.down(self.conv(x))))
        return self.block(x)


class Stem(nn.Module):
    """Learned 2x2 kernels over the RGB input, initialised to whiten image patches.

    Half the filters are the whitening eigenvectors, half their negatives, so that GELU keeps
    both signs of every whitened component. The weights stay frozen; the bias learns.
    """

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        width = 2 * 3 * kernel_size**2
        self.conv = nn.Conv2d(3, width, kernel_size, padding=0, bias=True)
        self.conv.weight.requires_grad = False
        self.activ = nn.GELU()

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the kernels from the eigenvectors of the covariance of `images`' patches."""
        c, (h, w) = images.shape[1], self.conv.weight.shape[2:]
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        patches = patches.float()
        covariance = (patches.T @ patches) / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance, UPLO="U")
        scaled = eigenvectors.T.reshape(-1, c, h, w) / torch.sqrt(eigenvalues.view(-1, 1, 1, 1) + eps)
        self.conv.weight.data[:] = torch.cat((scaled, -scaled)).to(self.conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.conv(x))


class GlobalPool(nn.Module):
    """Global pooling over H and W: one number per channel, whatever the input size.

    `avg` (global average pooling, as in ResNet; the shipped bundle) or `max` (the airbench
    nets). On CIFAR-10 they train to the same accuracy: 0.920 (max) and 0.9205 (avg) top-1 with
    mirror TTA for widths 64/256/256 and 25 epochs (docs/training.md, GPU sweep).
    """

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', not {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1) if self.mode == "avg" else F.adaptive_max_pool2d(x, 1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class Head(nn.Module):
    """Flatten the pooled channels and score each class with one linear layer."""

    def __init__(self, channels: int, num_classes: int, scale: float = 1 / 9):
        super().__init__()
        self.linear = nn.Linear(channels, num_classes, bias=False)
        self.scale = scale  # airbench96: a fixed logit scale instead of a small initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, 1)) * self.scale


class ConvServeNet(nn.Module):
    """stem -> stage1 -> stage2 -> stage3 -> pool -> head."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (80, 320, 320),
        tta_flip: bool = False,
        pool: str = "avg",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.tta_flip = tta_flip
        self.widths = tuple(widths)
        self.stem = Stem()
        stem_width = self.stem.conv.out_channels
        self.stage1 = Stage(stem_width, widths[0])
        self.stage2 = Stage(widths[0], widths[1])
        self.stage3 = Stage(widths[1], widths[2])
        self.pool = GlobalPool(pool)
        self.head = Head(widths[2], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta_flip and not self.training:
            # Test-time augmentation: score the image and its mirror image, average the logits.
            # The stages see 2N images; the first N are the originals.
            n = len(x)
            x = torch.cat([x, x.flip(-1)])
            for name in STAGES:
                x = getattr(self, name)(x)
            return 0.5 * (x[:n] + x[n:])
        for name in STAGES:
            x = getattr(self, name)(x)
        return x
