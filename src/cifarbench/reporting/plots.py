"""PNG figures (matplotlib's object API: no pyplot global state, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported on use: matplotlib is slow to import

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_learning_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike) -> Path:
    """Test accuracy per epoch and per training second, one colour per model, one line per seed."""
    fig = _figure(11, 4.2)
    by_epoch, by_time = fig.subplots(1, 2)
    for i, (model, seeds) in enumerate(histories.items()):
        color = f"C{i}"
        for j, history in enumerate(seeds):
            epochs = [h["epoch"] for h in history]
            acc = [100 * h["test_accuracy"] for h in history]
            secs = [h["seconds"] for h in history]
            label = model if j == 0 else None
            by_epoch.plot(epochs, acc, marker="o", ms=3, color=color, alpha=0.85, label=label)
            by_time.plot(secs, acc, marker="o", ms=3, color=color, alpha=0.85, label=label)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy per epoch")
    by_time.set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy (%)",
                title="Test accuracy per second")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_class_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                    per_class: int = 10, seed: int = 0) -> Path:
    """A row per class of `per_class` random examples, labelled with the class name (the notebook's grids)."""
    rng = np.random.default_rng(seed)
    fig = _figure(1.0 + 0.9 * per_class, 0.95 * len(classes))
    axes = fig.subplots(len(classes), 1, squeeze=False)[:, 0]
    for k, (ax, name) in enumerate(zip(axes, classes)):
        idx = np.flatnonzero(labels == k)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        row = np.full((images.shape[2], max(per_class, 1) * images.shape[3], 3), 255, dtype=np.uint8)
        for j, i in enumerate(chosen):
            row[:, j * images.shape[3]:(j + 1) * images.shape[3]] = np.moveaxis(images[i], 0, -1)[..., :3]
        ax.imshow(row, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{name} ({len(idx)})", rotation=0, ha="right", va="center", fontsize=10)
    return _save(fig, path)
