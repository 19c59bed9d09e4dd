"""Controlled experiments that show why a model is better, not only that it is: accuracy under translation and
flips, under CIFAR-10-C style corruptions, and the pixel-permutation test.

Every function takes a trained model and a test split (uint8 images N×C×H×W and labels, like `DeviceSplit`),
alters the uint8 pixels, then normalises with the model's own `mean` and `std` exactly as `DeviceSplit` does.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The permutation is a data transformation (data.permutation); the experiment's names are kept here too.
from cifarbench.data.permutation import inverse_permutation as inverse_permutation
from cifarbench.data.permutation import permute_pixels as permute_pixels
from cifarbench.data.permutation import pixel_permutation as pixel_permutation
from cifarbench.errors import CifarbenchError


class LabelledImages(Protocol):
    """What the experiments read from a split: `DeviceSplit` has both."""

    images: torch.Tensor
    """uint8 (N, C, H, W)."""
    labels: torch.Tensor


@dataclass(frozen=True)
class Normaliser:
    """uint8 pixels -> the model's input: the same affine map, layout and batch size as `DeviceSplit`."""

    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 1000
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 255] (uint8 or float) -> normalised float32."""
        shape = (1, len(self.mean), 1, 1)
        # Folded exactly as DeviceSplit folds it, so an unaltered image gives bit-identical logits.
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(shape)
        scale = 1.0 / (255.0 * std)
        shift = -torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(shape) / std
        x = torch.addcmul(shift, pixels.float(), scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.no_grad()
def accuracy_under(model: nn.Module, split: LabelledImages, norm: Normaliser,
                   transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> float:
    """Accuracy of `model` on `split` with `transform(uint8 batch, index of its first image)` applied to the pixels."""
    was_training = model.training
    model.eval()
    images, labels = split.images, split.labels
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    try:
        for start in range(0, len(labels), norm.batch_size):
            pixels = images[start:start + norm.batch_size]
            if transform is not None:
                pixels = transform(pixels, start)
            device_type = pixels.device.type
            with torch.autocast(device_type, dtype=norm.autocast_dtype or torch.float32,
                                enabled=norm.autocast_dtype is not None):
                logits = model(norm(pixels))
            correct += (logits.argmax(1) == labels[start:start + norm.batch_size]).sum()
    finally:
        model.train(was_training)
    return int(correct) / max(len(labels), 1)


# --- Translation and flips ---------------------------------------------------------------------------------

Fill = Literal["reflect", "zero"]


def shift_images(images: torch.Tensor, shift: int, fill: Fill = "reflect") -> torch.Tensor:
    """Move the content `shift` pixels right and down; the uncovered top rows and left columns are the image
    mirrored at its edge ("reflect", the same padding as test-time augmentation) or black ("zero": pixel 0
    before normalisation). Same dtype out as in."""
    if shift == 0:
        return images
    h, w = images.shape[-2:]
    if not 0 < shift < min(h, w):
        raise CifarbenchError(f"a shift of {shift} pixels does not fit {h}x{w} images")
    mode = {"reflect": "reflect", "zero": "constant"}[fill]
    padded = F.pad(images.float(), (shift, 0, shift, 0), mode=mode)
    return padded[..., :h, :w].to(images.dtype)


@dataclass
class TranslationResult:
    """Accuracy at each shift (right and down, in pixels) and on horizontally mirrored images."""

    shifts: list[int]
    accuracy: list[float]
    flip_accuracy: float | None
    fill: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def translation_accuracy(model: nn.Module, split: LabelledImages, *, mean: Sequence[float], std: Sequence[float],
                         shifts: Iterable[int] = range(0, 5), flip: bool = True, fill: Fill = "reflect",
                         batch_size: int = 1000, autocast_dtype: torch.dtype | None = None,
                         channels_last: bool = False) -> TranslationResult:
    """Test accuracy with every image shifted by each of `shifts` pixels right and down (see `shift_images`
    for `fill`), and, with `flip`, on horizontally mirrored images. A convolutional net shares its weights
    across positions and should degrade slowly; a fully connected net sees different pixels at each input."""
    if fill not in ("reflect", "zero"):
        raise CifarbenchError(f"translation fill must be 'reflect' or 'zero', not {fill!r}")
    norm = Normaliser(mean, std, batch_size, autocast_dtype, channels_last)
    shifts = [int(s) for s in shifts]
    accuracy = [accuracy_under(model, split, norm, lambda x, _, s=s: shift_images(x, s, fill)) for s in shifts]
    flipped = accuracy_under(model, split, norm, lambda x, _: x.flip(-1)) if flip else None
    return TranslationResult(shifts, accuracy, flipped, fill, len(split.labels))


# --- CIFAR-10-C style corruptions ----------------------------------------------------------------------------

# Hendrycks & Dietterich (ICLR 2019), make_cifar_c.py: the parameter at severities 1..5 for 32x32 images.
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std, on pixels scaled to [0, 1]
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on each image's deviation from its channel means
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality (Pillow)
}


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float (N, C, H, W), truncated at 4 sigma, edges replicated (skimage's
    defaults, which CIFAR-10-C used)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through a Pillow JPEG encode and decode at `quality`."""
    from PIL import Image

    array = images.cpu().numpy()
    out = np.empty_like(array)
    for i, image in enumerate(array):
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buf).convert(pil.mode))
        out[i] = decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)
    return torch.from_numpy(out).to(images.device)


