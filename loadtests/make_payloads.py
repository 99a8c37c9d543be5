"""Make the load tests' payloads: CIFAR-10 validation JPEGs and larger synthetic "photos".

    python -m loadtests.make_payloads [--out loadtests/payloads] [--check]

Deterministic: the same CIFAR files are copied, and each larger photo is drawn from its own fixed
seed (an upscaled CIFAR image under soft gradients, shapes and fine grain), so a rerun draws the
same pixels (`photo_pixels(i)`; the PNGs hold them losslessly). With the same Pillow version it
also writes the same bytes; `--check` compares a fresh run with the files on disk (exit 1 if they
differ).

Larger photos: 224x224, 640x480 and 1280x960, each as PNG, JPEG (quality 90) and WebP (quality
85), named `photo-<class>-<W>x<H>.<ext>`. They exercise decoding and resizing of real-sized
uploads; the model sees every image at its own input size (32x32) after preprocessing.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
CIFAR_SAMPLE = ROOT / "tests" / "fixtures" / "cifar10-val-sample"
DEFAULT_OUT = Path(__file__).resolve().parent / "payloads"

CIFAR_PER_CLASS = 4
SEED = 20261124
# (class of the CIFAR image underneath, width, height)
PHOTOS = [("cat", 224, 224), ("ship", 640, 480), ("horse", 1280, 960)]
FORMATS = {"png": ("PNG", {"optimize": True}), "jpg": ("JPEG", {"quality": 90}), "webp": ("WEBP", {"quality": 85})}


def cifar_files() -> list[tuple[str, Path]]:
    """(payload name, source): the first CIFAR_PER_CLASS fixture JPEGs of every class."""
    out = []
    for class_dir in sorted(p for p in CIFAR_SAMPLE.iterdir() if p.is_dir()):
        for i, src in enumerate(sorted(class_dir.glob("*.jpg"))[:CIFAR_PER_CLASS]):
            out.append((f"cifar-{class_dir.name}-{i:02d}.jpg", src))
    return out


def photo(label: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: an upscaled CIFAR image of `label`, light, shapes and grain."""
    src = Image.open(sorted((CIFAR_SAMPLE / label).glob("*.jpg"))[0]).convert("RGB")
    base = np.asarray(src.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)

    # Soft light: a vertical sky-like gradient and a radial vignette.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(0.85, 1.15, 3), rng.uniform(0.7, 1.0, 3)
    t = (yy / max(height - 1, 1))[..., None]
    light = top * (1 - t) + bottom * t
    r = np.hypot((xx - width / 2) / width, (yy - height / 2) / height)[..., None]
    img = base * light * (1.0 - 0.45 * r**2)

    # A few translucent shapes, blurred so that edges look optical rather than drawn.
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(40, 110)),)
        box = [x0, y0, x0 + w, y0 + h]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    overlay = overlay.filter(ImageFilter.GaussianBlur(radius=max(1.0, width / 400)))
    ov = np.asarray(overlay, dtype=np.float32)
    alpha = ov[..., 3:] / 255.0
    img = img * (1 - alpha) + ov[..., :3] * alpha

    # Fine grain, as a sensor adds; low amplitude keeps PNGs a reasonable size.
    img += rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def photo_pixels(i: int) -> Image.Image:
    """The i-th entry of PHOTOS, as make_payloads draws it."""
    label, width, height = PHOTOS[i]
    return photo(label, width, height, np.random.default_rng([SEED, i]))


def encode(image: Image.Image, ext: str) -> bytes:
    fmt, kwargs = FORMATS[ext]
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def build() -> dict[str, bytes]:
    """Every payload's file name and bytes."""
    files = {name: src.read_bytes() for name, src in cifar_files()}
    for i, (label, width, height) in enumerate(PHOTOS):
        image = photo_pixels(i)
        for ext in FORMATS:
            files[f"photo-{label}-{width}x{height}.{ext}"] = encode(image, ext)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.make_payloads", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    a = p.parse_args(argv)
    files = build()
    if a.check:
        stale = [n for n, data in files.items() if not (a.out / n).is_file() or (a.out / n).read_bytes() != data]
        for name in stale:
            print(f"differs or missing: {a.out / name}")
        return 1 if stale else 0
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    for name, data in files.items():
        (a.out / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} payloads ({total / 1e6:.2f} MB) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
