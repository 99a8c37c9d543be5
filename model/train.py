"""Train ConvServeNet on CIFAR-10 and write the model bundle.

    python -m model.train --train-data ../shared/datasets/cifar10/cifar10-train.tar.gz \
        --val-data ../shared/datasets/cifar10/cifar10-val.tar.gz --out model/bundles/convservenet-cifar10

The recipe is airbench96's (Keller Jordan, github.com/KellerJordan/cifar10-airbench), scaled to
what two CPU cores do in under an hour: narrower stages and fewer epochs, bf16 autocast where the
CPU has bf16 instructions (about 1.7x faster than float32 here), channels_last everywhere; the
conv filters train with Muon, as in airbench94_muon (docs/training.md: 1-2 points over SGD here).
Sections: settings, data loader, training, main.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.bundle import CONVSERVE_ARCH, save_bundle
from model.data import load_image_folder
from model.evaluate import accuracy, predict_logits
from model.net import ConvServeNet
from model.presets import CIFAR10_MEAN, CIFAR10_STD, EvalPreset

#############################################
#                 Settings                  #
#############################################


@dataclass
class TrainConfig:
    train_data: str = "../shared/datasets/cifar10/cifar10-train.tar.gz"
    val_data: str | None = "../shared/datasets/cifar10/cifar10-val.tar.gz"
    out: str = "model/bundles/convservenet-cifar10"
    epochs: float = 15.0  # passes over the 50,000 training images
    batch_size: int = 512  # on 2 CPU cores 512 runs ~20% faster per image than 1024 (cache)
    lr: float = 9.0  # learning rate per 1024 examples (decoupled from momentum, see below)
    optimizer: str = "muon"  # muon (Muon for the 3x3 conv filters, SGD for the rest) | sgd
    muon_lr: float = 0.08  # Muon: relative change of each filter bank per step at peak
    muon_momentum: float = 0.6
    momentum: float = 0.85
    weight_decay: float = 0.012  # per 1024 examples, decoupled from the learning rate
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster (no extra decay)
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3  # train the stem's bias this long, then freeze it
    flip: bool = True
    translate: int = 2  # random shifts of up to this many pixels (reflect padding)
    cutout: int = 0  # side of a random square zeroed in each image; 0 = off
    widths: tuple[int, int, int] = (80, 320, 320)
    pool: str = "avg"  # global pooling before the head: avg (ResNet, shipped) or max (airbench)
    tta_flip: bool = False  # the shipped network averages each image with its mirror image
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | bf16 | fp16 | off   (auto: bf16 on CUDA and on CPUs with bf16)
    limit_per_class: int | None = None  # read only this many images per class (smoke runs)
    name: str = "convservenet-cifar10"
    version: str = "1"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-data", default=d.train_data, help="ImageFolder dir or .tar(.gz) (default: %(default)s)")
    p.add_argument("--val-data", default=d.val_data, help="held-out images for the report (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="bundle directory to write (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="per 1024 examples (default: %(default)s)")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "muon"], help="(default: %(default)s)")
    p.add_argument("--muon-lr", type=float, default=d.muon_lr, help="(default: %(default)s)")
    p.add_argument("--muon-momentum", type=float, default=d.muon_momentum, help="(default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    p.add_argument("--bias-scaler", type=float, default=d.bias_scaler, help="(default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="(default: %(default)s)")
    p.add_argument("--whiten-bias-epochs", type=int, default=d.whiten_bias_epochs, help="(default: %(default)s)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="disable mirror augmentation")
    p.add_argument("--translate", type=int, default=d.translate, help="pixels (default: %(default)s)")
    p.add_argument("--cutout", type=int, default=d.cutout, help="pixels, 0 = off (default: %(default)s)")
    p.add_argument("--widths", default=",".join(map(str, d.widths)), help="stage widths (default: %(default)s)")
    p.add_argument("--pool", default=d.pool, choices=["avg", "max"], help="global pooling (default: %(default)s)")
    p.add_argument("--tta-flip", action="store_true", help="ship a network that averages with the mirror image")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "off"], help="(default: %(default)s)")
    p.add_argument("--limit-per-class", type=int, default=None, help="smoke runs: images per class")
    p.add_argument("--name", default=d.name, help="(default: %(default)s)")
    p.add_argument("--version", default=d.version, help="(default: %(default)s)")
    a = p.parse_args(argv)
    widths = tuple(int(w) for w in a.widths.split(","))
    if len(widths) != 3:
        p.error("--widths takes three comma-separated integers")
    if a.val_data in ("", "none"):
        a.val_data = None
    return TrainConfig(**{**vars(a), "widths": widths})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA; on CPU only where oneDNN has native bf16 (else it is slower than float32)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


#############################################
#               Data loader                 #
#############################################


def batch_flip_lr(images: torch.Tensor) -> torch.Tensor:
    mask = (torch.rand(len(images), device=images.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def batch_crop(padded: torch.Tensor, size: int) -> torch.Tensor:
    """Random translation: a random `size` crop of each (reflect-padded) image.

    Cropping by rows then by columns, one slice per shift value, beats per-image indexing.
    """
    r = (padded.size(-1) - size) // 2
    shifts = torch.randint(-r, r + 1, size=(len(padded), 2), device=padded.device)
    rows = torch.empty((len(padded), padded.size(1), size, padded.size(-1)), device=padded.device, dtype=padded.dtype)
    for s in range(-r, r + 1):
        mask = shifts[:, 0] == s
        rows[mask] = padded[mask, :, r + s : r + s + size, :]
    out = torch.empty((len(padded), padded.size(1), size, size), device=padded.device, dtype=padded.dtype)
    for s in range(-r, r + 1):
        mask = shifts[:, 1] == s
        out[mask] = rows[mask, :, :, r + s : r + s + size]
    return out


def batch_cutout(images: torch.Tensor, size: int) -> torch.Tensor:
    n, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, w - size + 1, (n, 1, 1, 1), device=images.device)
    ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
    mask = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(mask, 0)


class AugmentingLoader:
    """Yields augmented (images, labels) batches from normalised images held in memory.

    Faster to augment whole tensors than images one by one. Flipping alternates: a random half is
    pre-flipped once, then every other epoch flips everything, so each image is seen both ways.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig):
        self.labels = labels
        self.cfg = cfg
        self.epoch = 0
        self.base = batch_flip_lr(images) if cfg.flip else images
        pad = cfg.translate
        self.padded = F.pad(self.base, (pad,) * 4, "reflect") if pad > 0 else None

    def __len__(self) -> int:
        return len(self.labels) // self.cfg.batch_size  # drop the last partial batch

    def __iter__(self):
        images = batch_crop(self.padded, self.base.shape[-1]) if self.padded is not None else self.base
        if self.cfg.flip and self.epoch % 2 == 1:
            images = images.flip(-1)
        if self.cfg.cutout > 0:
            images = batch_cutout(images, self.cfg.cutout)
        images = images.contiguous(memory_format=torch.channels_last)
        self.epoch += 1
        order = torch.randperm(len(images), device=images.device)
        bs = self.cfg.batch_size
        for i in range(len(self)):
            idx = order[i * bs : (i + 1) * bs]
            yield images[idx], self.labels[idx]


