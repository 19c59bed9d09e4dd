"""PNG figures (matplotlib's object API: no pyplot global state, no display needed).

Each figure has a builder (`*_figure`, returns a matplotlib Figure) so the HTML report can embed it without
touching the disk; `save_figure` / the `plot_*` helpers write a PNG atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cifarbench.fsutil import atomic_write


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported on use: matplotlib is slow to import

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG atomically (a uniquely named temp file, fsync, rename)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))



def png_bytes(fig) -> bytes:
    """`fig` encoded as PNG, in memory."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W, 3), grey images repeated over the three channels."""
    hwc = np.moveaxis(np.asarray(image), 0, -1)
    return np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc[..., :3]


def _curve_stats(seeds: Sequence[Sequence[Mapping]]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per evaluated epoch over the seeds: epochs, mean seconds, and mean/min/max test accuracy (%)."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for history in seeds:
        for h in history:
            if h.get("test_accuracy") is not None:
                by_epoch.setdefault(int(h["epoch"]), []).append((float(h["seconds"]), 100 * float(h["test_accuracy"])))
    epochs = sorted(by_epoch)
    secs = np.array([np.mean([s for s, _ in by_epoch[e]]) for e in epochs])
    acc = [np.array([a for _, a in by_epoch[e]]) for e in epochs]
    return (epochs, secs, np.array([a.mean() for a in acc]), np.array([a.min() for a in acc]),
            np.array([a.max() for a in acc]))


def learning_curves_figure(histories: Mapping[str, Sequence[Sequence[Mapping]]], *, target: float | None = None):
    """Test accuracy per epoch and per training second, one colour per model.

    With several seeds: the mean over seeds as a line and the min-max range as a band (x per second is
    the seeds' mean cumulative training time at that epoch). One seed: just its line.
    """
    fig = _figure(11, 4.2)
    by_epoch, by_time = fig.subplots(1, 2)
    for i, (model, seeds) in enumerate(histories.items()):
        color = f"C{i}"
        epochs, secs, mean, low, high = _curve_stats(seeds)
        if not epochs:
            continue
        label = model if len(seeds) == 1 else f"{model} (mean of {len(seeds)} seeds, band = min-max)"
        for ax, x in ((by_epoch, epochs), (by_time, secs)):
            ax.plot(x, mean, marker="o", ms=3, color=color, label=label)
            if len(seeds) > 1:
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy per epoch")
    by_epoch.xaxis.get_major_locator().set_params(integer=True)
    by_time.set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy (%)",
                title="Test accuracy per second")
    for ax in (by_epoch, by_time):
        if target is not None:
            ax.axhline(100 * target, color="0.4", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_learning_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike, *,
                         target: float | None = None) -> Path:
    """Write `learning_curves_figure` as a PNG."""
    return save_figure(learning_curves_figure(histories, target=target), path)


