"""What a report of runs shows, gathered: each run's stored per-image predictions (`scoring.score_runs`), the
interpretation gallery, the stored experiments and the pairwise statistics. `reporting.report` renders it; the
front doors (`cli`, `api`) write it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cifarbench.comparing import pairwise, run_warnings
from cifarbench.data import ImageDataset
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.stats import PairComparison
from cifarbench.explaining import ExperimentRow, explain_trained, stored_experiments, summarise_experiment
from cifarbench.models.reference import label as short_name
from cifarbench.progress import say
from cifarbench.runs.records import ModelSummary, RunRecord, group_runs, summarise
from cifarbench.scoring import RunScore, score_runs


@dataclass(kw_only=True)
class ReportContent:
    """Everything a report of `runs` shows, computed: the view draws and writes it (`reporting.report`)."""

    runs: list[RunRecord]
    results: list[ModelSummary]
    target: float | None
    groups: dict[str, list[RunRecord]]
    """The runs by model, labelled by the models' short names where those stay distinct."""
    pairs: list[PairComparison] = field(default_factory=list)
    scores: dict[str, RunScore] = field(default_factory=dict)
    """Each run's final evaluation, image by image (stored with the run, or evaluated for an old one)."""
    dataset: ImageDataset | None = None
    """The test data as the runs saw it (images and class names for the per-example figures)."""
    explained: list[tuple[str, str, Any]] = field(default_factory=list)
    """The interpretation gallery: (heading, caption, figure) of the first seed's run of each model."""
    experiments: dict[str, tuple[list[str], list[ExperimentRow]]] = field(default_factory=dict)
    """Each stored experiment: its models and, per condition, their accuracy over seeds."""
    robustness: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """The experiments stored with each model's runs (the robustness figure's data)."""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def report_content(runs: Sequence[RunRecord], results: Sequence[ModelSummary] | None = None, *,
                   target: float | None = None, dataset: ImageDataset | None = None, data_dir: str | None = None,
                   verify: bool | None = None, download: bool | None = None, device: str = "auto",
                   progress: bool | None = None, runs_dir: str | os.PathLike | None = None, trust_code: bool = False,
                   explain: bool = True) -> ReportContent:
    """What the report of `runs` shows. Per-example figures and McNemar's test use each run's stored predictions
    (nothing is evaluated again; an old run without them is evaluated with its own settings, and said so). With
    `explain`, the first seed of each model also gets its interpretation gallery (templates or filters, feature
    maps, saliency), which loads its checkpoint."""
    names = sorted({r.dataset.get("name") for r in runs}, key=str)
    if len(names) > 1:
        raise CifarbenchError(f"these runs were trained on different data sets ({', '.join(map(str, names))}); "
                              "report them separately")
    runs = list(runs)
    groups = _short_labels(group_runs(runs))
    say(f"building the report: reading the predictions of {len(runs)} run{'s' * (len(runs) != 1)}...",
        enabled=progress)
    scores = score_runs(runs, dataset=dataset, need_data=True, device=device, runs_dir=runs_dir,
                        trust_code=trust_code, progress=progress, data_dir=data_dir, verify=verify, download=download)
    content = ReportContent(runs=runs, results=list(results) if results is not None else summarise(runs, target),
                            target=target, groups=groups, pairs=pairwise(runs, scores.correct()), scores=scores.runs,
                            notes=list(scores.notes))
    content.dataset = next(iter(scores.datasets.values()), None)
    for run in runs:
        score, seen = scores.runs.get(run.run_id), scores.datasets.get(run.run_id)
        if score is None:
            continue
        if seen is not None and seen.sha256 != run.dataset.get("sha256"):
            content.notes.append(f"run {run.run_id} was trained on data with another fingerprint than the test set "
                                 f"read here ({seen.sha256[:12]})")
    if explain:
        content.explained = _gallery(groups, scores.datasets, device=device, runs_dir=runs_dir,
                                     trust_code=trust_code, notes=content.notes)
    content.robustness = stored_experiments(runs, runs_dir)
    for name, per_model in _experiment_results(content.robustness).items():
        content.experiments[name] = (list(per_model), summarise_experiment(name, per_model))
    content.warnings = run_warnings(runs)
    return content


def _gallery(groups: dict[str, list[RunRecord]], seen: dict[str, ImageDataset], *, device: str,
             runs_dir: str | os.PathLike | None, trust_code: bool, notes: list[str]) -> list[tuple[str, str, Any]]:
    """The interpretation figures of each model's first seed's run that has test data to show."""
    from cifarbench.inference import load_trained_model
    from cifarbench.runs.folders import CHECKPOINT

    figures: list[tuple[str, str, Any]] = []
    for label, group in groups.items():
        run = next((r for r in group if r.run_id in seen and r.run_dir), None)
        if run is None:
            continue
        checkpoint = f"{run.run_dir}/{CHECKPOINT}"
        if not os.path.isfile(checkpoint):
            continue
        loaded = load_trained_model(checkpoint, device=device, runs_dir=runs_dir, trust_code=trust_code)
        explained = explain_trained(loaded, seen[run.run_id], label=f"{label} seed {run.seed}")
        figures += [(f.heading, f.caption, f.figure) for f in explained.figures]
        notes += explained.notes
    return figures


def _experiment_results(stored: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The stored experiments: {experiment: {model label: [result per seed]}}."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, entries in stored.items():
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
