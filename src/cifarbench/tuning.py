"""Honest hyperparameter search: Optuna's TPE over any config fields, each trial a stored run scored on the
validation split alone (its test set never evaluated), trials the median rule prunes stopped early, and the best
trial's model scored on the test set once, at the end. The study lives in the runs folder (Optuna's SQLite
storage), so the same command with more trials resumes it. Why and how: docs/distributed.md#tune.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cifarbench.config import TrainConfig
from cifarbench.errors import CifarbenchError, Keyword, Spelling, as_keyword, spelled
from cifarbench.runs.records import RunRecord

KINDS = ("log", "float", "int", "choice")
PARAM = Keyword("params")
"""The searched settings: `--param` on the command line, `params` in Python (errors.FLAGS)."""
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STUDIES = "studies"
"""The runs folder's subfolder of study databases (NAME.db)."""
WARMUP_EPOCHS = 1
"""The median rule judges a trial from its second epoch on: after one epoch every net is still mostly noise."""
STARTUP_TRIALS = 2
"""Trials that run whole before the median rule prunes anything (it needs others' curves to compare with)."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched config field and its distribution: `lr=log:1e-4:1e-1`, `model_kwargs.width=int:16:128`,
    `optimizer.name=choice:sgd,adamw`."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def extremes(self) -> list[Any]:
        """The values whose acceptance by the config shows the whole range is (each choice, both ends)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def __str__(self) -> str:
        spec = ",".join(map(str, self.choices)) if self.kind == "choice" else f"{self.low:g}:{self.high:g}"
        return f"{self.name}={self.kind}:{spec}"


def parse_param(text: str) -> ParamSpec:
    """`NAME=KIND:SPEC` as a ParamSpec (KIND log, float or int with LOW:HIGH; choice with A,B,...). NAME is a
    config field (`optimizer.lr`) or a run option's keyword for one (`lr`, as `train --lr` sets it)."""
    name, eq, spec = text.partition("=")
    name = _field_of(name.strip())
    kind, colon, rest = spec.partition(":")
    example = "e.g. optimizer.lr=log:1e-4:1e-1, model_kwargs.width=int:16:128 or optimizer.name=choice:sgd,adamw"
    if not eq or not name or not colon or kind not in KINDS:
        raise CifarbenchError("{option} {text!r}: expected NAME=KIND:SPEC with KIND one of {kinds}; {example}",
                              option=PARAM, text=text[:80], kinds=", ".join(KINDS), example=example)
    if kind == "choice":
        choices = tuple(_value(v) for v in rest.split(","))
        if not rest or len(set(map(json.dumps, choices))) != len(choices):
            raise CifarbenchError("{option} {name}: a choice needs distinct values, e.g. choice:sgd,adamw",
                                  option=PARAM, name=name)
        return ParamSpec(name, kind, choices=choices)
    low_text, _, high_text = rest.partition(":")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise CifarbenchError("{option} {name}={spec}: expected {kind}:LOW:HIGH; {example}", option=PARAM, name=name,
                              spec=spec[:60], kind=kind, example=example) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CifarbenchError("{option} {name}: needs finite LOW < HIGH (got {low:g}:{high:g})", option=PARAM,
                              name=name, low=low, high=high)
    if kind == "log" and low <= 0:
        raise CifarbenchError("{option} {name}: a log range needs LOW > 0 (got {low:g})", option=PARAM, name=name,
                              low=low)
    if kind == "int" and (low != int(low) or high != int(high)):
        raise CifarbenchError("{option} {name}: an int range needs whole numbers (got {low:g}:{high:g})",
                              option=PARAM, name=name, low=low, high=high)
    return ParamSpec(name, kind, low, high)


def _field_of(name: str) -> str:
    """The config field a run option's keyword sets (`lr` -> `optimizer.lr`); any other name as it is."""
    from cifarbench.options import run_options

    return next((o.field for o in run_options() if o.keyword == name and o.field), name)


