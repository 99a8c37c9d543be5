"""Compare training recipes side by side: several `model.train` runs in parallel on one GPU.

    python -m model.sweep --out runs/sweep --jobs 12 \
        "--widths 64,256,256 --epochs 25" "--widths 96,384,384 --epochs 11 --seed 1" ...

Each argument is one run's `model.train` flags. The data are decoded once and shared; every run
writes its bundle under --out and one JSON line to --out/results.jsonl with its validation
accuracy plain, with mirror TTA, and with mirror + 1-pixel-translate TTA (6 views, airbench's
`tta_level=2`). Used to choose the CPU recipe: a recipe's accuracy does not depend on where it
trains, so a GPU answers in minutes what the 2-core machine answers in an hour.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import train as train_module
from model.bundle import load_bundle
from model.data import ImageDataset, load_image_folder
from model.evaluate import accuracy, predict_logits
from model.presets import CIFAR10_MEAN, CIFAR10_STD, EvalPreset


@torch.inference_mode()
def translate_tta_logits(model: torch.nn.Module, images: torch.Tensor, device: str) -> torch.Tensor:
    """airbench's tta_level=2: mirror TTA on the image and on two 1-pixel shifts of it."""
    model.tta_flip = True
    base = predict_logits(model, images, device)
    padded = F.pad(images, (1,) * 4, "reflect")
    shifted = [padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
    shifted_logits = torch.stack([predict_logits(model, s, device) for s in shifted]).mean(0)
    return 0.5 * base + 0.5 * shifted_logits


def save_cache(path: Path, sets: dict[str, ImageDataset]) -> None:
    """Decoded datasets as safetensors (no pickle anywhere in model/), class names as metadata."""
    tensors = {f"{k}.{f}": getattr(d, f).contiguous() for k, d in sets.items() for f in ("images", "labels")}
    save_file(tensors, str(path), metadata={"classes": json.dumps(next(iter(sets.values())).classes)})


def load_cache(path: Path) -> dict[str, ImageDataset]:
    with safe_open(str(path), "pt") as f:
        classes = json.loads(f.metadata()["classes"])
    tensors = load_file(str(path))
    names = {key.split(".")[0] for key in tensors}
    return {k: ImageDataset(tensors[f"{k}.images"], tensors[f"{k}.labels"], classes, []) for k in names}


def worker(cache: Path, out: Path, flags: list[str]) -> dict:
    sets = load_cache(cache)
    # model.train reads its data through load_image_folder: hand it the decoded tensors instead.
    train_module.load_image_folder = lambda path, *a, **kw: sets["val" if "val" in str(path) else "train"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = [*flags, "--train-data", "cached-train", "--val-data", "cached-val", "--out", str(out), "--device", device]
    cfg = train_module.parse_args(argv)
    start = time.perf_counter()
    metrics = train_module.train(cfg, argv)
    bundle = load_bundle(out)
    val = sets["val"]
    logits = translate_tta_logits(bundle.model.to(device), bundle.preprocess.normalize(val.images), device)
    metrics["val_top1_tta_translate"] = accuracy(logits, val.labels)
    return {"flags": " ".join(flags), "gpu_wall_s": round(time.perf_counter() - start, 1), **metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="one quoted string of model.train flags per run")
    p.add_argument("--train-data", default="../shared/datasets/cifar10/cifar10-train.tar.gz")
    p.add_argument("--val-data", default="../shared/datasets/cifar10/cifar10-val.tar.gz")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--jobs", type=int, default=8, help="runs at a time (default: %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.worker:
        result = worker(Path(a.cache), out, shlex.split(a.runs[0]))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    preset = EvalPreset(32, CIFAR10_MEAN, CIFAR10_STD)
    cache = out / "data.safetensors"
    start = time.perf_counter()
    train_set = load_image_folder(a.train_data, preset)
    val_set = load_image_folder(a.val_data, preset, classes=train_set.classes)
    save_cache(cache, {"train": train_set, "val": val_set})
    decoded_s = time.perf_counter() - start
    print(f"sweep: data decoded in {decoded_s:.1f}s; {len(a.runs)} runs, {a.jobs} at a time", flush=True)

    def run(index: int, flags: str) -> dict | None:
        run_out = out / f"run{index:02d}"
        cmd = [sys.executable, "-m", "model.sweep", "--worker", "--cache", str(cache), "--out", str(run_out), flags]
        stdout = out / f"run{index:02d}.stdout"  # epoch lines as they come, then RESULT
        with open(out / f"run{index:02d}.log", "w") as log, open(stdout, "w") as progress:
            proc = subprocess.run(cmd, stdout=progress, stderr=log, text=True)
        lines = [line for line in stdout.read_text().splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"sweep: run {index} ({flags}) failed, rc {proc.returncode}", flush=True)
            return None
        result = {"run": index, **json.loads(lines[-1][len("RESULT ") :])}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"sweep: run {index} [{flags}] val {result['val_top1']:.4f} flip {result['val_top1_tta_flip']:.4f} "
            f"flip+translate {result['val_top1_tta_translate']:.4f} ({result['gpu_wall_s']}s)",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(a.jobs) as pool:
        results = [r for r in pool.map(lambda ir: run(*ir), enumerate(a.runs)) if r]
    print(f"\n{'val':>7}{'flip':>7}{'flip+tr':>9}  flags")
    for r in sorted(results, key=lambda r: -r["val_top1_tta_flip"]):
        print(f"{r['val_top1']:>7.4f}{r['val_top1_tta_flip']:>7.4f}{r['val_top1_tta_translate']:>9.4f}  {r['flags']}")
    return 0 if len(results) == len(a.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
