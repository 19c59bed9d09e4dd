"""Why one model beats another, for stored runs: the interpretation gallery (`cifarbench explain`), the
translation and corruption experiments (`cifarbench experiment translation|corruption`, kept in each run's
experiments.json) and the permuted-pixels experiment (`cifarbench experiment permutation`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cifarbench import display_hooks, runtime
from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast_dtype, resolve_device
from cifarbench.errors import CifarbenchError, Keyword, Spelling, as_keyword
from cifarbench.evaluation.experiments import (
    CORRUPTIONS,
    CorruptedCopies,
    corruption_accuracy,
    translation_accuracy,
)
from cifarbench.evaluation.explain import ModelExplanation, explain_model
from cifarbench.evaluation.stats import (
    PairComparison,
    PairedDifference,
    Spread,
    mean_spread,
    paired_by_seed,
    paired_difference,
)
from cifarbench.inference import TrainedModel, load_trained_model
from cifarbench.runs import folders
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.records import RunRecord, group_runs, short_labels, summarise
from cifarbench.scoring import TestCopies, score_runs
from cifarbench.training.state import EpochMetrics

EXPERIMENTS = ("translation", "corruption")


def _loaded(run: RunRecord, *, device: str, runs_dir: str | os.PathLike | None, trust_code: bool) -> TrainedModel:
    checkpoint = folders.run_folder(runs_dir, run.run_id) / folders.CHECKPOINT
    if not checkpoint.is_file():
        raise CifarbenchError(f"run {run.run_id} has no checkpoint ({checkpoint}); it cannot be explained")
    return load_trained_model(str(checkpoint), device=device, runs_dir=runs_dir, trust_code=trust_code)


def _eval_batch(loaded: TrainedModel) -> int:
    """The run's evaluation batch, at most CPU_EVAL_BATCH on a CPU: there small batches keep activations in cache
    (the notebook's CNN: 2.5x the images/s of batches of 1,000; docs/cpu-performance.md#evaluation-batch-256)."""
    from cifarbench.training.recipes import CPU_EVAL_BATCH

    size = loaded.config.eval_batch_size
    return min(size, CPU_EVAL_BATCH) if loaded.device.type == "cpu" else size


def _test_split(loaded: TrainedModel, dataset: ImageDataset) -> DeviceSplit:
    c = loaded.config
    return DeviceSplit(dataset.test, loaded.device, c.data.mean, c.data.std, c.channels_last)


def explain_trained(loaded: TrainedModel, dataset: ImageDataset, *, label: str, examples: int = 4, seed: int = 0,
                    experiments: bool = False, **settings: Any) -> ModelExplanation:
    """`explain_model` for a loaded run on `dataset` (as that run sees it: `loaded.test_dataset`)."""
    c = loaded.config
    return explain_model(loaded.model, _test_split(loaded, dataset), label=label, classes=loaded.classes,
                         in_shape=loaded.in_shape, mean=c.data.mean, std=c.data.std, batch_size=_eval_batch(loaded),
                         autocast_dtype=autocast_dtype(c, loaded.device), examples=examples, seed=seed,
                         experiments=experiments, **settings)


# --- The gallery ------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ExplainedRun:
    run_id: str
    label: str
    seed: int
    accuracy: float
    """Plain-view test accuracy of the checkpoint (no test-time augmentation)."""
    files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    """What `explain_runs` wrote: per run its figures (templates or filters and feature maps, saliency), and
    for all of them the capacity figure and, when experiments are stored, the robustness figure."""

    out: str
    runs: list[ExplainedRun]
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "runs": [vars(r) for r in self.runs], "files": self.files, "notes": self.notes}

    def __repr__(self) -> str:
        return f"Explanation({len(self.runs)} runs, {len(self.files)} figures in {self.out!r})"

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