def _value(text: str) -> Any:
    """A choice as `--set` reads a value: JSON (0.5, true) or, failing that, the string itself."""
    from cifarbench.config import parse_changes

    return parse_changes([f"choice={text}"])["choice"]


def check_params(base: TrainConfig, params: Sequence[ParamSpec]) -> None:
    """Every searched field exists and takes its whole range, by the same validation as `--set`."""
    if not params:
        raise CifarbenchError("tune needs at least one {option} NAME=KIND:SPEC to search", option=PARAM)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CifarbenchError("{option} names a field twice: {twice}", option=PARAM, twice=", ".join(twice))
    for param in params:
        for value in param.extremes():
            try:
                base.with_changes({param.name: value})
            except CifarbenchError as exc:
                raise CifarbenchError("{option} {param}: {reason}", option=PARAM, param=str(param),
                                      reason=exc) from None


def check_study_name(name: str) -> str:
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise CifarbenchError("{option} {name!r}: a study name is up to 64 letters, digits and ._- "
                              "(starting with a letter or digit)", option=Keyword("study"), name=str(name)[:80])
    return name


def study_path(name: str, runs_dir: str | os.PathLike | None) -> Path:
    """Where study `name` lives: RUNS_DIR/studies/NAME.db (a plain file of its own: a link there, symbolic or hard,
    and SQLite's journal files as links, are refused, since SQLite would write through them)."""
    from cifarbench.runs.folders import resolve_runs_dir

    folder = resolve_runs_dir(runs_dir) / STUDIES
    path = folder / f"{check_study_name(name)}.db"
    companions = [path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm")]
    if (folder.is_symlink() or path.is_symlink() or (path.exists() and not path.is_file())
            or (path.is_file() and path.stat().st_nlink > 1)
            or any(c.is_symlink() or (c.is_file() and c.stat().st_nlink > 1) for c in companions)):
        raise CifarbenchError(f"{path} is not a plain file in the runs folder; refusing to use it as a study")
    return path


@dataclass(kw_only=True)
class TrialRun:
    """One trial: its number, Optuna's verdict, the validation accuracy it reached, and its stored run."""

    number: int
    state: str
    """complete, pruned or fail."""
    value: float | None
    """Validation accuracy after its last epoch (what TPE maximises)."""
    run_id: str | None
    params: dict[str, Any]
    epochs: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class TuneResult:
    """A study after this call: every trial, the best by validation accuracy, and that trial's one test score."""

    study: str
    storage: str
    base: dict[str, Any]
    params: list[str]
    trials: list[TrialRun]
    best: TrialRun | None
    test_accuracy: float | None = None
    """The best trial's model on the test set: its only test evaluation."""
    tested_now: bool = False
    """False when the best trial had been scored on the test set by an earlier call (not scored again)."""
    importances: dict[str, float] = field(default_factory=dict)
    new_trials: int = 0
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("trials", "best")},
                "trials": [t.to_dict() for t in self.trials], "best": self.best.to_dict() if self.best else None}


