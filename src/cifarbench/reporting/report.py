"""Report assembly: the figures and tables of one self-contained HTML report of runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cifarbench.comparing import check_target, pairwise, run_warnings
from cifarbench.data import ImageDataset, original
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.analysis import confident_mistakes
from cifarbench.evaluation.stats import PairComparison
from cifarbench.explaining import robustness_figure_of, stored_experiments, summarise_experiment
from cifarbench.inference import load_trained_model
from cifarbench.models.reference import label as short_name
from cifarbench.provenance import environment
from cifarbench.reporting import html, plots
from cifarbench.reporting.progress import say
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
    path, pairs = _write_report(runs, results, out, target=target, data_dir=data_dir, verify=verify,
                                download=download, device=device, progress=progress, trust_code=trust_code,
                                runs_dir=runs_dir)
    return Comparison(results=results, runs=runs, target=target, report=str(path), environment=environment(),
                      pairs=pairs, warnings=run_warnings(runs))


class _Evidence:
    """Per-example figures of each model, gathered from its runs' checkpoints on one test set."""

    def __init__(self, gallery: int, runs_dir: str | os.PathLike | None, trust_code: bool) -> None:
        self.gallery, self.runs_dir, self.trust_code = gallery, runs_dir, trust_code
        self.notes: list[str] = []
        self.confusions: dict[str, np.ndarray] = {}
        self.per_class: dict[str, list[list[float]]] = {}
        self.galleries: dict[str, list[dict[str, Any]]] = {}
        self.correct: dict[str, np.ndarray] = {}
        """Per run id: each test example classified right or wrong (for McNemar's test)."""
        self.explained: list[tuple[str, str, Any]] = []
        """The interpretation gallery: figures of the first seed's run of each model."""
        self.dataset: ImageDataset | None = None
        """The test set as read (each run gets it as it saw it: `TrainedModel.test_dataset`)."""

    def add(self, label: str, run: RunRecord, *, device: str, explain: bool, **data: Any) -> None:
        ckpt = Path(run.run_dir) / CHECKPOINT if run.run_dir else None
        if ckpt is None or not ckpt.is_file():
            self.notes.append(f"run {run.run_id} has no checkpoint; it is in the tables but not in the per-example "
                              "figures")
            return
        loaded = load_trained_model(str(ckpt), device=device, runs_dir=self.runs_dir, trust_code=self.trust_code)
        seen = loaded.test_dataset(dataset=self.dataset, **data)
        self.dataset = original(seen)
        result = loaded.evaluate(seen, keep_probabilities=True)
        if seen.sha256 != loaded.checkpoint.dataset["sha256"]:
            self.notes.append(f"run {run.run_id} was trained on data with another fingerprint than the test set "
                              f"evaluated here ({seen.sha256[:12]})")
        assert result.probabilities is not None
        self.correct[run.run_id] = result.probabilities.argmax(1) == seen.test.labels
        self.confusions[label] = self.confusions.get(label, 0) + np.asarray(result.confusion)
        self.per_class.setdefault(label, []).append(result.per_class_accuracy)
        if label not in self.galleries:  # the first seed's run of each model
            self.galleries[label] = confident_mistakes(result.probabilities, seen.test.labels, self.gallery)
            if explain:
                from cifarbench.explaining import explain_trained

                explained = explain_trained(loaded, seen, label=f"{label} seed {run.seed}")
                self.explained += [(f.heading, f.caption, f.figure) for f in explained.figures]
                self.notes += explained.notes

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
                 runs_dir: str | os.PathLike | None = None, trust_code: bool = False, explain: bool = True) -> Path:
    """Write the HTML report of `runs` (summarised as `results`); the test set is evaluated from each run's
    checkpoint (loaded from the runs' own data config unless `dataset` is given). With `explain`, the first
    seed of each model also gets its interpretation gallery (templates or filters, feature maps, saliency)."""
    return _write_report(runs, results, out, target=target, dataset=dataset, data_dir=data_dir, verify=verify,
                         download=download, device=device, progress=progress, title=title, gallery=gallery,
                         runs_dir=runs_dir, trust_code=trust_code, explain=explain)[0]


