"""Evidence for a comparison: cost per image and of training, time to a target accuracy, confident mistakes."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from cifarbench.models.macs import count_macs


@dataclass(frozen=True)
class ModelCost:
    params: int
    """Trainable parameters."""
    macs_per_image: int
    """Multiply-accumulates of every Conv2d and Linear layer for one image (bias adds, activations and pooling
    are not counted: they are a rounding error next to the matrix products)."""

    @property
    def flops_per_image(self) -> int:
        """The usual convention: one multiply-accumulate is two floating-point operations."""
        return 2 * self.macs_per_image

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_per_image": self.flops_per_image}


def model_cost(name: str, in_shape: Sequence[int], num_classes: int = 10,
               model_kwargs: Mapping[str, Any] | None = None) -> ModelCost:
    """Parameters and MACs of a freshly built model (the weights change neither)."""
    from cifarbench.models import build_model

    model = build_model(name, num_classes=num_classes, in_shape=tuple(in_shape), kwargs=model_kwargs)
    return cost_of(model, in_shape)


def cost_of(model: nn.Module, in_shape: Sequence[int]) -> ModelCost:
    """Parameters and MACs of `model` for one image of `in_shape`."""
    from cifarbench.models import count_parameters

    return ModelCost(params=count_parameters(model), macs_per_image=count_macs(model, in_shape))


TRAIN_FLOPS_PER_FORWARD = 3
"""A training image costs about three forward passes of matrix products: the forward pass, then the backward
pass's input gradients and weight gradients (one forward's worth each). The usual convention, and the one
airbench's PFLOP figures follow (airbench94: 0.236 GFLOP forward per image, 3x that for 50,000 images x 9.9
epochs, plus its TTA evaluation, is its 0.36 PFLOP)."""


def training_flops(model: nn.Module, in_shape: Sequence[int], images: int, low_res: int = 0,
                   low_images: int = 0) -> int:
    """Matrix-product FLOPs of training `model` on `images` images, `low_images` of them scaled down to `low_res`
    pixels (progressive resizing: the same net, built for `in_shape`, fed smaller images)."""
    full = 2 * count_macs(model, in_shape)
    low = 2 * count_macs(model, (in_shape[0], low_res, low_res)) if low_images else 0
    return TRAIN_FLOPS_PER_FORWARD * (full * (images - low_images) + low * low_images)


def time_to_target(history: Sequence[Mapping[str, Any]], target: float) -> dict[str, float] | None:
    """The first epoch whose test accuracy reached `target`, with the cumulative training seconds at its end.

    Accuracy is only measured at epoch ends, so that is the resolution: None when no epoch reached it.
    Epochs that were not evaluated (accuracy None, as in budgeted runs) are skipped.
    """
    for entry in history:
        if entry.get("test_accuracy") is not None and entry["test_accuracy"] >= target:
            return {"epoch": int(entry["epoch"]), "seconds": float(entry["seconds"])}
    return None


def summarise_time_to_target(runs: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Time to `target` for each run (seed) of one model, and the means over the runs that reached it."""
    per_seed = []
    for run in runs:
        hit = time_to_target(run["history"], target)
        per_seed.append({"seed": run["seed"], "run_id": run["run_id"], "reached": hit is not None,
                         "epoch": hit["epoch"] if hit else None, "seconds": hit["seconds"] if hit else None})
    reached = [s for s in per_seed if s["reached"]]
    return {"target": target, "per_seed": per_seed, "reached": len(reached), "seeds": len(per_seed),
            "epoch_mean": statistics.fmean(s["epoch"] for s in reached) if reached else None,
            "seconds_mean": statistics.fmean(s["seconds"] for s in reached) if reached else None}


def confident_mistakes(probabilities: np.ndarray, labels: np.ndarray, k: int = 16) -> list[dict[str, Any]]:
    """The `k` wrong predictions made with the highest probability, most confident first."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(1)
    return mistakes_by_confidence(predicted, probabilities[np.arange(len(predicted)), predicted], labels, k)


def mistakes_by_confidence(predicted: np.ndarray, confidence: np.ndarray, labels: np.ndarray,
                           k: int = 16) -> list[dict[str, Any]]:
    """`confident_mistakes` from each example's predicted class and that class's probability."""
    predicted, confidence = np.asarray(predicted), np.asarray(confidence)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    return [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "confidence": float(confidence[i])} for i in order]
