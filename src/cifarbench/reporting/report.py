"""Report assembly: the figures and tables of one self-contained HTML report of runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cifarbench.comparing import check_target
from cifarbench.data import ImageDataset
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.analysis import confident_mistakes
from cifarbench.inference import load_trained_model
from cifarbench.models.reference import label as short_name
from cifarbench.provenance import environment
from cifarbench.reporting import html, plots
from cifarbench.reporting.progress import say
from cifarbench.reporting.tables import comparison_headers, comparison_rows, percent, time_to_target_cell
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.folders import CHECKPOINT
from cifarbench.runs.records import Comparison, ModelSummary, RunRecord, group_runs, summarise


def report_runs(refs: Sequence[str], out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                target: float | None = None, data_dir: str | None = None, verify: bool | None = None,
                download: bool | None = None, device: str = "auto", progress: bool | None = None,
                trust_code: bool = False) -> Comparison:
    """One self-contained HTML report of stored runs: table, learning curves, per-class accuracy, confusion
    matrices, the most confident mistakes, configs and the data fingerprint. Returns the comparison."""
    check_target(target)
    runs = stored_runs(refs, runs_dir=runs_dir)
    results = summarise(runs, target)
    path = build_report(runs, results, out, target=target, data_dir=data_dir, verify=verify, download=download,
                        device=device, progress=progress, trust_code=trust_code, runs_dir=runs_dir)
    return Comparison(results, runs, target, report=str(path), environment=environment())


class _Evidence:
    """Per-example figures of each model, gathered from its runs' checkpoints on one test set."""

    def __init__(self, gallery: int, runs_dir: str | os.PathLike | None, trust_code: bool) -> None:
        self.gallery, self.runs_dir, self.trust_code = gallery, runs_dir, trust_code
        self.notes: list[str] = []
        self.confusions: dict[str, np.ndarray] = {}
        self.per_class: dict[str, list[list[float]]] = {}
        self.galleries: dict[str, list[dict[str, Any]]] = {}
        self.dataset: ImageDataset | None = None

    def add(self, label: str, run: RunRecord, *, device: str, **data: Any) -> None:
        ckpt = Path(run.run_dir) / CHECKPOINT if run.run_dir else None
        if ckpt is None or not ckpt.is_file():
            self.notes.append(f"run {run.run_id} has no checkpoint; it is in the tables but not in the per-example "
                              "figures")
            return
        loaded = load_trained_model(str(ckpt), device=device, runs_dir=self.runs_dir, trust_code=self.trust_code)
        self.dataset = loaded.test_dataset(dataset=self.dataset, **data)
        result = loaded.evaluate(self.dataset, keep_probabilities=True)
        if self.dataset.sha256 != loaded.checkpoint.dataset["sha256"]:
            self.notes.append(f"run {run.run_id} was trained on data with another fingerprint than the test set "
                              f"evaluated here ({self.dataset.sha256[:12]})")
        self.confusions[label] = self.confusions.get(label, 0) + np.asarray(result.confusion)
        self.per_class.setdefault(label, []).append(result.per_class_accuracy)
        if label not in self.galleries:  # the first seed's run of each model
            self.galleries[label] = confident_mistakes(result.probabilities, self.dataset.test.labels, self.gallery)

    def figures(self) -> list[tuple[str, str, Any]]:
        if self.dataset is None or not self.confusions:
            return []
        classes, test = list(self.dataset.classes), self.dataset.test
        several = any(len(v) > 1 for v in self.per_class.values())
        pooled = "; several seeds are pooled (counts summed)" if several else ""
        return [
            ("Per-class accuracy", "Recall of each class on the test set, mean over seeds (whiskers: min-max).",
             plots.per_class_figure(self.per_class, classes)),
            ("Confusion matrices", f"Rows: true class, columns: predicted; colour = row fraction{pooled}.",
             plots.confusion_figure(self.confusions, classes, {k: len(v) for k, v in self.per_class.items()})),
            ("Most confident mistakes", "Wrong test predictions with the highest probability (first seed of each "
             "model), captioned with the true class, the predicted one and its probability.",
             plots.mistakes_figure(self.galleries, test.images, classes)),
            ("Test images by class", "Random test images of each class, with its number of test images.",
             plots.class_grid_figure(test.images, test.labels, classes, per_class=8)),
        ]