def explain_runs(refs: Sequence[str], out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                 data_dir: str | None = None, verify: bool | None = None, download: bool | None = None,
                 device: str = "auto", examples: int = 4, trust_code: bool = False,
                 progress: bool | None = None) -> Explanation:
    """Draw what each stored run learnt into `out`: RUN_ID/templates.png for a fully connected net (its class
    templates), RUN_ID/filters.png and RUN_ID/feature-maps.png for a conv net, RUN_ID/saliency.png for every
    model (needs Captum, the `interpret` extra), plus capacity.png and, when experiments are stored with the
    runs, robustness.png."""
    from cifarbench.reporting.plots import capacity_figure, save_figure

    if examples < 1:
        raise CifarbenchError("{option} must be at least 1", option=Keyword("examples"))
    runtime.configure()
    runs = stored_runs(refs, runs_dir=runs_dir)
    groups = group_runs(runs)
    names = short_labels(groups)  # headings read `Net`, as the tables do, not `__main__:Net`
    labels = {r.run_id: names[label] for label, rs in groups.items() for r in rs}
    root = Path(out)
    result = Explanation(str(root), [], [])
    copies = TestCopies(None, progress, {"data_dir": data_dir, "verify": verify, "download": download})
    for run in runs:
        loaded = _loaded(run, device=device, runs_dir=runs_dir, trust_code=trust_code)
        seen = copies.seen_by(run, loaded.config, own=loaded.own)
        explained = explain_trained(loaded, seen, label=f"{labels[run.run_id]} seed {run.seed}", examples=examples)
        files = [str(save_figure(f.figure, root / run.run_id / f"{f.key}.png")) for f in explained.figures]
        result.runs.append(ExplainedRun(run_id=run.run_id, label=labels[run.run_id], seed=run.seed,
                                        accuracy=explained.accuracy, files=files, notes=explained.notes))
        result.files += files
        result.notes += explained.notes
    result.files.append(str(save_figure(capacity_figure([s.to_dict() for s in summarise(runs)]),
                                        root / "capacity.png")))
    robustness = robustness_figure_of(runs, runs_dir)
    if robustness is not None:
        result.files.append(str(save_figure(robustness, root / "robustness.png")))
    return result


# --- Translation and corruption ---------------------------------------------------------------------------