def tune(base: TrainConfig, params: Sequence[ParamSpec], *, trials: int, study: str | None = None,
         executor: str = "local", address: str | None = None, jobs: int = 1, seed: int = 0,
         runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
         on_trial: Callable[[TrialRun], None] | None = None, spelling: Spelling = as_keyword) -> TuneResult:
    """Run `trials` more trials of the study `study` (default: tune-MODEL) on `base` with `params` searched; what
    the trials say names options by `spelling` (the CLI's flags, the API's keywords).

    `trials` 0 runs none: the study so far is reported, its best trial scored on the test set if it was not.
    Each trial is a stored run trained without its test set, scored by its validation accuracy (`base.val_split`
    examples held out of the training set: required). Locally, the median rule prunes a trial whose validation
    accuracy after an epoch is below the median of earlier trials' at that epoch; on Ray (`executor`) trials run
    `jobs` at a time and whole. At the end the best trial's model is scored on the test set, once (a later call
    whose best trial is the same reuses that score).
    """
    from cifarbench import runtime
    from cifarbench.executors import check_executor, require

    runtime.configure()
    if base.val_split <= 0:
        raise CifarbenchError("tune needs {option}: trials are compared on held-out training images, since "
                              "picking settings by test accuracy overstates it (the test set is scored once, at the "
                              "end, for the best trial only)", option=Keyword("val_split", ...))
    if trials < 0 or jobs < 1:  # --trials 0: no new trial, the study's best scored (once) and reported
        raise CifarbenchError("{trials} must be at least 0 and {jobs} at least 1", trials=Keyword("trials"),
                              jobs=Keyword("jobs"))
    check_executor(executor, address)
    require("optuna", "tune", "tune")
    check_params(base, params)
    name = check_study_name(f"tune-{_safe(base.model)}" if study is None else study)
    base = replace(base, eval_every_epoch=False)
    opened = _open_study(name, base, params, seed, runs_dir)
    from cifarbench.data import load_dataset

    dataset = load_dataset(base.data, progress=progress)
    before = len(opened.trials)
    if executor == "ray":
        _trials_on_ray(opened, base, params, trials, jobs, runs_dir, address, on_trial, spelling)
    else:
        _trials_here(opened, base, params, trials, runs_dir, dataset, progress, on_trial, spelling)
    result = _result(opened, name, runs_dir, base, params)
    result.new_trials = len(opened.trials) - before
    if result.best is not None:
        result.test_accuracy, result.tested_now = _test_once(opened, result.best, dataset, runs_dir)
    return result


def _safe(model: str) -> str:
    from cifarbench.models.reference import label

    return re.sub(r"[^A-Za-z0-9._-]+", "-", label(model)).strip("-.")[:50] or "model"


def _open_study(name: str, base: TrainConfig, params: Sequence[ParamSpec], seed: int,
                runs_dir: str | os.PathLike | None) -> Any:
    """The study, created or (same base config and search space) resumed; another config is refused, since its
    trials would not be comparable."""
    import sqlite3

    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = study_path(name, runs_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, len(params) * 2)))
    # Steps are epochs counted from 1, and Optuna prunes from step == n_warmup_steps on.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=WARMUP_EPOCHS + 1)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as exc:  # a file that is not a study database
        why = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
        raise CifarbenchError("{path} cannot be opened as a study ({why}); pass another {option} or remove the file",
                              path=path, why=why, option=Keyword("study", ...)) from None
    fixed = json.loads(json.dumps(base.to_dict()))
    space = sorted(str(p) for p in params)
    if "base" not in study.user_attrs:
        study.set_user_attr("base", fixed)
        study.set_user_attr("space", space)
    elif study.user_attrs["base"] != fixed or study.user_attrs.get("space") != space:
        differ = sorted(k for k in set(fixed) | set(study.user_attrs["base"])
                        if fixed.get(k) != study.user_attrs["base"].get(k))
        raise CifarbenchError("study {name!r} ({path}) searched {space} over another config (differs in: {differ}); "
                              "its trials would not compare with these: pass {option} with a new name", name=name,
                              path=path, space=", ".join(map(str, study.user_attrs.get("space", []))),
                              differ=", ".join(differ) or "the searched fields", option=Keyword("study", ...))
    return study


def _trial_config(base: TrainConfig, trial: Any, params: Sequence[ParamSpec]) -> TrainConfig:
    return base.with_changes({p.name: p.suggest(trial) for p in params})