def build_report(runs: Sequence[RunRecord], results: Sequence[ModelSummary], out: str | os.PathLike, *,
                 target: float | None = None, dataset: ImageDataset | None = None, data_dir: str | None = None,
                 verify: bool | None = None, download: bool | None = None, device: str = "auto",
                 progress: bool | None = None, title: str | None = None, gallery: int = 8,
                 runs_dir: str | os.PathLike | None = None, trust_code: bool = False) -> Path:
    """Write the HTML report of `runs` (summarised as `results`); the test set is evaluated from each run's
    checkpoint (loaded from the runs' own data config unless `dataset` is given)."""
    names = sorted({r.dataset.get("name") for r in runs}, key=str)
    if len(names) > 1:
        raise CifarbenchError(f"these runs were trained on different data sets ({', '.join(map(str, names))}); "
                              "report them separately")
    groups = _short_labels(group_runs(runs))
    say(f"building the report: evaluating {len(runs)} run{'s' * (len(runs) != 1)} on the test set...",
        enabled=progress)
    evidence = _Evidence(gallery, runs_dir, trust_code)
    evidence.dataset = dataset
    for label, group in groups.items():
        for run in group:
            evidence.add(label, run, device=device, data_dir=data_dir, verify=verify, download=download,
                         progress=progress)
    curves = {label: [[h.to_dict() for h in r.history] for r in rs] for label, rs in groups.items()}
    figures = [("Learning curves", "Test accuracy after every epoch, per epoch and per cumulative training second.",
                plots.learning_curves_figure(curves, target=target)), *evidence.figures()]
    fingerprints = list({r.dataset.get("sha256"): r.dataset for r in runs}.values())
    if len(fingerprints) > 1:
        evidence.notes.append("the runs were trained on copies of the data with different fingerprints; their "
                              "accuracies are not directly comparable")
    document = html.render_report(
        title=title or f"cifarbench: {' vs '.join(groups)} on {names[0]}",
        summary=(comparison_headers(results), comparison_rows(results)),
        runs=_run_table(runs, target),
        figures=[(heading, caption, plots.png_bytes(fig)) for heading, caption, fig in figures],
        configs={r.run_id: r.config for r in runs},
        datasets=fingerprints,
        environment={k: str(v) for k, v in (("code_version", runs[0].environment.get("code_version")),
                                            ("torch_version", runs[0].environment.get("torch_version")),
                                            ("device", runs[0].device)) if v},
        notes=evidence.notes)
    return html.write_report(document, out)


def _short_labels(groups: dict[str, list[RunRecord]]) -> dict[str, list[RunRecord]]:
    """The groups keyed by their models' short names (`Net` for `__main__:Net`) where those stay distinct:
    matplotlib leaves a name that starts with "_" out of a figure's legend."""
    short = {name: short_name(name) for name in groups}
    if len(set(short.values())) < len(short):
        return groups
    return {short[name]: runs for name, runs in groups.items()}


def _run_table(runs: Sequence[RunRecord], target: float | None) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "model", "recipe", "seed", "status", "test accuracy", "train s", "epochs",
               *([f"time to {100 * target:g}%"] if target is not None else []), "data sha256", "verified data"]
    rows = []
    for r in runs:
        secs = "-" if r.train_seconds is None else f"{r.train_seconds:.1f}"
        ttt = [time_to_target_cell(r.time_to_target(target))] if target is not None else []
        rows.append([r.run_id, r.model, r.recipe, str(r.seed), r.status, percent(r.test_accuracy), secs,
                     str(len(r.history)), *ttt,
                     str(r.dataset.get("sha256", "-"))[:16], "yes" if r.dataset.get("verified") else "no"])
    return headers, rows
