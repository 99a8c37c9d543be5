"""The batched predictor: plain PyTorch, no Ray, no HTTP.

A batch function in the LitServe sense: it takes a list of work items and returns a list of
the same length, one result per item, or an error object for an item that could not be served.
One forward pass serves the whole batch, and captures in the same pass the intermediate
feature maps that any item of the batch asked for.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from model.bundle import Bundle
from model.layers import capture
from service.decode import decode_image_bytes
from service.errors import ApiError
from service.gpu_decode import decode_batch

log = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class WorkItem:
    """One image at the model's input size and what the caller wants from it."""

    # uint8 [3, S, S] (EvalPreset.to_model_size: normalised here, a batch at a time, on the model's
    # device, so a quarter of the bytes travel), or float32 [3, S, S] already normalised
    image: torch.Tensor | None
    top_k: int = 5
    layers: tuple[str, ...] = ()  # feature maps to return, by layer name
    enqueued_at: float = 0.0  # time.perf_counter() when it was handed to the batcher
    expires_at: float | None = None  # time.time() past which its caller no longer waits (not computed)
    # A JPEG to decode on the model's device with the rest of its batch (service/gpu_decode.py);
    # `image` is None until then. The ingress has checked its header and pixel count.
    encoded: bytes | None = None


@dataclass
class Prediction:
    label: str
    index: int
    score: float


@dataclass
class ItemResult:
    predictions: list[Prediction]
    feature_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 CPU tensor
    batch_size: int = 1
    inference_s: float = 0.0
    queue_s: float = 0.0  # waited for its batch to start (set by the serving layer)


@dataclass
class ItemError:
    code: str
    message: str
    status: int = 400


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN's bf16 kernels need.
    torch's x86 feature checks; a build without them (another architecture) counts as no."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


