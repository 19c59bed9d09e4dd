"""PNG figures (matplotlib's object API: no pyplot global state, no display needed).

Each figure has a builder (`*_figure`, returns a matplotlib Figure) so the HTML report can embed it without
touching the disk; `save_figure` / the `plot_*` helpers write a PNG atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def _whiskers(mean: np.ndarray, per_seed: np.ndarray) -> np.ndarray:
    """Min-max error bars around `mean` (rows of `per_seed` are seeds), for matplotlib's yerr. Clipped at 0: with
    equal values the rounding of the mean can put it a hair outside the range, and matplotlib refuses a
    negative bar."""
    return np.clip(np.vstack([mean - per_seed.min(0), per_seed.max(0) - mean]), 0.0, None)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W, 3), grey images repeated over the three channels."""
    hwc = np.moveaxis(np.asarray(image), 0, -1)
    return np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc[..., :3]


def _curve_stats(seeds: Sequence[Sequence[Mapping]], key: str = "test_accuracy"
                 ) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per evaluated epoch over the seeds: epochs, mean seconds, and mean/min/max of `key` (an accuracy, %)."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for history in seeds:
        for h in history:
            if h.get(key) is not None:
                by_epoch.setdefault(int(h["epoch"]), []).append((float(h["seconds"]), 100 * float(h[key])))
    epochs = sorted(by_epoch)
    secs = np.array([np.mean([s for s, _ in by_epoch[e]]) for e in epochs])
    acc = [np.array([a for _, a in by_epoch[e]]) for e in epochs]
    return (epochs, secs, np.array([a.mean() for a in acc]), np.array([a.min() for a in acc]),
            np.array([a.max() for a in acc]))