def _trials_here(study: Any, base: TrainConfig, params: Sequence[ParamSpec], trials: int,
                 runs_dir: str | os.PathLike | None, dataset: Any, progress: bool | None,
                 on_trial: Callable[[TrialRun], None] | None, spelling: Spelling) -> None:
    import optuna

    from cifarbench.models.reference import label
    from cifarbench.running import train_run
    from cifarbench.runs import folders
    from cifarbench.runs.store import RunStore

    for _ in range(trials):
        trial = study.ask()
        config = _trial_config(base, trial, params)
        run_id = folders.new_run_id(label(config.model), config.seed)
        trial.set_user_attr("run_id", run_id)
        reached: list[float] = []

        def report(metrics: Any, trial: Any = trial, reached: list[float] = reached) -> None:
            reached.append(metrics.val_accuracy)
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {metrics.val_accuracy:.4f} after epoch {metrics.epoch} "
                                         "is below the median of earlier trials there")

        try:
            train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress, on_epoch=report, run_id=run_id,
                      score_test=False, spelling=spelling)
        except optuna.TrialPruned as pruned:
            with RunStore(runs_dir) as store:  # the run stopped on purpose: recorded as pruned, not failed
                store.finish_run(run_id, "pruned", error=str(pruned))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            _announce(on_trial, TrialRun(number=trial.number, state="pruned", value=reached[-1], run_id=run_id,
                                         params=trial.params, epochs=len(reached), error=str(pruned)))
            continue
        except KeyboardInterrupt as exc:  # the study keeps its finished trials; this one counts as failed
            from cifarbench.errors import Interrupted

            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise Interrupted(f"tune interrupted in trial {trial.number} (run {run_id}, recorded as failed); the "
                              f"study {study.study_name} keeps its {trial.number} earlier trials: the same command "
                              "adds trials to it", signal_name=getattr(exc, "signal_name", "SIGINT")) from None
        except CifarbenchError as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _announce(on_trial, TrialRun(number=trial.number, state="fail", value=None, run_id=run_id,
                                         params=trial.params, epochs=len(reached), error=spelled(exc, spelling)))
            continue
        study.tell(trial, reached[-1])
        _announce(on_trial, TrialRun(number=trial.number, state="complete", value=reached[-1], run_id=run_id,
                                     params=trial.params, epochs=len(reached)))


def _announce(on_trial: Callable[[TrialRun], None] | None, trial: TrialRun) -> None:
    if on_trial:
        on_trial(trial)


def _trials_on_ray(study: Any, base: TrainConfig, params: Sequence[ParamSpec], trials: int, jobs: int,
                   runs_dir: str | os.PathLike | None, address: str | None,
                   on_trial: Callable[[TrialRun], None] | None, spelling: Spelling) -> None:
    """`jobs` trials at a time, each a Ray task trained whole (its curve reaches the study when it returns, too
    late to prune it), told to the study with every epoch's validation accuracy."""
    import optuna

    from cifarbench.executors import train_on_ray

    by_run: dict[str, Any] = {}  # run id -> its trial, until the run arrives
    by_config: dict[int, Any] = {}

    def launched(config: TrainConfig, run_id: str) -> None:
        trial = by_config.pop(id(config))
        trial.set_user_attr("run_id", run_id)
        by_run[run_id] = trial

    def arrived(run: RunRecord) -> None:
        trial = by_run.pop(run.run_id)
        for h in run.history:
            trial.report(h.val_accuracy, h.epoch)
        value = run.history[-1].val_accuracy
        study.tell(trial, value)
        _announce(on_trial, TrialRun(number=trial.number, state="complete", value=value, run_id=run.run_id,
                                     params=trial.params, epochs=len(run.history)))

    left = trials
    while left > 0:
        batch = [study.ask() for _ in range(min(jobs, left))]
        left -= len(batch)
        configs = [_trial_config(base, t, params) for t in batch]
        by_config.update({id(c): t for c, t in zip(configs, batch, strict=True)})
        failures: list[dict[str, Any]] = []
        try:
            failures = train_on_ray(configs, jobs, runs_dir, arrived, address=address, score_test=False,
                                    on_launch=launched, spelling=spelling)
        finally:  # what never arrived failed (or was cancelled by Ctrl-C)
            for run_id, trial in list(by_run.items()):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                why = next((f["error"] for f in failures if f.get("run_id") == run_id), "interrupted")
                _announce(on_trial, TrialRun(number=trial.number, state="fail", value=None, run_id=run_id,
                                             params=trial.params, error=why))
            by_run.clear()