class BatchedPredictor:
    """Wraps a loaded bundle; `predict(items)` runs one forward pass for the whole list."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        amp_dtype: str = "bf16",
        channels_last: bool = True,
        noop_forward: bool = False,
        max_image_pixels: int = 40_000_000,
        cpu_amp_dtype: str = "off",
    ):
        self.bundle = bundle
        self.noop_forward = noop_forward  # benchmarks only: zeros of the model's output shapes
        self.max_image_pixels = max_image_pixels  # for items that arrive encoded (model-side decode)
        if noop_forward:
            log.warning("noop_forward: answers are zeros, not the model's (a serving-overhead benchmark)")
        self.device = pick_device(device)
        self.channels_last = channels_last
        self.layer_names = [info.name for info in bundle.layers]
        # Autocast: `amp_dtype` on CUDA; on a CPU `cpu_amp_dtype`, float32 unless asked, because bf16
        # moves scores a little (it pays on CPUs with bf16 units, and is slower on those without).
        self.amp_dtype = _AMP_DTYPES[amp_dtype if self.device.type == "cuda" else cpu_amp_dtype]
        if self.device.type == "cpu" and self.amp_dtype is torch.bfloat16 and not cpu_has_bf16_units():
            log.warning("cpu_amp_dtype bf16 on a CPU without bf16 units (AVX512-BF16, AMX): likely slower than float32")
        model = bundle.model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # pick the fastest kernels per batch shape (warm-up does it)

    @property
    def precision(self) -> str:
        """What the forward pass computes in: autocast's dtype, or float32."""
        return str(self.amp_dtype or torch.float32).removeprefix("torch.")

    # --- the batch function -------------------------------------------------------------

    def predict(self, items: list[WorkItem]) -> list[ItemResult | ItemError]:
        """One result per item, in order. Items are validated upstream; the only bytes seen here are
        encoded JPEGs handed over for decoding with their batch (WorkItem.encoded)."""
        if not items:
            return []
        failed = self._decode_encoded(items)
        results: list[ItemResult | ItemError | None] = [failed.get(n) for n in range(len(items))]
        for n, item in enumerate(items):
            if results[n] is None and not self._fits(item.image):
                got = "no image" if item.image is None else f"{item.image.dtype} {tuple(item.image.shape)}"
                results[n] = ItemError("invalid_input", f"expected uint8 or float32 [3, S, S], got {got}")
        valid = [i for i, r in enumerate(results) if r is None]
        if valid:
            outputs = self._forward([items[i] for i in valid])
            for i, out in zip(valid, outputs, strict=True):
                results[i] = out
        return results

    def _fits(self, image: torch.Tensor | None) -> bool:
        size = self.bundle.preprocess.input_size
        return (
            image is not None and image.dtype in (torch.uint8, torch.float32) and tuple(image.shape) == (3, size, size)
        )

    def _decode_encoded(self, items: list[WorkItem]) -> dict[int, ItemError]:
        """Decode the batch's encoded JPEGs on the model's device in one call; what that path does
        not take is decoded on the CPU, one at a time, and an image that cannot be decoded fails
        alone with the 4xx the CPU path gives it. Returns those failures by item index."""
        encoded = [i for i, item in enumerate(items) if item.encoded is not None]
        if not encoded:
            return {}
        preset, failed = self.bundle.preprocess, {}
        decoded = decode_batch([items[i].encoded for i in encoded], preset, self.device, self.max_image_pixels)
        for i, image in zip(encoded, decoded, strict=True):
            if image is None:
                try:
                    image = preset.to_model_size(decode_image_bytes(items[i].encoded, self.max_image_pixels))
                except ApiError as e:
                    failed[i] = ItemError(e.code, e.message, e.status)
                    continue
            items[i].image, items[i].encoded = image, None
        return failed

    def _forward(self, items: list[WorkItem]) -> list[ItemResult]:
        n = len(items)
        wanted = sorted({name for item in items for name in item.layers}, key=self.layer_names.index)
        start = time.perf_counter()
        x = self._batch_on_device([item.image for item in items])
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits, maps = self._noop(x, wanted) if self.noop_forward else capture(self.model, wanted, x)
            probs = torch.softmax(logits.float(), dim=1)
            k = min(max(item.top_k for item in items), probs.shape[1])
            scores, indices = probs.topk(k, dim=1)
            scores, indices = scores.cpu().tolist(), indices.cpu().tolist()
            # A model with built-in test-time augmentation runs 2N images; the first N are the originals.
            maps = {name: m[:n].float().cpu() for name, m in maps.items()}
        elapsed = time.perf_counter() - start
        labels = self.bundle.labels
        results = []
        for row, item in enumerate(items):
            preds = [
                Prediction(labels[j], j, s)
                for j, s in zip(indices[row][: item.top_k], scores[row][: item.top_k], strict=True)
            ]
            fmaps = {name: maps[name][row] for name in item.layers}
            results.append(ItemResult(predictions=preds, feature_maps=fmaps, batch_size=n, inference_s=elapsed))
        return results

    def _noop(self, x: torch.Tensor, wanted: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass's outputs, all zeros, without computing it (`noop_forward`)."""
        n = x.shape[0]
        logits = torch.zeros(n, len(self.bundle.labels), device=x.device)
        return logits, {name: torch.zeros(n, *self.bundle.layer(name).shape, device=x.device) for name in wanted}

    def _batch_on_device(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Normalised float32 [N, 3, S, S] on the model's device. uint8 images travel as uint8 (a
        quarter of float32's bytes over PCIe) and are normalised there, the whole batch at once."""
        preset = self.bundle.preprocess
        if all(i.dtype == torch.uint8 for i in images):
            return self._layout(preset.normalize(self._to_device(images)))
        mixed = [preset.normalize(i) if i.dtype == torch.uint8 else i for i in images]  # V2 float32 inputs
        return self._layout(self._to_device(mixed))

    def _to_device(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One tensor [N, ...] on the model's device. Images decoded there already (gpu_decode) stay."""
        if self.device.type != "cuda":
            return torch.stack(images)
        if all(i.device.type == "cpu" for i in images):
            return torch.stack(images).pin_memory().to(self.device, non_blocking=True)  # async from page-locked
        return torch.stack([i.to(self.device, non_blocking=True) for i in images])

    def _layout(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    # --- lifecycle ----------------------------------------------------------------------

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        """Run each batch size once (cudnn autotuning, oneDNN primitive caches); seconds per size."""
        size = self.bundle.preprocess.input_size
        timings = {}
        for bs in batch_sizes:
            items = [WorkItem(torch.zeros(3, size, size, dtype=torch.uint8), top_k=1, layers=()) for _ in range(bs)]
            start = time.perf_counter()
            self.predict(items)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings[bs] = time.perf_counter() - start
        return timings

    def warmup_decode(self) -> None:
        """One small JPEG through the model-side decode (service/gpu_decode.py) on this device."""
        from torchvision.io import encode_jpeg

        jpeg = encode_jpeg(torch.full((3, 64, 64), 128, dtype=torch.uint8)).numpy().tobytes()
        self.predict([WorkItem(None, top_k=1, encoded=jpeg)])

    def check_health(self) -> None:
        """A tiny forward pass; raises if the model no longer produces finite scores."""
        size = self.bundle.preprocess.input_size
        result = self.predict([WorkItem(torch.zeros(3, size, size), top_k=1)])[0]
        if not isinstance(result, ItemResult) or not all(
            p.score == p.score and 0.0 <= p.score <= 1.0 for p in result.predictions
        ):
            raise RuntimeError("health check forward pass produced no valid scores")


def keep_large_allocations(threshold_bytes: int = 256 * 1024 * 1024) -> bool:
    """Let glibc reuse the memory of large tensors instead of mapping and unmapping it per batch.

    A worker thread allocates from its own malloc arena, where every activation over the mmap
    threshold is a fresh mmap: page faults on each forward pass. A 32-image forward in a worker
    thread on the 2-core CPU machine: 216-217 ms by default, 192-194 ms with this, as on the main
    thread (`OMP_NUM_THREADS=1 python -m loadtests.microbench threads [--keep-large-allocations]`).
    Returns False where it does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        return bool(libc.mallopt(m_mmap_threshold, threshold_bytes)) and bool(
            libc.mallopt(m_trim_threshold, 2 * threshold_bytes)
        )
    except (OSError, AttributeError):
        return False


def default_warmup_sizes(max_batch_size: int, every_size: bool = False) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size; with `every_size`, 1..max_batch_size.

    On CUDA `cudnn.benchmark` picks kernels per input shape on the first pass of each batch size:
    warm every size there, so that no request pays for the autotuning.
    """
    if every_size:
        return list(range(1, max_batch_size + 1))
    sizes, bs = [], 1
    while bs < max_batch_size:
        sizes.append(bs)
        bs *= 2
    sizes.append(max_batch_size)
    return sizes