#############################################
#                 Training                  #
#############################################


class Lookahead:
    """Keep an exponential moving average of the weights and pull the live weights onto it."""

    def __init__(self, model: nn.Module):
        self.ema = {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for ema, live in zip(self.ema.values(), model.state_dict().values(), strict=True):
            if live.dtype.is_floating_point:
                ema.lerp_(live, 1 - decay)
                live.copy_(ema)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `g` (all singular values ~1), by a quintic
    Newton-Schulz iteration in bf16 (Keller Jordan's Muon; coefficients from airbench94_muon)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then replace each filter bank's update by its orthogonalised version.

    Every output filter gets a step of similar size whatever its gradient's scale, so the conv
    layers learn at the same pace. Filters are renormalised to unit mean norm each step, which
    takes the place of weight decay (BatchNorm follows every conv, so their scale is free).
    """

    def __init__(self, params, lr: float, momentum: float, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.mul_(len(p) ** 0.5 / p.norm())
                p.add_(orthogonalize(g.reshape(len(g), -1)).view(g.shape), alpha=-group["lr"])


def make_optimizers(model: ConvServeNet, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """SGD for everything, or (--optimizer muon) Muon for the trainable 3x3 filters and SGD for
    the BatchNorm biases, the stem's bias and the head."""
    if cfg.optimizer == "sgd":
        return [make_optimizer(model, cfg)]
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    filter_ids = {id(p) for p in filters}
    sgd = make_optimizer(model, cfg, exclude=filter_ids)
    return [sgd, Muon(filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum)]


def make_optimizer(model: ConvServeNet, cfg: TrainConfig, exclude: frozenset[int] = frozenset()) -> torch.optim.SGD:
    # Decoupled hyperparameters (airbench96): with Nesterov momentum the step is about
    # 1 + 1/(1-momentum) times the gradient; dividing that out lets lr and momentum be tuned apart.
    kilostep_scale = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / kilostep_scale
    wd = cfg.weight_decay * cfg.batch_size / kilostep_scale
    lr_biases = lr * cfg.bias_scaler
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in exclude]
    norm_biases = [p for n, p in trainable if "norm" in n]
    others = [p for n, p in trainable if "norm" not in n]
    return torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
            dict(params=others, lr=lr, weight_decay=wd / lr),
        ],
        momentum=cfg.momentum,
        nesterov=True,
    )