def _write_report(runs: Sequence[RunRecord], results: Sequence[ModelSummary], out: str | os.PathLike, *,
                  target: float | None = None, dataset: ImageDataset | None = None, data_dir: str | None = None,
                  verify: bool | None = None, download: bool | None = None, device: str = "auto",
                  progress: bool | None = None, title: str | None = None, gallery: int = 8,
                  runs_dir: str | os.PathLike | None = None, trust_code: bool = False, explain: bool = True
                  ) -> tuple[Path, list[PairComparison]]:
    """`build_report`, also returning the pairwise comparisons it computed (differences and McNemar)."""
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
            evidence.add(label, run, device=device, explain=explain, data_dir=data_dir, verify=verify,
                         download=download, progress=progress)
    curves = {label: [[h.to_dict() for h in r.history] for r in rs] for label, rs in groups.items()}
    figures = [("Learning curves", "Test accuracy after every epoch (and validation accuracy, dashed, for runs "
                "with a validation split), per epoch and per cumulative training second.",
                plots.learning_curves_figure(curves, target=target)),
               ("Loss curves", "Training loss (solid), test loss (dashed) and validation loss (dotted) per epoch. A "
                "widening gap between training and test loss is overfitting; a training loss still falling steeply "
                "at the end means more epochs would help.", plots.loss_curves_figure(curves)),
               *evidence.figures(), *evidence.explained]
    robustness = robustness_figure_of(runs, runs_dir)
    if robustness is not None:
        figures.append(("Robustness", "Accuracy of the trained models on altered test images: shifted right and "
                        "down (reflected border) and mirrored, and under CIFAR-10-C style corruptions at each "
                        "severity (0 = clean); mean over seeds, whiskers min-max (`cifarbench experiment`).",
                        robustness))
    figures.append(("Capacity", "Test accuracy against trainable parameters and against FLOPs per image (log "
                    "scale); whiskers: the seed spread.", plots.capacity_figure([r.to_dict() for r in results])))
    pairs = pairwise(runs, evidence.correct)
    tables: list[tuple[Any, ...]] = []
    if pairs:
        tables.append(("Differences between models", PAIRWISE_HEADERS, pairwise_rows(pairs),
                       "Accuracy of model B minus model A, mean over the seeds both ran, with a 95% Student-t "
                       "interval over those paired seeds (one seed: no interval). McNemar's exact test compares the "
                       "two models' predictions image by image on the shared test set, per seed; the largest p over "
                       "the seeds is shown, with the counts of images only A or only B got right."))
    for name, per_model in _experiment_results(runs, runs_dir).items():
        headers, rows = experiment_table(list(per_model), summarise_experiment(name, per_model))
        tables.append((f"Experiment: {name}", headers, rows, "Test accuracy mean ± sample std over seeds."))
    fingerprints = list({r.dataset.get("sha256"): r.dataset for r in runs}.values())
    if len(fingerprints) > 1:
        evidence.notes.append("the runs were trained on copies of the data with different fingerprints; their "
                              "accuracies are not directly comparable")
    evidence.notes += [f"warning: {w}" for w in run_warnings(runs)]
    evidence.notes += [f"run {r.run_id}: {line}" for r in runs if r.budget is not None
                       for line in [precision_line(r.budget.precision)] if line]
    document = html.render_report(
        title=title or f"cifarbench: {' vs '.join(groups)} on {names[0]}",
        summary=(comparison_headers(results), comparison_rows(results)), tables=tables,
        runs=_run_table(runs, target),
        figures=[(heading, caption, plots.png_bytes(fig)) for heading, caption, fig in figures],
        configs={r.run_id: r.config for r in runs},
        datasets=fingerprints,
        environment={k: str(v) for k, v in (("code_version", runs[0].environment.get("code_version")),
                                            ("torch_version", runs[0].environment.get("torch_version")),
                                            ("device", runs[0].device)) if v},
        notes=evidence.notes)
    return html.write_report(document, out), pairs


def _experiment_results(runs: Sequence[RunRecord], runs_dir: str | os.PathLike | None
                        ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The stored experiments of `runs`: {experiment: {model label: [result per seed]}}."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, entries in stored_experiments(runs, runs_dir).items():
        for entry in entries:
            for name, result in entry.items():
                out.setdefault(name, {}).setdefault(label, []).append(result)
    return out


def _short_labels(groups: dict[str, list[RunRecord]]) -> dict[str, list[RunRecord]]:
    """The groups keyed by their models' short names (`Net` for `__main__:Net`) where those stay distinct:
    matplotlib leaves a name that starts with "_" out of a figure's legend."""
    short = {name: short_name(name) for name in groups}
    if len(set(short.values())) < len(short):
        return groups
    return {short[name]: runs for name, runs in groups.items()}


def _run_table(runs: Sequence[RunRecord], target: float | None) -> tuple[list[str], list[list[str]]]:
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
