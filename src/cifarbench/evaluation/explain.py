"""One trained model explained: the figures that fit its architecture, its robustness experiments and the
per-example correctness that McNemar's test needs, gathered for the `explain` command and the HTML report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarbench.data.loader import DeviceSplit
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation import interpret
from cifarbench.evaluation.experiments import (
    CORRUPTIONS,
    CorruptionResult,
    TranslationResult,
    corruption_accuracy,
    translation_accuracy,
)


@dataclass
class ExplainFigure:
    heading: str
    caption: str
    figure: Any
    """A matplotlib Figure (reporting.plots.png_bytes / save_figure turn it into a PNG)."""
    key: str = "figure"
    """A short file-name stem: templates, filters, feature-maps, saliency."""


@dataclass(kw_only=True)
class ModelExplanation:
    label: str
    correct: np.ndarray
    """Per test example, in test-set order: whether the model's prediction was right (for mcnemar_exact)."""
    figures: list[ExplainFigure] = field(default_factory=list)
    translation: TranslationResult | None = None
    corruption: CorruptionResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.correct.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The numbers (not the figures), for JSON."""
        return {"label": self.label, "accuracy": self.accuracy, "n": int(self.correct.size),
                "translation": self.translation.to_dict() if self.translation else None,
                "corruption": self.corruption.to_dict() if self.corruption else None, "notes": list(self.notes)}


@torch.no_grad()
def predictions(model: nn.Module, test: DeviceSplit, *, batch_size: int = 1000,
                autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """The predicted class of every test example, in order (plain view, no test-time augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, _ in test.batches(batch_size):
            with torch.autocast(test.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out.append(model(x).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def explain_model(model: nn.Module, test: DeviceSplit, *, label: str, classes: Sequence[str],
                  in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], batch_size: int = 1000,
                  autocast_dtype: torch.dtype | None = None, examples: int = 4, seed: int = 0,
                  experiments: bool = True, shifts: Iterable[int] = range(5),
                  kinds: Sequence[str] = tuple(CORRUPTIONS),
                  severities: Sequence[int] = (1, 2, 3, 4, 5)) -> ModelExplanation:
    """Figures that fit `model` (FNN class templates, or first-layer filters and feature maps for a conv net;
    saliency for `examples` right and `examples` wrong predictions when Captum is installed) and, with
    `experiments`, its accuracy under translation and corruptions. `mean`/`std` are the run's normalisation."""
    predicted = predictions(model, test, batch_size=batch_size, autocast_dtype=autocast_dtype)
    labels = test.labels.cpu().numpy()
    result = ModelExplanation(label=label, correct=predicted == labels)
    probe = torch.zeros(1, *in_shape, device=test.device)
    layers = interpret.modules_in_forward_order(interpret.fp32_model(model), probe)
    chosen = interpret.pick_examples(labels, predicted, right=examples, wrong=examples, seed=seed)
    idx = torch.as_tensor(chosen, dtype=torch.int64, device=test.device)
    images = test.normalise(test.images[idx])
    display = test.images[idx].cpu().numpy()
    first = layers[0][1] if layers else None
    pixels = int(np.prod(in_shape))
    if isinstance(first, nn.Linear) and first.in_features == pixels:
        result.figures.append(ExplainFigure(
            f"{label}: what the weights look for",
            "Each class's template: the product of the fully connected layers' weights, drawn as an image "
            "(ReLUs and biases left out). One fixed template per class, tied to pixel positions.",
            interpret.fnn_templates(model, in_shape, classes), "templates"))
    elif not any(isinstance(m, nn.Conv2d) for _, m in layers):
        # A model of its own kind (a Linear on rows, a bare Parameter): the figures that need one layer type are
        # left out, saliency still shows what it looks at.
        what = (f"its first layer {layers[0][0]!r} takes {first.in_features} values, not the {pixels} pixels"
                if isinstance(first, nn.Linear) else "it has no Linear or Conv2d layer to draw")
        result.notes.append(f"{label}: no weight templates or filters ({what})")
    if any(isinstance(m, nn.Conv2d) for _, m in layers):
        result.figures.append(ExplainFigure(
            f"{label}: first-layer filters",
            "The first convolution's filters: small patterns matched at every position of the image.",
            interpret.first_layer_filters(model, in_shape=in_shape), "filters"))
        result.figures.append(ExplainFigure(
            f"{label}: feature maps",
            "Activations after each convolution for two test images: where each filter responded.",
            interpret.feature_maps(model, images[:2], display=display[:2]), "feature-maps"))
    if len(chosen):
        try:
            result.figures.append(ExplainFigure(
                f"{label}: saliency",
                "Right and wrong test predictions with the pixels the predicted class's score is most sensitive "
                "to (and, for a conv net, Grad-CAM of its last convolution).",
                interpret.saliency_maps(model, images, labels[chosen].tolist(), predicted[chosen].tolist(), classes,
                                        display=display), "saliency"))
        except CifarbenchError as exc:
            if str(exc) != interpret.CAPTUM_MISSING:
                raise
            result.notes.append(f"{label}: no saliency maps ({exc})")
    if experiments:
        common = dict(mean=mean, std=std, batch_size=batch_size, autocast_dtype=autocast_dtype,
                      channels_last=test.channels_last)
        result.translation = translation_accuracy(model, test, shifts=shifts, **common)
        result.corruption = corruption_accuracy(model, test, kinds=kinds, severities=severities, seed=seed, **common)
    return result