def lr_factor(step: int, total_steps: int) -> float:
    """Linear warm-up from 0.2 over the first 10% of steps, then linear decay to zero."""
    warmup = max(1, int(total_steps * 0.1))
    if step < warmup:
        frac = step / warmup
        return 0.2 * (1 - frac) + frac
    return (total_steps - step) / (total_steps - warmup)


def train(cfg: TrainConfig, argv: list[str]) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = pick_amp_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    preset = EvalPreset(32, CIFAR10_MEAN, CIFAR10_STD)

    t0 = time.perf_counter()
    train_set = load_image_folder(cfg.train_data, preset, limit_per_class=cfg.limit_per_class)
    val_set = load_image_folder(cfg.val_data, preset, classes=train_set.classes) if cfg.val_data else None
    print(
        f"data: {len(train_set.labels)} training images, {len(val_set.labels) if val_set else 0} validation "
        f"images, decoded in {time.perf_counter() - t0:.1f}s; device={device} amp={amp_dtype}",
        flush=True,
    )

    train_images = preset.normalize(train_set.images).to(device)
    labels = train_set.labels.to(device)
    loader = AugmentingLoader(train_images, labels, cfg)

    model = ConvServeNet(num_classes=len(train_set.classes), widths=cfg.widths, pool=cfg.pool).to(device)
    model.stem.init_whitening(train_images[:5000])
    model = model.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(model, cfg)
    total_steps = math.ceil(len(loader) * cfg.epochs)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total_steps)) for o in optimizers]
    lookahead = Lookahead(model)
    alpha = 0.95**5 * (torch.arange(total_steps + 1) / total_steps) ** 3  # lookahead decay schedule
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")

    history = []
    step = 0
    train_start = time.perf_counter()
    for epoch in range(math.ceil(cfg.epochs)):
        model.stem.conv.bias.requires_grad = epoch < cfg.whiten_bias_epochs
        model.train()
        epoch_start, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True, file=sys.stderr)
        for inputs, targets in bar:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(inputs)
                loss = loss_fn(outputs.float(), targets).sum()
            model.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                scheduler.step()
            step += 1
            if step % 5 == 0:
                lookahead.update(model, decay=alpha[step].item())
            seen += len(targets)
            loss_sum += loss.item()
            correct += (outputs.argmax(1) == targets).sum().item()
            rate = seen / (time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{loss.item() / len(targets):.3f}", img_s=f"{rate:.0f}")
            if step >= total_steps:
                lookahead.update(model, decay=1.0)
                break
        epoch_s = time.perf_counter() - epoch_start
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "images_per_s": seen / epoch_s,
            "elapsed_s": time.perf_counter() - train_start,
        }
        if val_set is not None:
            row["val_acc"] = accuracy(predict_logits(model, preset.normalize(val_set.images), device), val_set.labels)
        history.append(row)
        val = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
        print(
            f"epoch {epoch + 1:>2}/{math.ceil(cfg.epochs)}  loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}{val}  {row['images_per_s']:.0f} img/s  "
            f"elapsed {row['elapsed_s']:.0f}s",
            flush=True,
        )
        if step >= total_steps:
            break

    train_wall_s = time.perf_counter() - train_start
    metrics = {"train_wall_s": round(train_wall_s, 1), "total_wall_s": round(time.perf_counter() - t0, 1)}
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    if val_set is not None:
        val_images = preset.normalize(val_set.images)
        metrics["val_images"] = len(val_set.labels)
        metrics["val_top1"] = accuracy(predict_logits(model, val_images), val_set.labels)
        model.tta_flip = True
        metrics["val_top1_tta_flip"] = accuracy(predict_logits(model, val_images), val_set.labels)
    model.tta_flip = cfg.tta_flip
    if val_set is not None:
        metrics["val_top1_shipped"] = metrics["val_top1_tta_flip" if cfg.tta_flip else "val_top1"]

    command = "python -m model.train " + " ".join(shlex.quote(a) for a in argv)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    out = save_bundle(
        cfg.out,
        model,
        arch=CONVSERVE_ARCH,
        arch_args={
            "num_classes": len(train_set.classes),
            "widths": list(cfg.widths),
            "pool": cfg.pool,
            "tta_flip": cfg.tta_flip,
        },
        labels=train_set.classes,
        preset=preset,
        name=cfg.name,
        version=cfg.version,
        training={
            "command": command,
            "config": config,
            "device": str(device),
            "amp": str(amp_dtype),
            "threads": torch.get_num_threads(),
            "history": history,
        },
        metrics=metrics,
    )
    print(f"train wall time: {train_wall_s:.1f}s ({train_wall_s / 60:.1f} min); total {metrics['total_wall_s']}s")
    if val_set is not None:
        print(
            f"val top1: {metrics['val_top1']:.4f}  with mirror TTA: {metrics['val_top1_tta_flip']:.4f}  "
            f"shipped: {metrics['val_top1_shipped']:.4f}"
        )
    print(f"bundle written to {out}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    train(parse_args(argv), argv)


if __name__ == "__main__":
    main()
