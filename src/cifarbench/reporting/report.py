"""The report view: one self-contained HTML file of runs, drawn from what it is handed (`reports.ReportContent`:
the runs, their stored per-image predictions, the pairwise statistics, the gallery); it evaluates nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifarbench.evaluation.analysis import mistakes_by_confidence
from cifarbench.reporting import html, plots
from cifarbench.reporting.tables import (
    PAIRWISE_HEADERS,
    comparison_headers,
    comparison_rows,
    experiment_table,
    pairwise_rows,
    percent,
    precision_line,
    time_to_target_cell,
)

if TYPE_CHECKING:
    from cifarbench.reports import ReportContent
    from cifarbench.runs.records import RunRecord


def render_report(content: ReportContent, out: str | os.PathLike, *, title: str | None = None,
                  gallery: int = 8) -> Path:
    """Write the HTML report of `content` to `out` (atomically) and return its path."""
    runs, groups, target = content.runs, content.groups, content.target
    notes = list(content.notes)
    curves = {label: [[h.to_dict() for h in r.history] for r in rs] for label, rs in groups.items()}
    figures = [("Learning curves", "Test accuracy after every epoch (and validation accuracy, dashed, for runs "
                "with a validation split), per epoch and per cumulative training second.",
                plots.learning_curves_figure(curves, target=target)),
               ("Loss curves", "Training loss (solid), test loss (dashed) and validation loss (dotted) per epoch. A "
                "widening gap between training and test loss is overfitting; a training loss still falling steeply "
                "at the end means more epochs would help.", plots.loss_curves_figure(curves)),
               *_per_example_figures(content, gallery), *content.explained]
    if content.robustness:
        figures.append(("Robustness", "Accuracy of the trained models on altered test images: shifted right and "
                        "down (reflected border) and mirrored, and under CIFAR-10-C style corruptions at each "
                        "severity (0 = clean); mean over seeds, whiskers min-max (`cifarbench experiment`).",
                        plots.robustness_figure(content.robustness)))
    figures.append(("Capacity", "Test accuracy against trainable parameters and against FLOPs per image (log "
                    "scale); whiskers: the seed spread.",
                    plots.capacity_figure([r.to_dict() for r in content.results])))
    tables: list[tuple[Any, ...]] = []
    if content.pairs:
        tables.append(("Differences between models", PAIRWISE_HEADERS, pairwise_rows(content.pairs),
                       "Accuracy of model B minus model A, mean over the seeds both ran, with a 95% Student-t "
                       "interval over those paired seeds (one seed: no interval). McNemar's exact test compares the "
                       "two models' predictions image by image on the shared test set, per seed; the largest p over "
                       "the seeds is shown, with the counts of images only A or only B got right."))
    for name, (models, rows) in content.experiments.items():
        headers, cells = experiment_table(models, rows)
        tables.append((f"Experiment: {name}", headers, cells, "Test accuracy mean ± sample std over seeds."))
    fingerprints = list({r.dataset.get("sha256"): r.dataset for r in runs}.values())
    if len(fingerprints) > 1:
        notes.append("the runs were trained on copies of the data with different fingerprints; their "
                     "accuracies are not directly comparable")
    notes += [f"warning: {w}" for w in content.warnings]
    notes += [f"run {r.run_id}: {line}" for r in runs if r.budget is not None
              for line in [precision_line(r.budget.precision)] if line]
    name = runs[0].dataset.get("name") if runs else None
    document = html.render_report(
        title=title or f"cifarbench: {' vs '.join(groups)} on {name}",
        summary=(comparison_headers(content.results), comparison_rows(content.results)), tables=tables,
        runs=_run_table(runs, target),
        figures=[(heading, caption, plots.png_bytes(fig)) for heading, caption, fig in figures],
        configs={r.run_id: r.config for r in runs},
        datasets=fingerprints,
        environment={k: str(v) for k, v in (("code_version", runs[0].environment.get("code_version")),
                                            ("torch_version", runs[0].environment.get("torch_version")),
                                            ("device", runs[0].device)) if v},
        notes=notes)
    return html.write_report(document, out)


def _per_example_figures(content: ReportContent, gallery: int) -> list[tuple[str, str, Any]]:
    """Per-class accuracy, confusion matrices and the most confident mistakes, from the runs' predictions."""
    dataset = content.dataset
    if dataset is None:
        return []
    classes, test = list(dataset.classes), dataset.test
    confusions: dict[str, np.ndarray] = {}
    per_class: dict[str, list[list[float]]] = {}
    galleries: dict[str, list[dict[str, Any]]] = {}
    k = len(classes)
    for label, group in content.groups.items():
        for run in group:
            score = content.scores.get(run.run_id)
            if score is None or len(score.predicted) != len(test.labels):
                continue
            confusion = np.bincount(test.labels.astype(np.int64) * k + score.predicted, minlength=k * k).reshape(k, k)
            confusions[label] = confusions.get(label, 0) + confusion
            per_class.setdefault(label, []).append((confusion.diagonal() / np.maximum(confusion.sum(1), 1)).tolist())
            if label not in galleries:  # the first seed's run of each model
                galleries[label] = mistakes_by_confidence(score.predicted, score.confidence, test.labels, gallery)
    if not confusions:
        return []
    several = any(len(v) > 1 for v in per_class.values())
    pooled = "; several seeds are pooled (counts summed)" if several else ""
    return [
        ("Per-class accuracy", "Recall of each class on the test set, mean over seeds (whiskers: min-max).",
         plots.per_class_figure(per_class, classes)),
        ("Confusion matrices", f"Rows: true class, columns: predicted; colour = row fraction{pooled}.",
         plots.confusion_figure(confusions, classes, {k: len(v) for k, v in per_class.items()})),
        ("Most confident mistakes", "Wrong test predictions with the highest probability (first seed of each "
         "model), captioned with the true class, the predicted one and its probability.",
         plots.mistakes_figure(galleries, test.images, classes)),
        ("Test images by class", "Random test images of each class, with its number of test images.",
         plots.class_grid_figure(test.images, test.labels, classes, per_class=8)),
    ]


def _run_table(runs: list[RunRecord], target: float | None) -> tuple[list[str], list[list[str]]]:
    validation = any(h.val_accuracy is not None for r in runs for h in r.history)
    headers = ["run", "model", "recipe", "seed", "status", "test accuracy",
               *(["validation accuracy (last epoch)"] if validation else []), "train s", "epochs",
               *([f"time to {100 * target:g}%"] if target is not None else []), "data sha256", "verified data"]
    rows = []
    for r in runs:
        secs = "-" if r.train_seconds is None else f"{r.train_seconds:.1f}"
        ttt = [time_to_target_cell(r.time_to_target(target))] if target is not None else []
        val = [percent(next((h.val_accuracy for h in reversed(r.history) if h.val_accuracy is not None), None))]
        rows.append([r.run_id, r.model, r.recipe, str(r.seed), r.status, percent(r.test_accuracy),
                     *(val if validation else []), secs, str(len(r.history)), *ttt,
                     str(r.dataset.get("sha256", "-"))[:16], "yes" if r.dataset.get("verified") else "no"])
    return headers, rows