def learning_curves_figure(histories: Mapping[str, Sequence[Sequence[Mapping]]], *, target: float | None = None):
    """Test accuracy per epoch and per training second, one colour per model; runs with a validation split
    (`--val-split`) add their validation accuracy as a dashed line.

    With several seeds: the mean over seeds as a line and the min-max range as a band (x per second is
    the seeds' mean cumulative training time at that epoch). One seed: just its line.
    """
    fig = _figure(11, 4.2)
    by_epoch, by_time = fig.subplots(1, 2)
    validation = False
    for i, (model, seeds) in enumerate(histories.items()):
        color = f"C{i}"
        for key, style, name in (("test_accuracy", "-", ""), ("val_accuracy", "--", " validation")):
            epochs, secs, mean, low, high = _curve_stats(seeds, key)
            if not epochs:
                continue
            validation |= key == "val_accuracy"
            label = (f"{model}{name}" if len(seeds) == 1
                     else f"{model}{name} (mean of {len(seeds)} seeds, band = min-max)")
            for ax, x in ((by_epoch, epochs), (by_time, secs)):
                ax.plot(x, mean, style, marker="o", ms=_marker_size(epochs), color=color, label=label)
                if len(seeds) > 1:
                    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    what = "Test and validation accuracy" if validation else "Test accuracy"
    by_epoch.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{what} per epoch")
    _epoch_axis(by_epoch)
    by_time.set(xlabel="training seconds (evaluation excluded)", ylabel="accuracy (%)",
                title=f"{what} per second")
    for ax in (by_epoch, by_time):
        if target is not None:
            ax.axhline(100 * target, color="0.4", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _marker_size(epochs: Sequence[int], size: float = 3) -> float:
    """A curve's marker size: a run of one epoch is a single point, drawn large enough to be seen."""
    return size if len(epochs) > 1 else 8


def _epoch_axis(ax) -> None:
    """Whole epochs on the x axis; a single epoch gets a unit-wide axis around it, not fractions of one."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    lines = [line.get_xdata() for line in ax.get_lines() if len(line.get_xdata())]
    epochs = {float(x) for xs in lines for x in xs}
    if len(epochs) == 1:
        (epoch,) = epochs
        ax.set_xlim(epoch - 1, epoch + 1)
        ax.set_xticks([epoch])


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
    for ax, (model, matrix) in zip(axes, confusions.items(), strict=True):
        matrix = np.asarray(matrix)
        rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(int(matrix[t, p])), ha="center", va="center", fontsize=6,
                        color="white" if rows[t, p] > 0.5 else "black")
        accuracy = 100 * np.trace(matrix) / max(matrix.sum(), 1)
        pooled = (seeds or {}).get(model, 1)
        note = f" ({pooled} seeds pooled)" if pooled > 1 else ""
        ax.set_title(f"{model}: {accuracy:.2f}% of {int(matrix.sum())}{note}", fontsize=10)
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
        err = _whiskers(mean, acc) if len(acc) > 1 else None
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
    for row, (model, mistakes) in zip(axes, galleries.items(), strict=False):  # one empty row for none
        row[0].set_ylabel(model, fontsize=10)
        for ax, m in zip(row, mistakes, strict=False):  # a model may have fewer mistakes than columns
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
    for k, (ax, name) in enumerate(zip(axes, classes, strict=True)):
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


def _field_stats(seeds: Sequence[Sequence[Mapping]], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch over the seeds that recorded `key`: epochs, and the mean, min and max of its values."""
    by_epoch: dict[int, list[float]] = {}
    for history in seeds:
        for h in history:
            if h.get(key) is not None:
                by_epoch.setdefault(int(h["epoch"]), []).append(float(h[key]))
    epochs = sorted(by_epoch)
    values = [np.array(by_epoch[e]) for e in epochs]
    return (epochs, np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
            np.array([v.max() for v in values]))


def loss_curves_figure(histories: Mapping[str, Sequence[Sequence[Mapping]]]):
    """Training loss (solid) and test (dashed) and validation (dotted) loss per epoch, one colour per model:
    the mean over seeds as a line, the min-max range as a band. A widening gap between a model's training
    and test loss is overfitting; a training loss still falling steeply at the end is under-training."""
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    styles = (("train_loss", "-", "train"), ("test_loss", "--", "test"), ("val_loss", ":", "validation"))
    for i, (model, seeds) in enumerate(histories.items()):
        for key, style, name in styles:
            epochs, mean, low, high = _field_stats(seeds, key)
            if not epochs:
                continue
            ax.plot(epochs, mean, style, marker="o", ms=_marker_size(epochs, 2.5), color=f"C{i}",
                    label=f"{model} {name}")
            if len(seeds) > 1:
                ax.fill_between(epochs, low, high, color=f"C{i}", alpha=0.15, linewidth=0)
    seeds_note = any(len(s) > 1 for s in histories.values())
    ax.set(xlabel="epoch", ylabel="cross-entropy loss",
           title="Loss per epoch" + (" (mean over seeds, band = min-max)" if seeds_note else ""))
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    return fig


def _as_dict(result: Any) -> Mapping[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else result


def _seed_band(ax, x: Sequence[float], per_seed: np.ndarray, color: str, label: str, **style) -> None:
    """Mean over the rows (seeds) as a line with markers; with several seeds, min-max error bars."""
    mean = per_seed.mean(0)
    if len(per_seed) > 1:
        err = _whiskers(mean, per_seed)
        ax.errorbar(x, mean, yerr=err, color=color, capsize=2, marker="o", ms=3, label=label, **style)
    else:
        ax.plot(x, mean, color=color, marker="o", ms=3, label=label, **style)


def robustness_figure(results_by_model: Mapping[str, Sequence[Mapping[str, Any]]]):
    """Accuracy against the size of a change to the test images, one colour per model.

    `results_by_model[model]` has one entry per seed: {"translation": TranslationResult (or its dict),
    "corruption": CorruptionResult (or its dict)}, either optional. Panels: accuracy vs shift in pixels
    (mirrored images at "flip"), then accuracy vs severity for each corruption (0 = clean). Lines are the
    mean over seeds, whiskers the min-max range.
    """
    kinds: list[str] = []
    has_translation = False
    for seeds in results_by_model.values():
        for entry in seeds:
            has_translation |= entry.get("translation") is not None
            for kind in _as_dict(entry.get("corruption") or {}).get("accuracy", {}):
                if kind not in kinds:
                    kinds.append(kind)
    panels = (["translation"] if has_translation else []) + kinds
    fig = _figure(3.4 * max(len(panels), 1) + 0.4, 3.6)
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1), squeeze=False)[0])
    for i, (model, seeds) in enumerate(results_by_model.items()):
        color = f"C{i}"
        label = model if len(seeds) == 1 else f"{model} ({len(seeds)} seeds)"
        translations = [_as_dict(e["translation"]) for e in seeds if e.get("translation") is not None]
        if translations:
            ax = axes[panels.index("translation")]
            shifts = translations[0]["shifts"]
            _seed_band(ax, shifts, 100 * np.array([t["accuracy"] for t in translations]), color, label)
            flips = [t["flip_accuracy"] for t in translations if t.get("flip_accuracy") is not None]
            if flips:
                _seed_band(ax, [max(shifts) + 1.5], 100 * np.array(flips)[:, None], color, "_", linestyle="none")
                ax.set_xticks([*shifts, max(shifts) + 1.5], [*map(str, shifts), "flip"])
            ax.set(xlabel=f"shift right and down (pixels, {translations[0]['fill']} fill)", ylabel="test accuracy (%)",
                   title="Translation")
        corruptions = [_as_dict(e["corruption"]) for e in seeds if e.get("corruption") is not None]
        for kind in kinds:
            rows = [c for c in corruptions if kind in c["accuracy"]]
            if not rows:
                continue
            ax = axes[panels.index(kind)]
            x = [0, *rows[0]["severities"]]
            values = 100 * np.array([[c["clean_accuracy"], *c["accuracy"][kind]] for c in rows])
            _seed_band(ax, x, values, color, label)
            ax.set(xlabel="severity (0 = clean)", ylabel="test accuracy (%)", title=kind.replace("_", " "))
            ax.set_xticks(x)
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    return fig