@dataclass
class ExperimentRow:
    """One condition (a shift, a corruption at a severity) and each model's accuracy over its seeds."""

    condition: str
    accuracy: dict[str, Spread]

    def to_dict(self) -> dict[str, Any]:
        return {"condition": self.condition, "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()}}


@dataclass(kw_only=True)
class ExperimentReport:
    """An experiment over stored runs: each run's result (also kept in its experiments.json) and, per
    condition, each model's mean and spread over its seeds."""

    name: str
    models: list[str]
    rows: list[ExperimentRow]
    results: dict[str, dict[str, Any]]
    """By run id."""
    figure: str | None = None
    runs_by_model: dict[str, list[str]] = field(default_factory=dict)
    """Each model's run ids, in seed order."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "models": self.models, "rows": [r.to_dict() for r in self.rows],
                "results": self.results, "figure": self.figure, "runs_by_model": self.runs_by_model}

    def __repr__(self) -> str:
        return f"ExperimentReport({self.name!r}, models {', '.join(self.models)}; {len(self.rows)} conditions)"

    def plot(self):
        """Accuracy against the shift or the severity as a matplotlib Figure, one line per model."""
        return display_hooks.figure(self)

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


def _conditions(name: str, result: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """(condition, accuracy) pairs of one stored result, in display order."""
    if name == "translation":
        for shift, acc in zip(result["shifts"], result["accuracy"], strict=True):
            yield f"shift {shift} px", acc
        if result.get("flip_accuracy") is not None:
            yield "mirrored", result["flip_accuracy"]
    else:
        yield "clean", result["clean_accuracy"]
        for kind, values in result["accuracy"].items():
            for severity, acc in zip(result["severities"], values, strict=True):
                yield f"{kind.replace('_', ' ')} {severity}", acc


def summarise_experiment(name: str, results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[ExperimentRow]:
    """Per condition, each model's accuracy mean ± spread over its runs; `results[label]` has one result per
    seed (as stored)."""
    values: dict[str, dict[str, list[float]]] = {}
    for label, seeds in results.items():
        for result in seeds:
            for condition, acc in _conditions(name, result):
                values.setdefault(condition, {}).setdefault(label, []).append(float(acc))
    return [ExperimentRow(c, {label: mean_spread(v) for label, v in per.items()}) for c, per in values.items()]


def run_experiment(name: str, refs: Sequence[str], *, shifts: int = 4, flip: bool = True, fill: str = "reflect",
                   severities: Sequence[int] = (1, 3, 5), kinds: Sequence[str] = tuple(CORRUPTIONS), seed: int = 0,
                   out: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
                   data_dir: str | None = None, verify: bool | None = None, download: bool | None = None,
                   device: str = "auto", trust_code: bool = False, progress: bool | None = None,
                   on_run: Callable[[RunRecord, dict[str, Any]], None] | None = None) -> ExperimentReport:
    """Run the translation (test images shifted by 0..`shifts` pixels, and mirrored) or corruption (Gaussian
    noise, blur, contrast, JPEG at `severities`, CIFAR-10-C style) experiment on each stored run's checkpoint;
    keep each result in the run's experiments.json and summarise per model over its seeds. With `out`, also
    write NAME.png (accuracy against the shift or severity) there."""
    if name not in EXPERIMENTS:
        raise CifarbenchError(f"unknown experiment {name!r}; choose from: {', '.join(EXPERIMENTS)}, permutation")
    if name == "translation" and not 0 <= shifts < 32:
        raise CifarbenchError("{option} {shifts}: give a largest shift from 0 to 31 pixels", option=Keyword("shifts"),
                              shifts=shifts)
    if name == "corruption":
        bad = [s for s in severities if not 1 <= int(s) <= 5]
        if bad or not severities:
            raise CifarbenchError("{option} must be levels from 1 to 5, e.g. 1,3,5 (got {got})",
                                  option=Keyword("severities"), got=list(severities))
        unknown = [k for k in kinds if k not in CORRUPTIONS]
        if unknown or not kinds:
            raise CifarbenchError("{option}: unknown corruption {kind!r}; choose from: {choices}",
                                  option=Keyword("kinds"), kind=unknown[0] if unknown else "",
                                  choices=", ".join(CORRUPTIONS))
    runtime.configure()
    runs = stored_runs(refs, runs_dir=runs_dir)
    groups = group_runs(runs)
    results: dict[str, dict[str, Any]] = {}
    copies = TestCopies(None, progress, {"data_dir": data_dir, "verify": verify, "download": download})
    corrupted: CorruptedCopies | None = None  # of the last run's test images: the next run on them reuses them
    for run in runs:
        loaded = _loaded(run, device=device, runs_dir=runs_dir, trust_code=trust_code)
        seen = copies.seen_by(run, loaded.config, own=loaded.own)
        c = loaded.config
        common = dict(mean=c.data.mean, std=c.data.std, batch_size=_eval_batch(loaded),
                      autocast_dtype=autocast_dtype(c, loaded.device), channels_last=c.channels_last)
        test = _test_split(loaded, seen)
        if name == "translation":
            result = translation_accuracy(loaded.model, test, shifts=range(shifts + 1), flip=flip, fill=fill,
                                          **common).to_dict()  # type: ignore[arg-type]
        else:
            if corrupted is None or not corrupted.made_from(test.images):
                corrupted = CorruptedCopies(test.images)
            result = corruption_accuracy(loaded.model, test, kinds=list(kinds), severities=[int(s) for s in severities],
                                         seed=seed, copies=corrupted, **common).to_dict()  # type: ignore[arg-type]
        folders.store_experiment(folders.run_folder(runs_dir, run.run_id), name, result)
        results[run.run_id] = result
        if on_run:
            on_run(run, result)
    by_label = {label: [results[r.run_id] for r in rs] for label, rs in groups.items()}
    report = ExperimentReport(name=name, models=list(groups), rows=summarise_experiment(name, by_label),
                              results=results,
                              runs_by_model={label: [r.run_id for r in rs] for label, rs in groups.items()})
    if out is not None:
        from cifarbench.reporting.plots import robustness_figure, save_figure

        figure = robustness_figure({label: [{name: r} for r in rs] for label, rs in by_label.items()})
        report.figure = str(save_figure(figure, Path(out) / f"{name}.png"))
    return report


def stored_experiments(runs: Sequence[RunRecord], runs_dir: str | os.PathLike | None = None
                       ) -> dict[str, list[dict[str, Any]]]:
    """The experiments stored with each model's runs: {label: [{"translation": ..., "corruption": ...}, ...]},
    models without any left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for label, group in group_runs(runs).items():
        entries = [folders.read_experiments(folders.run_folder(runs_dir, r.run_id)) for r in group]
        entries = [{k: e[k] for k in EXPERIMENTS if k in e} for e in entries]
        if any(entries):
            out[label] = [e for e in entries if e]
    return out


def robustness_figure_of(runs: Sequence[RunRecord], runs_dir: str | os.PathLike | None = None):
    """The robustness figure of the experiments stored with `runs`, or None when there are none."""
    from cifarbench.reporting.plots import robustness_figure

    stored = stored_experiments(runs, runs_dir)
    return robustness_figure(stored) if stored else None


# --- Permuted pixels ---------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PermutationRow:
    """One model trained and tested on the images as they are and on permuted pixels, over the same seeds."""

    model: str
    plain: Spread | None
    permuted: Spread | None
    change: PairedDifference | None
    """Permuted minus plain accuracy over the seeds both ran, with its 95% interval."""
    plain_runs: list[str]
    permuted_runs: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "plain": self.plain.to_dict() if self.plain else None,
                "permuted": self.permuted.to_dict() if self.permuted else None,
                "change": self.change.to_dict() if self.change else None, "plain_runs": self.plain_runs,
                "permuted_runs": self.permuted_runs}


