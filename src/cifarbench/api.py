"""The Python API: what the CLI does, as functions whose keywords are the CLI's flags, returning typed results.

    import cifarbench as cb
    run = cb.train("cnn", epochs=2, data_dir="data", verify=False)      # or cb.train(MyCNN, ...): your own class
    cmp = cb.compare(["cnn", MyCNN], seeds=3, recipe="seed")

Results display themselves in a notebook and have `to_dict()` for scripts. Errors name these keywords
(`verify=False`), where the CLI's name its flags (`--no-verify`). Lower-level pieces live in `running`,
`comparing`, `inference`, `reporting.report` and `runs`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cifarbench import options, runtime
from cifarbench.classroom import Grading, Submission, submit
from cifarbench.comparing import compare as compare_configs
from cifarbench.comparing import compare_runs
from cifarbench.config import TrainConfig
from cifarbench.errors import CifarbenchError, unknown_keyword
from cifarbench.explaining import (
    ExperimentReport,
    Explanation,
    PermutationReport,
    explain_runs,
    permutation_experiment,
    run_experiment,
)
from cifarbench.exploring import DataOverview
from cifarbench.exploring import explore as explore_data
from cifarbench.inference import (
    Evaluation,
    TrainedModel,
    evaluate_checkpoint,
    load_trained_model,
    predict_images,
    predict_test_set,
    score_images,
)
from cifarbench.models.reference import reference_of
from cifarbench.options import config_arguments
from cifarbench.progress import EpochPrinter
from cifarbench.reporting import display as _display  # noqa: F401 - registers each record's notebook view
from cifarbench.running import train_run
from cifarbench.runs.bundle import export_runs, import_runs
from cifarbench.runs.catalog import delete_run, stored_runs
from cifarbench.runs.limits import BundleLimits
from cifarbench.runs.records import Comparison, ModelSummary, RunRecord
from cifarbench.sandbox import Limits
from cifarbench.training.recipes import config_for, make_config
from cifarbench.tuning import TuneResult

__all__ = ["BundleLimits", "Comparison", "DataOverview", "Evaluation", "ExperimentReport", "Explanation", "Grading",
           "Limits", "ModelSummary", "PermutationReport", "RunRecord", "Submission", "TrainedModel", "build_report",
           "compare", "compare_configs", "compare_runs", "delete_run", "evaluate", "evaluate_checkpoint",
           "experiment", "explain", "explain_runs", "explore", "export_runs", "grade", "import_runs", "load",
           "load_trained_model", "make_config", "permutation", "permutation_experiment", "predict", "predict_images",
           "predict_test_set", "report", "report_runs", "run_config", "run_experiment", "run_history",
           "score_images", "stored_runs", "submit", "train", "train_run", "tune", "TuneResult", "write_comparison",
           "write_study"]

Model = str | type | Callable[..., Any]
"""A registered model's name, `file.py:Name`, `module:Name`, or an nn.Module subclass or factory itself."""


Runs = str | os.PathLike | RunRecord | Comparison | PermutationReport | Sequence[str | os.PathLike | RunRecord]
"""Stored runs: run ids or folders, RunRecords, or a Comparison or PermutationReport (all its runs)."""


def _ref(model: Model) -> str:
    return model if isinstance(model, str) else reference_of(model)


def run_config(model: Model, **choices: Any) -> TrainConfig:
    """The full typed config a run would train with: the recipe's, with `choices` (the same choices as
    `cifarbench train` and its flags). A keyword left out, or None, keeps the recipe's choice."""
    _check_keywords(run_config, choices)
    return config_for(_ref(model), **config_arguments(choices))


