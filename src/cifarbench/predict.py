"""Classify image files with a trained model: decode safely, resize to the model's input, normalise as in training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cifarbench.data.dataset import Split
from cifarbench.data.images import open_image
from cifarbench.data.loader import DeviceSplit


def prepare_image(image: Image.Image, in_shape: Sequence[int]) -> np.ndarray:
    """An RGB or grey PIL image -> uint8 (C, H, W) at the model's input size.

    The whole image is resized (no crop), with Lanczos filtering so that large photos are averaged down
    rather than aliased; CIFAR's own images are whole objects in a square frame too.
    """
    channels, height, width = in_shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


@torch.no_grad()
def classify_files(model: nn.Module, paths: Sequence[str | os.PathLike], *, in_shape: Sequence[int],
                   mean: Sequence[float], std: Sequence[float], classes: Sequence[str], device: torch.device,
                   channels_last: bool = False, top: int = 3, tta: int = 0,
                   tta_threshold: float = 0.0) -> list[dict[str, Any]]:
    """The `top` classes with their probabilities for each file, in the order given.

    Every file is opened (and refused, with a one-line error) before any is classified. `tta` is the test-time
    augmentation the model was evaluated with, and `tta_threshold` its selective-TTA threshold (see
    evaluation.metrics.predict_logits).
    """
    from cifarbench.evaluation.metrics import predict_logits

    images = np.stack([prepare_image(open_image(p), in_shape) for p in paths])
    # The training pipeline's own normalisation, so a file sees exactly what a test image saw.
    data = DeviceSplit(Split(images, np.zeros(len(images), dtype=np.int64)), device, mean, std, channels_last)
    model.eval()
    probs = torch.cat([torch.softmax(predict_logits(model, x, tta, tta_threshold).float(), dim=1)
                       for x, _ in data.batches(256)]).cpu()
    k = min(top, len(classes))
    values, indices = probs.topk(k, dim=1)
    return [{"image": str(path), "top": [{"class": classes[int(i)], "index": int(i), "probability": float(v)}
                                         for v, i in zip(vals, idx, strict=True)]}
            for path, vals, idx in zip(paths, values, indices, strict=True)]
