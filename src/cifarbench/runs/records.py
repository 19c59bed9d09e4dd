"""The typed records a run and a comparison travel as: from the loop to the store, the CLI, the report and JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cifarbench import display_hooks
from cifarbench.evaluation.analysis import summarise_time_to_target, time_to_target
from cifarbench.evaluation.stats import PairComparison
from cifarbench.training.budget import BudgetReport
from cifarbench.training.estimate import RunEstimate
from cifarbench.training.state import EpochMetrics

ENVIRONMENT_KEYS = ("code_version", "torch_version", "python", "platform", "cpu")


@dataclass(kw_only=True)
class RunRecord:
    """One run: what it trained, how it scored, what it cost, and what produced it."""

    run_id: str
    model: str
    """The model reference the config names: a registered name, `file.py:Name` or `module:Name`."""
    recipe: str
    seed: int
    epochs: int
    status: str = "completed"
    """running | completed | failed | interrupted | crashed"""
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    steps: int | None = None
    params: int | None = None
    flops_per_image: int | None = None
    train_flops: int | None = None
    """Matrix-product FLOPs spent on training (three forward passes per image, airbench's convention)."""
    device: str | None = None
    world_size: int = 1
    dataset: dict = field(default_factory=dict)
    history: list[EpochMetrics] = field(default_factory=list)
    per_class_accuracy: list[float] | None = None
    confusion: list[list[int]] | None = None
    config: dict = field(default_factory=dict)
    run_dir: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    """Provenance: code version, torch, python, platform, processor."""
    error: str | None = None
    origin: str | None = None
    """None for a run trained into this store; 'imported' for one that arrived from elsewhere."""
    budget: BudgetReport | None = None
    """A budgeted run's planned and used seconds, measured throughput, shape choice and what it gave up."""
    estimate: RunEstimate | None = None
    """The cost said before training (measured images/s, seconds per epoch and for the run), to set beside
    `wall_seconds`."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape (`--json`, metrics.json): flat provenance keys, the budget and TTA settings."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("environment", "history")}
        d["history"] = [h.to_dict() for h in self.history]
        d["budget"] = self.budget.to_dict() if self.budget is not None else None
        d["estimate"] = self.estimate.to_dict() if self.estimate is not None else None
        d.update(tta=self.config.get("tta"), tta_threshold=self.config.get("tta_threshold"),
                 budget_seconds=self.config.get("budget_seconds"), **self.environment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """Inverse of `to_dict` (unknown keys ignored, so older files load)."""
        known = {f.name for f in fields(cls)} - {"environment", "history", "budget", "estimate"}
        record = cls(**{k: v for k, v in d.items() if k in known})
        record.budget = BudgetReport.from_dict(d.get("budget"))
        record.estimate = RunEstimate.from_dict(d.get("estimate"))
        record.history = [EpochMetrics.from_dict(h) for h in d.get("history") or []]
        record.environment = {k: d[k] for k in ENVIRONMENT_KEYS if isinstance(d.get(k), str)}
        return record

    def time_to_target(self, target: float) -> dict[str, float] | None:
        return time_to_target([h.to_dict() for h in self.history], target)

    def summary(self, target: float | None = None) -> dict[str, Any]:
        """The short per-run row of a comparison."""
        return {"run_id": self.run_id, "model": self.model, "recipe": self.recipe, "seed": self.seed,
                "status": self.status, "test_accuracy": self.test_accuracy, "train_seconds": self.train_seconds,
                "epochs": len(self.history), "dataset_sha256": self.dataset.get("sha256"),
                "time_to_target": self.time_to_target(target) if target is not None else None}

    def __repr__(self) -> str:
        acc = "-" if self.test_accuracy is None else f"{100 * self.test_accuracy:.2f}%"
        return f"RunRecord({self.run_id!r}, {self.model}/{self.recipe}, seed {self.seed}, {self.status}, test {acc})"

    def to_json(self) -> str:
        """`to_dict` as JSON text (what `cifarbench train --json` prints)."""
        return json.dumps(self.to_dict(), indent=2)

    def plot(self, kind: str = "accuracy"):
        """The learning curve as a matplotlib Figure: test accuracy per epoch and second, or `kind="loss"`."""
        return display_hooks.figure(self, kind)

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


@dataclass(kw_only=True)
class ModelSummary:
    """One model's runs over seeds: accuracy mean and spread, cost, and time to a target."""

    model: str
    """The label: the model, with its recipe when several recipes of it are compared."""
    recipe: str
    seeds: list[int]
    test_accuracy_mean: float | None
    test_accuracy_std: float | None
    """Sample standard deviation over seeds; None with a single seed (its spread is unknown, not zero)."""
    train_seconds_mean: float | None
    train_seconds_std: float | None
    params: int | None
    flops_per_image: int | None
    time_to_target: dict[str, Any] | None
    run_ids: list[str]

    @classmethod
    def of(cls, runs: Sequence[RunRecord], label: str, target: float | None = None) -> ModelSummary:
        acc = [r.test_accuracy for r in runs if r.test_accuracy is not None]
        secs = [r.train_seconds for r in runs if r.train_seconds is not None]
        histories = [{"seed": r.seed, "run_id": r.run_id, "history": [h.to_dict() for h in r.history]} for r in runs]
        ttt = summarise_time_to_target(histories, target) if target is not None else None
        return cls(model=label, recipe=runs[0].recipe, seeds=[r.seed for r in runs],
                   test_accuracy_mean=statistics.fmean(acc) if acc else None,
                   test_accuracy_std=statistics.stdev(acc) if len(acc) > 1 else None,
                   train_seconds_mean=statistics.fmean(secs) if secs else None,
                   train_seconds_std=statistics.stdev(secs) if len(secs) > 1 else None, params=runs[0].params,
                   flops_per_image=runs[0].flops_per_image, time_to_target=ttt, run_ids=[r.run_id for r in runs])

    @property
    def macs_per_image(self) -> int | None:
        return None if self.flops_per_image is None else self.flops_per_image // 2

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_per_image": self.macs_per_image}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSummary:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(kw_only=True)
class Comparison:
    """Models compared over seeds: one summary per model, every run, and where the outputs went."""

    results: list[ModelSummary]
    runs: list[RunRecord]
    target: float | None = None
    dataset: dict | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    plot_file: str | None = None
    """The learning-curve PNG written for this comparison (`api.write_comparison`; `"plot"` in JSON); `plot()` draws
    the figure."""
    report: str | None = None
    jobs: int = 1
    environment: dict[str, str] = field(default_factory=dict)
    pairs: list[PairComparison] = field(default_factory=list)
    """Every pair of models: the accuracy difference over paired seeds with its 95% interval, and McNemar's
    exact test per seed when the runs' test predictions were available."""
    warnings: list[str] = field(default_factory=list)
    """Runs that look under-trained, near chance or diverged (`stats.training_warnings`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "runs": [r.summary(self.target) for r in self.runs],
                "pairs": [p.to_dict() for p in self.pairs], "warnings": list(self.warnings),
                "plot": self.plot_file, "report": self.report, "target": self.target, "dataset": self.dataset,
                "failures": self.failures, "jobs": self.jobs, **self.environment}

    def __repr__(self) -> str:
        rows = ", ".join(f"{r.model} {'-' if r.test_accuracy_mean is None else f'{100 * r.test_accuracy_mean:.2f}%'}"
                         for r in self.results)
        return f"Comparison({rows}; {len(self.runs)} runs)"

    def to_json(self) -> str:
        """`to_dict` as JSON text (what `cifarbench compare --json` prints)."""
        return json.dumps(self.to_dict(), indent=2)

    def plot(self, kind: str = "accuracy"):
        """The models' learning curves as a matplotlib Figure (mean over seeds, band = min-max), or `kind="loss"`."""
        return display_hooks.figure(self, kind)

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


def permutation_of(run: RunRecord) -> int | None:
    """The seed of the pixel permutation a run trained and tested under (None: the images as they are)."""
    value = (run.config.get("data") or {}).get("permute_pixels")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def group_runs(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by (model, code, recipe, pixel permutation), labelled by the model alone unless it comes
    with several versions of its code (a class edited and trained again: "code 1a2b3c4d"), several recipes, or
    permuted pixels."""
    key = lambda r: (r.model, r.config.get("model_sha256"), r.recipe, permutation_of(r))  # noqa: E731
    keys = list(dict.fromkeys(key(r) for r in runs))
    codes = {k[0]: {kk[1] for kk in keys if kk[0] == k[0]} for k in keys}
    recipes = {k[0]: {kk[2] for kk in keys if kk[0] == k[0]} for k in keys}
    permutations = {k[0]: {kk[3] for kk in keys if kk[0] == k[0] and kk[3] is not None} for k in keys}

    def label(model: str, code: str | None, recipe: str, permutation: int | None) -> str:
        parts = [f"code {code[:8]}"] if len(codes[model]) > 1 and code else []
        parts += [recipe] if len(recipes[model]) > 1 else []
        if permutation is not None:
            parts.append("permuted" if len(permutations[model]) == 1 else f"permuted {permutation}")
        return model + (f" ({', '.join(parts)})" if parts else "")

    return {label(*k): [r for r in runs if key(r) == k] for k in keys}


def short_labels(names: Iterable[str]) -> dict[str, str]:
    """Each model label as headings and tables show it, `Net` for `__main__:Net` (models.reference.label), unless
    two would then read the same: then every name stays whole."""
    from cifarbench.models.reference import label

    short = {name: label(name) for name in dict.fromkeys(names)}
    return short if len(set(short.values())) == len(short) else {name: name for name in short}


def summarise(runs: Sequence[RunRecord], target: float | None = None) -> list[ModelSummary]:
    """One summary per model (and recipe) of `runs`."""
    return [ModelSummary.of(rs, label, target) for label, rs in group_runs(runs).items()]