def _result(study: Any, name: str, runs_dir: str | os.PathLike | None, base: TrainConfig,
            params: Sequence[ParamSpec]) -> TuneResult:
    import optuna

    states = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned",
              optuna.trial.TrialState.FAIL: "fail", optuna.trial.TrialState.RUNNING: "running",
              optuna.trial.TrialState.WAITING: "waiting"}
    runs = []
    for t in study.trials:
        steps = t.intermediate_values
        value = t.value if t.value is not None else steps[max(steps)] if steps else None
        runs.append(TrialRun(number=t.number, state=states[t.state], value=value, run_id=t.user_attrs.get("run_id"),
                             params=t.params, epochs=len(steps)))
    complete = [r for r in runs if r.state == "complete" and r.value is not None]
    best = max(complete, key=lambda r: (r.value, -r.number)) if complete else None
    importances: dict[str, float] = {}
    if len(complete) >= 2:  # Optuna's importances need two finished trials, and some spread among them
        import warnings

        try:
            with warnings.catch_warnings():  # with a few trials it warns that all importances come out equal
                warnings.simplefilter("ignore")
                importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError, ZeroDivisionError):
            importances = {}
    return TuneResult(study=name, storage=str(study_path(name, runs_dir)),
                      base=study.user_attrs.get("base", base.to_dict()), params=[str(p) for p in params],
                      trials=runs, best=best, importances=importances)


def _test_once(study: Any, best: TrialRun, dataset: Any, runs_dir: str | os.PathLike | None
               ) -> tuple[float | None, bool]:
    """The best trial's model on the test set: scored here unless an earlier call scored it (the study keeps
    the score), and stored as that run's test accuracy."""
    key = f"test_accuracy:{best.number}"
    if key in study.user_attrs:
        return float(study.user_attrs[key]), False
    if best.run_id is None:
        return None, False
    accuracy = score_on_test(best.run_id, dataset, runs_dir)
    study.set_user_attr(key, accuracy)
    return accuracy, True


def score_on_test(run_id: str, dataset: Any, runs_dir: str | os.PathLike | None) -> float:
    """A trial's checkpoint on the whole test set, with its own test-time augmentation; the run keeps the score
    (its history row and metrics.json)."""
    from cifarbench.inference import load_trained_model
    from cifarbench.runs import folders
    from cifarbench.runs.store import RunStore

    loaded = load_trained_model(run_id, runs_dir=runs_dir, device="auto")
    result = loaded.evaluate(loaded.test_dataset(dataset=dataset))
    with RunStore(runs_dir) as store:
        record = store.record(run_id)
        record.test_accuracy, record.test_loss = result.accuracy, result.loss
        record.per_class_accuracy, record.confusion = result.per_class_accuracy, result.confusion
        store.finish_run(run_id, "completed", record=record)
    metrics = folders.run_folder(runs_dir, run_id) / folders.METRICS
    if metrics.is_file():
        try:
            stored = json.loads(metrics.read_text())
            stored.update(test_accuracy=result.accuracy, test_loss=result.loss,
                          per_class_accuracy=result.per_class_accuracy, confusion=result.confusion)
            folders.write_json(metrics, stored)
        except (OSError, ValueError):
            pass
    return float(result.accuracy)


def trial_histories(result: TuneResult, runs_dir: str | os.PathLike | None) -> dict[int, list[dict]]:
    """Each trial's stored epochs (validation curves), by trial number."""
    from cifarbench.runs.store import RunStore

    out: dict[int, list[dict]] = {}
    with RunStore(runs_dir, read_only=True) as store:
        for trial in result.trials:
            if trial.run_id:
                try:
                    out[trial.number] = store.get_run(trial.run_id).get("history") or []
                except CifarbenchError:
                    continue
    return out