def _takes_run_options(function: Callable[..., Any], *, seed: bool = True) -> None:
    """Give `function`, which takes the run options as `**choices`, a signature and docstring that list them:
    tab completion and `help()` show each keyword, generated from the one table (cifarbench.options)."""
    own = [p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
    function.__signature__ = inspect.Signature([*own, *options.parameters(seed=seed)],  # type: ignore[attr-defined]
                                               return_annotation=inspect.signature(function).return_annotation)
    function.__doc__ = f"{function.__doc__}\n\n    Run options (each also a `cifarbench train` flag):\n" \
                       f"{options.keyword_docs(seed=seed)}\n"


_takes_run_options(run_config)


def _check_keywords(function: Callable[..., Any], given: dict[str, Any], *, extra: Sequence[str] = (),
                    where: str | None = None) -> None:
    """Refuse a keyword `function` does not take with a CifarbenchError that suggests the right one, instead of
    the TypeError Python would raise from deep inside (`no_verify=True` -> `verify=False`)."""
    known = [*(n for n in inspect.signature(function).parameters if n != "model"), *extra]
    for name in given:
        if name not in known:
            raise unknown_keyword(name, known, where or function.__name__)


def train(model: Model, *, runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
          on_epoch: Callable[[TrainConfig, Any], None] | None = None, **choices: Any) -> RunRecord:
    """Train one model and record the run; `choices` are `run_config`'s keywords (epochs=, lr=, verify=False, ...).

    A class or factory you pass is recorded with its source code, so the run can be evaluated and compared later
    even after you change it; running its cell again and training again just works. One line per epoch goes to
    the cell's output in a notebook, to stderr from a script (pass `on_epoch` to do something else with each
    epoch's metrics)."""
    _check_keywords(run_config, choices, extra=("runs_dir", "progress", "on_epoch"), where="train")
    runtime.configure()
    cfg = run_config(model, **choices)
    show = on_epoch or EpochPrinter()
    return train_run(cfg, runs_dir=runs_dir, progress=progress, on_epoch=lambda m: show(cfg, m))


_takes_run_options(train)


def compare(models: Sequence[Model], *, seeds: int = 1, jobs: int = 1, target: float | None = None,
            report: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
            runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
            on_epoch: Callable[[TrainConfig, Any], None] | None = None, retrain: bool = False,
            executor: str = "local", address: str | None = None, **choices: Any) -> Comparison:
    """Train every model for `seeds` seeds on the same data and compare them (`cifarbench compare`); finished runs
    with the same config, code, seed and data are reused unless `retrain`. `executor="ray"` runs each training as
    a task on the Ray cluster at `address` (a local one without; needs the [ray] extra)."""
    _check_keywords(run_config, choices, extra=("seeds", "jobs", "target", "report", "plot", "runs_dir", "progress",
                                            "on_epoch", "retrain", "executor", "address"), where="compare")
    refs = [_ref(m) for m in models]
    if (jobs > 1 or executor == "ray") and any(r.startswith("__main__:") for r in refs):
        raise CifarbenchError("jobs > 1 (or executor='ray') runs models in worker processes, which cannot see classes "
                              "defined in a notebook or script; put the class in a .py file and pass 'file.py:Name'")
    seed_given = choices.pop("seed", None)
    if seed_given is not None:
        raise CifarbenchError("compare trains seeds 0..seeds-1; pass seeds, not seed")
    comparison = compare_configs(refs, lambda m, s: run_config(m, seed=s, **choices), seeds=seeds, jobs=jobs,
                                 target=target, runs_dir=runs_dir, progress=progress,
                                 on_epoch=on_epoch or EpochPrinter(), retrain=retrain, executor=executor,
                                 address=address,
                                 on_reuse=lambda r: print(f"reusing run {r.run_id} ({r.model}, seed {r.seed}): "
                                                          "finished with the same config and data (retrain=True "
                                                          "trains it again)"))
    return write_comparison(comparison, plot=plot, report=report, runs_dir=runs_dir,
                            device=choices.get("device", "auto"), progress=progress)


def write_comparison(comparison: Comparison, *, plot: str | os.PathLike | None = None,
                     report: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
                     device: str = "auto", progress: bool | None = None) -> Comparison:
    """Write a compare's learning-curve figure to `plot` (default: RUNS_DIR/compare-TIME.png) and, with `report`,
    its HTML report; the comparison records where (`plot_file`, `report`)."""
    import time

    from cifarbench.reporting.plots import plot_learning_curves
    from cifarbench.runs.folders import resolve_runs_dir

    path = Path(plot) if plot else resolve_runs_dir(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.png"
    runs = comparison.runs
    plot_learning_curves({s.model: [[h.to_dict() for h in r.history] for r in runs if r.run_id in s.run_ids]
                          for s in comparison.results}, path, target=comparison.target)
    comparison.plot_file = str(path)
    if report:
        comparison.report = str(build_report(runs, comparison.results, report, target=comparison.target,
                                             device=device, runs_dir=runs_dir, progress=progress))
    return comparison


_takes_run_options(compare, seed=False)


def tune(model: Model, params: Sequence[str], *, trials: int = 10, val_split: int | None = None,
         study: str | None = None, executor: str = "local", address: str | None = None, jobs: int = 1,
         seed: int = 0, runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
         report: str | os.PathLike | None = None, **choices: Any) -> TuneResult:
    """Search config fields with Optuna (`cifarbench tune`): `params` such as ["optimizer.lr=log:1e-3:3e-1"], each
    trial a run scored on `val_split` held-out training images (required), the best scored on the test set once.
    `choices` are `run_config`'s keywords for every trial (epochs=, verify=False, ...); `report` also writes the
    study's HTML report there (`write_study`). Needs the [tune] extra."""
    from cifarbench.tuning import parse_param
    from cifarbench.tuning import tune as tune_config

    _check_keywords(run_config, choices, where="tune")
    if isinstance(params, str):
        params = [params]
    specs = [parse_param(p) for p in params]
    result = tune_config(run_config(model, seed=seed, val_split=val_split, **choices), specs, trials=trials,
                         study=study, executor=executor, address=address, jobs=jobs, seed=seed, runs_dir=runs_dir,
                         progress=progress,
                         on_trial=lambda t: print(f"trial {t.number}: {t.state}, validation "
                                                  f"{'-' if t.value is None else f'{100 * t.value:.2f}%'} "
                                                  f"({t.run_id})"))
    return write_study(result, report, runs_dir=runs_dir) if report else result


def write_study(result: TuneResult, out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None
                ) -> TuneResult:
    """Write a tune's HTML report (optimisation history, parameter importances, the best trial's curves) to
    `out`; the result records where (`report`)."""
    from cifarbench.reporting.study import write_study_report
    from cifarbench.tuning import trial_histories

    result.report = str(write_study_report(result, trial_histories(result, runs_dir), out))
    return result


def _run_ids(runs: Runs) -> list[str]:
    """Run ids from what a notebook has at hand: ids or folders, RunRecords, or a result's runs."""
    if isinstance(runs, (Comparison, PermutationReport)):
        runs = runs.runs
    elif isinstance(runs, (str, os.PathLike, RunRecord)) or not isinstance(runs, Iterable):
        runs = [runs]
    bad = [r for r in runs if not isinstance(r, (str, os.PathLike, RunRecord))]
    if bad:
        raise CifarbenchError(f"runs: expected run ids, RunRecords or a Comparison, not {type(bad[0]).__name__}")
    return [r.run_id if isinstance(r, RunRecord) else os.fspath(r) for r in runs]


def explain(runs: Runs, out: str | os.PathLike, **kwargs: Any) -> Explanation:
    """Draw what stored runs learnt into the folder `out` (`cifarbench explain`): FNN templates, conv filters and
    feature maps, saliency maps (Captum: the `interpret` extra), the capacity and robustness figures. `runs`: run
    ids, RunRecords, or a Comparison's runs."""
    _check_keywords(explain_runs, kwargs, where="explain")
    return explain_runs(_run_ids(runs), out, **kwargs)


def experiment(name: str, runs: Runs, **kwargs: Any) -> ExperimentReport:
    """The translation or corruption experiment on stored runs (`cifarbench experiment translation|corruption`);
    each result is kept in its run's experiments.json. `runs`: run ids, RunRecords, or a Comparison's runs."""
    _check_keywords(run_experiment, kwargs, where="experiment")
    return run_experiment(name, _run_ids(runs), **kwargs)


def permutation(models: Sequence[Model], *, seeds: int = 3, permutation_seed: int = 0, reuse: bool = True,
                runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
                on_epoch: Callable[[TrainConfig, Any], None] | None = None, **choices: Any) -> PermutationReport:
    """Train each model on plain and on pixel-permuted images over `seeds` seeds and compare
    (`cifarbench experiment permutation`); `choices` are `config`'s keywords (recipe=, epochs=, verify=False)."""
    _check_keywords(run_config, choices, where="permutation")
    runtime.configure()
    refs = [_ref(m) for m in models]
    return permutation_experiment(refs, lambda m, s: run_config(m, seed=s, **choices), seeds=seeds,
                                  permutation_seed=permutation_seed, reuse=reuse, runs_dir=runs_dir,
                                  progress=progress, on_epoch=on_epoch or EpochPrinter())


_takes_run_options(permutation, seed=False)


def evaluate(run: str, **kwargs: Any) -> Evaluation:
    """A trained run (id, folder or checkpoint) scored on the whole test set (`cifarbench eval`)."""
    _check_keywords(evaluate_checkpoint, kwargs, where="evaluate")
    return evaluate_checkpoint(run, **kwargs)


def predict(run: str, images: Sequence[str | os.PathLike], *, labels: str | os.PathLike | None = None,
            **kwargs: Any) -> Any:
    """Classify image files (or folders of them) with a trained run (`cifarbench predict`); with `labels` (a CSV of
    filename,label rows), score them instead: an ImageScore with accuracy, per-class accuracy and confusion."""
    if labels is not None:
        _check_keywords(score_images, kwargs, where="predict")
        return score_images(run, images, labels, **kwargs)
    _check_keywords(predict_images, kwargs, where="predict")
    return predict_images(run, images, **kwargs)


def report_runs(refs: Sequence[str], out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                target: float | None = None, data_dir: str | None = None, verify: bool | None = None,
                download: bool | None = None, device: str = "auto", progress: bool | None = None,
                trust_code: bool = False) -> Comparison:
    """One self-contained HTML report of stored runs: table, learning curves, per-class accuracy, confusion
    matrices, the most confident mistakes, configs and the data fingerprint. Returns the comparison."""
    from cifarbench.comparing import check_target
    from cifarbench.provenance import environment
    from cifarbench.reporting.report import render_report
    from cifarbench.reports import report_content

    check_target(target)
    runs = stored_runs(refs, runs_dir=runs_dir)
    content = report_content(runs, target=target, data_dir=data_dir, verify=verify, download=download,
                             device=device, progress=progress, runs_dir=runs_dir, trust_code=trust_code)
    path = render_report(content, out)
    return Comparison(results=content.results, runs=runs, target=target, report=str(path),
                      environment=environment(), pairs=content.pairs, warnings=content.warnings)


def build_report(runs: Sequence[RunRecord], results: Sequence[ModelSummary], out: str | os.PathLike, *,
                 target: float | None = None, dataset: Any = None, data_dir: str | None = None,
                 verify: bool | None = None, download: bool | None = None, device: str = "auto",
                 progress: bool | None = None, title: str | None = None, gallery: int = 8,
                 runs_dir: str | os.PathLike | None = None, trust_code: bool = False, explain: bool = True) -> Path:
    """Write the HTML report of `runs` (summarised as `results`): per-example figures and McNemar's test from each
    run's stored predictions (`dataset`: the test data as read, else read from the runs' own data config). With
    `explain`, the first seed of each model also gets its interpretation gallery."""
    from cifarbench.reporting.report import render_report
    from cifarbench.reports import report_content

    content = report_content(runs, results, target=target, dataset=dataset, data_dir=data_dir, verify=verify,
                             download=download, device=device, progress=progress, runs_dir=runs_dir,
                             trust_code=trust_code, explain=explain)
    return render_report(content, out, title=title, gallery=gallery)


def grade(inbox: str | os.PathLike, *, out: str | os.PathLike | None = None, write: bool = True,
          **kwargs: Any) -> Grading:
    """Grade every submission in `inbox` (`cifarbench grade`, see `classroom.grade`) and, unless `write` is False,
    write `leaderboard.html` and `leaderboard.csv` into `out` (default: the inbox)."""
    from cifarbench.classroom import grade as grade_inbox
    from cifarbench.reporting.leaderboard import check_leaderboard_folder, write_leaderboard

    _check_keywords(grade_inbox, kwargs, where="grade")
    folder = Path(out).expanduser() if out else Path(inbox).expanduser()
    if write:
        check_leaderboard_folder(folder)
    result = grade_inbox(inbox, out=out, **kwargs)
    return write_leaderboard(result, folder) if write else result


def report(runs: Runs, out: str | os.PathLike, **kwargs: Any) -> Comparison:
    """One self-contained HTML report of stored runs (`cifarbench report`); `runs`: run ids, RunRecords, or a
    Comparison's runs."""
    _check_keywords(report_runs, kwargs, where="report")
    return report_runs(_run_ids(runs), out, **kwargs)


def load(run: str, **kwargs: Any) -> TrainedModel:
    """A trained run's model, ready for inference (its `.model` is an ordinary nn.Module)."""
    _check_keywords(load_trained_model, kwargs, where="load")
    return load_trained_model(run, **kwargs)


def explore(*, dataset: str = "cifar10", data_dir: str | os.PathLike | None = None, verify: bool = True,
            download: bool = True, per_class: int = 10, split: str = "train", seed: int = 0,
            out: str | os.PathLike | None = None, progress: bool | None = None) -> DataOverview:
    """A first look at the data (`cifarbench explore`): images per class, and a grid of examples of each class
    that shows itself in a notebook (`.plot()` returns it as a matplotlib Figure)."""
    return explore_data(dataset=dataset, data_dir=data_dir, verify=verify, download=download, per_class=per_class,
                        split=split, seed=seed, out=out, progress=progress)


def run_history(*refs: str, runs_dir: str | os.PathLike | None = None, limit: int = 50) -> list[RunRecord]:
    """Stored runs: the ones named, or the newest `limit` (`cifarbench runs`)."""
    if refs:
        return stored_runs(refs, runs_dir=runs_dir)
    from cifarbench.runs.store import RunStore

    with RunStore(runs_dir, read_only=True) as store:
        return [RunStore.to_record(row) for row in store.list_runs(limit)]