def capacity_figure(rows: Sequence[Mapping[str, Any]]):
    """Test accuracy against parameters and against FLOPs per image (log x), a point per model with its
    seed spread as a whisker; `rows` are comparison rows (model, params, flops_per_image,
    test_accuracy_mean, test_accuracy_std)."""
    fig = _figure(10, 4.0)
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in ((axes[0], "params", "trainable parameters"),
                            (axes[1], "flops_per_image", "FLOPs per image (forward)")):
        for i, row in enumerate(rows):
            if not row.get(key) or row.get("test_accuracy_mean") is None:  # 0 (a bare matmul's FLOPs) has no log
                continue
            mean = 100 * row["test_accuracy_mean"]
            std = row.get("test_accuracy_std")
            ax.errorbar([row[key]], [mean], yerr=[100 * std] if std else None, color=f"C{i}", marker="o",
                        capsize=3, label=row["model"])
            ax.annotate(row["model"], (row[key], mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if ax.has_data():
            ax.set_xscale("log")
        ax.set(xlabel=f"{xlabel} (log scale)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("Accuracy against size")
    axes[1].set_title("Accuracy against compute")
    return fig


def permutation_figure(rows: Sequence[Any]):
    """Bars of each model's accuracy on plain and on permuted pixels (mean over seeds, whiskers min-max);
    `rows` are explaining.PermutationRow."""
    rows = [r for r in rows if r.plain or r.permuted]
    fig = _figure(max(4.0, 1.6 * len(rows) + 1.5), 3.2)
    ax = fig.subplots()
    for offset, key, colour in ((-0.2, "plain", "#4477aa"), (0.2, "permuted", "#ee6677")):
        for i, row in enumerate(rows):
            spread = getattr(row, key)
            if spread is None:
                continue
            whisker = _whiskers(np.array([100 * spread.mean]), np.array([[100 * spread.min], [100 * spread.max]]))
            ax.bar(i + offset, 100 * spread.mean, width=0.4, color=colour, yerr=whisker, capsize=3,
                   label=f"{key} pixels" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r.model for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="lower right")
    return fig
