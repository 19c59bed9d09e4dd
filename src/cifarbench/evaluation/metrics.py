"""Whole-test-set evaluation: accuracy, mean loss, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast


@dataclass(kw_only=True)
class EvalResult:
    accuracy: float
    """Fraction of examples classified correctly, in [0, 1]."""
    loss: float
    """Mean cross-entropy over every example (not the last batch's, as the notebook printed)."""
    per_class_accuracy: list[float]
    confusion: list[list[int]]
    """confusion[true][predicted] counts."""
    n: int
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Per-example softmax probabilities (N, classes) in split order, when asked for (`keep_probabilities`)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "probabilities"}

    @classmethod
    def from_counts(cls, confusion: torch.Tensor, loss_sum: float) -> EvalResult:
        """The metrics of a (classes x classes) confusion matrix and the summed loss over its examples."""
        matrix = confusion.cpu()
        n = int(matrix.sum())
        per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1).double()).tolist()
        return cls(accuracy=float(matrix.diag().sum()) / max(n, 1), loss=loss_sum / max(n, 1),
                   per_class_accuracy=per_class, confusion=matrix.tolist(), n=n)


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums over many batches; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


TTA_VIEWS = {0: 1, 1: 2, 2: 6}  # forward passes per image at each test-time augmentation level


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Each row's top-class probability: what selective TTA compares with its threshold."""
    return torch.softmax(logits.float(), dim=1).amax(dim=1)


def predict_logits(model: nn.Module, x: torch.Tensor, tta: int = 0, threshold: float = 0.0) -> torch.Tensor:
    """Logits for a batch; with TTA, the average over mirrored (1) and also 1-pixel translated (2) views.

    With `threshold` > 0 (selective TTA, after the 2025 CIFAR-10 speedrun record) an image whose plain view
    already gives its top class a probability of at least `threshold` keeps the plain logits, and only the
    others pay for the extra views. Each image's result depends on that image alone.
    """
    plain = model(x)
    if tta == 0:
        return plain
    if threshold <= 0:
        return _tta_logits(model, x, tta, plain)
    unsure = confidence(plain) < threshold
    if not unsure.any():
        return plain
    x_unsure = x[unsure]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x_unsure = x_unsure.contiguous(memory_format=torch.channels_last)
    logits = plain.clone()
    logits[unsure] = _tta_logits(model, x_unsure, tta, plain[unsure]).to(logits.dtype)
    return logits


def _tta_logits(model: nn.Module, x: torch.Tensor, tta: int, plain: torch.Tensor) -> torch.Tensor:
    """The TTA average for a batch whose plain-view logits are `plain`."""
    logits = 0.5 * (plain + model(x.flip(-1)))
    if tta == 1:
        return logits
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]  # up-left and down-right
    translated = sum(0.5 * (model(v) + model(v.flip(-1))) for v in shifted) / len(shifted)
    return 0.5 * logits + 0.5 * translated


def batch_logits(model: nn.Module, data: DeviceSplit, *, batch_size: int = 1000,
                 autocast_dtype: torch.dtype | None = None, tta: int = 0,
                 tta_threshold: float = 0.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) for every batch of `data`, in order, with the model in eval mode and no gradients: the
    one evaluation loop behind `evaluate` and per-example predictions."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in data.batches(batch_size):
                with autocast(data.device, autocast_dtype):
                    logits = predict_logits(model, x, tta, tta_threshold)
                yield logits.float(), y
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: DeviceSplit, *, num_classes: int, batch_size: int = 1000,
             autocast_dtype: torch.dtype | None = None, tta: int = 0, tta_threshold: float = 0.0,
             keep_probabilities: bool = False) -> EvalResult:
    """Evaluate `model` on every example of `data` exactly once (with `tta` views of each; with selective TTA,
    `tta_threshold` > 0, of the images the plain view is unsure of); `keep_probabilities` also returns each
    example's class probabilities."""
    loss_sum = torch.zeros((), dtype=sum_dtype(data.device), device=data.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=data.device)
    kept = []
    for logits, y in batch_logits(model, data, batch_size=batch_size, autocast_dtype=autocast_dtype, tta=tta,
                                  tta_threshold=tta_threshold):
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        if keep_probabilities:
            kept.append(torch.softmax(logits, dim=1).cpu())
    # One transfer at the end: each .item() inside the loop would be a device sync.
    result = EvalResult.from_counts(confusion.view(num_classes, num_classes), float(loss_sum))
    if keep_probabilities:
        result.probabilities = (torch.cat(kept) if kept else torch.zeros(0, num_classes)).numpy()
    return result