@dataclass(kw_only=True)
class PermutationReport:
    """The permuted-pixels experiment: each model's accuracy plain and permuted, and every pair of models
    compared in each condition (difference with interval, McNemar)."""

    permutation_seed: int
    rows: list[PermutationRow]
    plain_pairs: list[PairComparison]
    permuted_pairs: list[PairComparison]
    runs: list[RunRecord]
    reused: list[str] = field(default_factory=list)
    """Runs taken from the store instead of trained again (same config, same data)."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"permutation_seed": self.permutation_seed, "rows": [r.to_dict() for r in self.rows],
                "plain_pairs": [p.to_dict() for p in self.plain_pairs],
                "permuted_pairs": [p.to_dict() for p in self.permuted_pairs],
                "runs": [r.summary() for r in self.runs], "reused": self.reused, "warnings": self.warnings}

    def __repr__(self) -> str:
        rows = ", ".join(f"{r.model} {'-' if r.change is None else f'{100 * r.change.mean_difference:+.2f} points'}"
                         for r in self.rows)
        return f"PermutationReport(permuted - plain: {rows})"

    def plot(self):
        """Each model's accuracy on plain and on permuted pixels as a matplotlib Figure."""
        return display_hooks.figure(self)

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


def _stored_match(config: TrainConfig, dataset: ImageDataset, candidates: Sequence[RunRecord]) -> RunRecord | None:
    """A completed stored run with exactly this config, trained on this data (as read), if there is one."""
    wanted = config.to_dict()
    for run in candidates:
        data = run.dataset or {}
        if data.get("base_sha256", data.get("sha256")) != dataset.sha256:
            continue
        try:  # through the typed config: fields added since the run was stored take their defaults
            stored = TrainConfig.from_dict(run.config).to_dict()
        except CifarbenchError:
            continue
        if stored == wanted:
            return run
    return None