def _noise_generator(seed: int, kind: str, severity: int, start: int) -> torch.Generator:
    """A generator for one chunk: the noise depends on the seed, the corruption, the severity and the chunk's
    first image, not on what ran before."""
    key = zlib.crc32(f"{seed}/{kind}/{severity}/{start}".encode())
    return torch.Generator().manual_seed(key)


def corrupt_images(images: torch.Tensor, kind: str, severity: int, *, seed: int = 0, start: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W) images with corruption `kind` at `severity` (1-5; 0 returns them unchanged), as uint8.

    Random corruptions draw from a generator seeded by (`seed`, `kind`, `severity`, `start`), so a batch is
    the same whenever it is corrupted (`start` is the index of its first image in the split)."""
    if kind not in CORRUPTIONS:
        raise CifarbenchError(f"unknown corruption {kind!r}; choose from: {', '.join(CORRUPTIONS)}")
    levels = CORRUPTIONS[kind]
    if not 0 <= severity <= len(levels):
        raise CifarbenchError(f"corruption severity must be 0 to {len(levels)}, not {severity}")
    if severity == 0:
        return images
    c = levels[severity - 1]
    if kind == "jpeg":
        return _jpeg(images, int(c))
    x = images.float() / 255.0
    if kind == "gaussian_noise":
        # Drawn on the CPU so that a seed gives the same noise on every device.
        noise = torch.randn(x.shape, generator=_noise_generator(seed, kind, severity, start))
        x = x + c * noise.to(x.device)
    elif kind == "gaussian_blur":
        x = _gaussian_blur(x, c)
    elif kind == "contrast":
        means = x.mean(dim=(2, 3), keepdim=True)
        x = (x - means) * c + means
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


# Images are corrupted in chunks of this many, whatever batch a model is scored in, so the noise an image gets
# depends only on its index (and the seed), never on the evaluation batch size or the device.
CORRUPT_CHUNK = 1000


def corrupt_split(images: torch.Tensor, kind: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """`corrupt_images` over a whole split, chunk by chunk (see CORRUPT_CHUNK)."""
    if len(images) == 0:
        return corrupt_images(images, kind, severity, seed=seed)
    return torch.cat([corrupt_images(images[i:i + CORRUPT_CHUNK], kind, severity, seed=seed, start=i)
                      for i in range(0, len(images), CORRUPT_CHUNK)])


class CorruptedCopies:
    """The corrupted copies of one split's images, each made once: runs scored on the same test images share them
    (making them, JPEG above all, costs more than scoring a small model). Holds every copy asked for, in CPU
    memory whatever the device: 30 MB each for CIFAR-10's test set (360 MB for the 4 kinds at 3 severities)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self._made: dict[tuple[str, int, int], torch.Tensor] = {}

    def made_from(self, images: torch.Tensor) -> bool:
        """Whether these are copies of `images` (compared pixel by pixel: cheap beside corrupting them)."""
        return (images.shape == self.images.shape and images.device == self.images.device
                and torch.equal(images, self.images))

    def get(self, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
        key = (kind, int(severity), int(seed))
        if key not in self._made:
            self._made[key] = corrupt_split(self.images, kind, int(severity), seed=seed).cpu()
        return self._made[key]


@dataclass
class CorruptionResult:
    """Accuracy on clean images and at each severity of each corruption."""

    clean_accuracy: float
    severities: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    """accuracy[kind][i] at severities[i]."""
    seed: int = 0
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corruption_accuracy(model: nn.Module, split: LabelledImages, *, mean: Sequence[float], std: Sequence[float],
                        kinds: Sequence[str] = tuple(CORRUPTIONS), severities: Sequence[int] = (1, 2, 3, 4, 5),
                        seed: int = 0, batch_size: int = 1000, autocast_dtype: torch.dtype | None = None,
                        channels_last: bool = False, copies: CorruptedCopies | None = None) -> CorruptionResult:
    """Test accuracy under CIFAR-10-C style corruptions generated from the uint8 test images (Hendrycks &
    Dietterich's parameters, see CORRUPTIONS); deterministic given `seed`. `copies` (of `split.images`) keeps the
    corrupted images for the next model; without it each copy is made, used and dropped."""
    for kind in kinds:
        corrupt_images(split.images[:0], kind, 0)  # a bad name fails before any evaluation
    if copies is not None and not copies.made_from(split.images):
        raise ValueError("copies must be made from this split's images")
    norm = Normaliser(mean, std, batch_size, autocast_dtype, channels_last)
    clean = accuracy_under(model, split, norm)
    result = CorruptionResult(clean, [int(s) for s in severities], seed=seed, n=len(split.labels))
    for kind in kinds:
        result.accuracy[kind] = []
        for s in severities:
            made = (copies.get(kind, s, seed) if copies is not None
                    else corrupt_split(split.images, kind, int(s), seed=seed))
            result.accuracy[kind].append(
                accuracy_under(model, split, norm, lambda x, start, m=made: m[start:start + len(x)].to(x.device)))
    return result


# --- Pixel permutation ------------------------------------------------------------------------------------