def confusion_figure(confusions: Mapping[str, np.ndarray], classes: Sequence[str],
                     seeds: Mapping[str, int] | None = None):
    """One confusion matrix per model (rows: true class, columns: predicted), coloured by row fraction;
    `seeds[model]` > 1 says the matrix pools (sums) that many runs."""
    n = len(confusions)
    k = len(classes)
    fig = _figure(max(4.6, 4.6 * n), 4.6)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    short = [c[:8] for c in classes]
    for ax, (model, matrix) in zip(axes, confusions.items()):
        matrix = np.asarray(matrix)
        rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(int(matrix[t, p])), ha="center", va="center", fontsize=6,
                        color="white" if rows[t, p] > 0.5 else "black")
        accuracy = 100 * np.trace(matrix) / max(matrix.sum(), 1)
        pooled = (seeds or {}).get(model, 1)
        ax.set_title(f"{model}: {accuracy:.2f}% of {int(matrix.sum())}" + (f" ({pooled} seeds pooled)" if pooled > 1 else ""),
                     fontsize=10)
        ax.set_xticks(range(k), short, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return fig


def per_class_figure(per_class: Mapping[str, Sequence[Sequence[float]]], classes: Sequence[str]):
    """Per-class test accuracy, the models' bars side by side (mean over seeds; whiskers: min-max)."""
    fig = _figure(max(8.0, 0.9 * len(classes) * max(1, len(per_class)) / 1.5), 4.0)
    ax = fig.subplots()
    width = 0.8 / max(len(per_class), 1)
    x = np.arange(len(classes))
    for i, (model, seeds) in enumerate(per_class.items()):
        acc = 100 * np.asarray(seeds, dtype=float).reshape(-1, len(classes))
        mean = acc.mean(0)
        err = np.vstack([mean - acc.min(0), acc.max(0) - mean]) if len(acc) > 1 else None
        ax.bar(x + (i - (len(per_class) - 1) / 2) * width, mean, width, yerr=err, capsize=2, color=f"C{i}",
               error_kw={"ecolor": "0.35", "elinewidth": 0.8},
               label=model if len(acc) == 1 else f"{model} ({len(acc)} seeds)")
    ax.set_xticks(x, list(classes), rotation=30, ha="right")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="Per-class test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def mistakes_figure(galleries: Mapping[str, Sequence[Mapping[str, Any]]], images: np.ndarray,
                    classes: Sequence[str]):
    """A row per model of its most confidently wrong test images, captioned true / predicted (confidence)."""
    cols = max([len(g) for g in galleries.values()] + [1])
    fig = _figure(1.25 * cols + 0.8, 1.6 * max(len(galleries), 1))
    axes = fig.subplots(max(len(galleries), 1), cols, squeeze=False)
    for row, (model, mistakes) in zip(axes, galleries.items()):
        row[0].set_ylabel(model, fontsize=10)
        for ax, m in zip(row, mistakes):
            image = _to_rgb(images[m["index"]])
            ax.imshow(image, interpolation="nearest")
            ax.set_title(f"true {classes[m['true']][:11]}\npred {classes[m['predicted']][:11]} "
                         f"{100 * m['confidence']:.0f}%", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(mistakes):]:
            ax.set_frame_on(False)
        if not mistakes:
            row[0].text(0.05, 0.5, "no mistakes", transform=row[0].transAxes, fontsize=9, va="center")
    fig.suptitle("Most confidently wrong test images", fontsize=11)
    return fig


def class_grid_figure(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, per_class: int = 10,
                      seed: int = 0):
    """A row per class of `per_class` random examples, labelled with the class name (the notebook's grids)."""
    rng = np.random.default_rng(seed)
    # aspect="auto" with a figure shaped to the content: with imshow's fixed aspect, the layout engine can
    # trade the label margin away when the rows are tight, cutting off long class names.
    fig = _figure(1.8 + 0.85 * per_class, 0.95 * len(classes))
    axes = fig.subplots(len(classes), 1, squeeze=False)[:, 0]
    for k, (ax, name) in enumerate(zip(axes, classes)):
        idx = np.flatnonzero(labels == k)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        row = np.full((images.shape[2], max(per_class, 1) * images.shape[3], 3), 255, dtype=np.uint8)
        for j, i in enumerate(chosen):
            row[:, j * images.shape[3]:(j + 1) * images.shape[3]] = _to_rgb(images[i])
        ax.imshow(row, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        # A tick label, not a y-label: the layout engine sizes the margin for right-aligned tick labels correctly.
        ax.set_yticks([images.shape[2] / 2 - 0.5], [f"{name} ({len(idx)})"], fontsize=10)
        ax.tick_params(axis="y", length=0)
    return fig


def plot_class_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                    per_class: int = 10, seed: int = 0) -> Path:
    """Write `class_grid_figure` as a PNG."""
    return save_figure(class_grid_figure(images, labels, classes, per_class=per_class, seed=seed), path)