def permutation_experiment(models: Sequence[str], make: Callable[[str, int], TrainConfig], *, seeds: int = 3,
                           permutation_seed: int = 0, reuse: bool = True, runs_dir: str | os.PathLike | None = None,
                           progress: bool | None = None,
                           on_epoch: Callable[[TrainConfig, EpochMetrics], None] | None = None,
                           on_reuse: Callable[[RunRecord], None] | None = None,
                           spelling: Spelling = as_keyword) -> PermutationReport:
    """Train each model for seeds 0..seeds-1 on the images as they are and under one fixed random pixel
    permutation (`permutation_seed`, the same for train and test), reusing stored runs with the same config
    and data when `reuse`. A fully connected net should not care (the permutation only relabels its inputs);
    a conv net loses the neighbourhoods its filters rely on."""
    from cifarbench.comparing import pairwise, run_warnings
    from cifarbench.running import train_run
    from cifarbench.runs.store import RunStore
    from cifarbench.training.loop import check_settings

    runtime.configure()
    if seeds < 1:
        raise CifarbenchError("{option} must be at least 1", option=Keyword("seeds"))
    plain = {m: [make(m, s) for s in range(seeds)] for m in models}
    if any(c.data.permute_pixels is not None for cs in plain.values() for c in cs):
        raise CifarbenchError("the permutation experiment trains plain and permuted runs itself; leave out "
                              "{permute} (use {seed} to choose the permutation)", permute=Keyword("permute_pixels"),
                              seed=Keyword("permutation_seed"))
    permuted = {m: [replace(c, data=replace(c.data, permute_pixels=permutation_seed)) for c in cs]
                for m, cs in plain.items()}
    for cs in plain.values():
        check_settings(cs[0], resolve_device(cs[0].device))
    first = next(iter(plain.values()))[0]
    dataset = load_dataset(first.data, progress=progress)
    candidates: list[RunRecord] = []
    if reuse:
        with RunStore(runs_dir, read_only=True) as store:
            ids = [row["id"] for row in store.list_runs() if row["status"] == "completed"]
        candidates = stored_runs(ids, runs_dir=runs_dir) if ids else []
    report = PermutationReport(permutation_seed=permutation_seed, rows=[], plain_pairs=[], permuted_pairs=[], runs=[])
    done: dict[tuple[str, int, bool], RunRecord] = {}
    for m in models:
        for kind, configs in ((False, plain[m]), (True, permuted[m])):
            for config in configs:
                run = _stored_match(config, dataset, candidates) if reuse else None
                if run is not None:
                    report.reused.append(run.run_id)
                    if on_reuse:
                        on_reuse(run)
                else:
                    run = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress,
                                    on_epoch=(lambda e, c=config: on_epoch(c, e)) if on_epoch else None,
                                    spelling=spelling)
                done[(m, config.seed, kind)] = run
    report.runs = list(done.values())
    correct = score_runs(report.runs, dataset=dataset, device=first.device, runs_dir=runs_dir,
                         progress=progress).correct()
    plain_runs = [r for (_, _, p), r in done.items() if not p]
    permuted_runs = [r for (_, _, p), r in done.items() if p]
    report.plain_pairs, report.permuted_pairs = pairwise(plain_runs, correct), pairwise(permuted_runs, correct)
    report.warnings = run_warnings(report.runs)
    for m in models:
        a = {s: r.test_accuracy for (mm, s, p), r in done.items() if mm == m and not p and r.test_accuracy is not None}
        b = {s: r.test_accuracy for (mm, s, p), r in done.items() if mm == m and p and r.test_accuracy is not None}
        common, xs, ys = paired_by_seed(a, b)
        report.rows.append(PermutationRow(model=m, plain=mean_spread(list(a.values())) if a else None,
                                          permuted=mean_spread(list(b.values())) if b else None,
                                          change=paired_difference(xs, ys) if common else None,
                                          plain_runs=[done[(m, s, False)].run_id for s in range(seeds)],
                                          permuted_runs=[done[(m, s, True)].run_id for s in range(seeds)]))
    return report
