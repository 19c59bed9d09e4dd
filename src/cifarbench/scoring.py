"""Stored runs' test-set scores, image by image: what `compare`, `runs compare`, the report and the permutation
experiment pair their statistics on (McNemar's test), from one rule.

Each run's own final evaluation is reused: the predictions it stored (`runs.predictions`) are exactly those behind
its reported accuracy, so nothing is evaluated again. A run trained before predictions were kept is evaluated from
its checkpoint with its own recorded evaluation settings (the TTA its final evaluation used), and that is said in
one line. A run from elsewhere (imported, copied) is always evaluated here from its checkpoint (its code runs only
with `trust_code`): the predictions it brings are its sender's word, and a forged file could decide a paired test
that the checkpoint would not.

The data copy, one rule: the test set is read once per data set and copy (by fingerprint, as read); a run gets it
as it saw it (`prepare`: e.g. its pixels permuted), and a run trained on another copy gets that copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset, original, prepare
from cifarbench.errors import CifarbenchError
from cifarbench.models.registry import check_foreign_model
from cifarbench.progress import say
from cifarbench.runs import folders
from cifarbench.runs.predictions import StoredPredictions, read_predictions
from cifarbench.runs.records import RunRecord


@dataclass(frozen=True, kw_only=True)
class RunScore(StoredPredictions):
    """One run's final test-set evaluation, image by image, in test-set order (the stored record's fields), with
    the run it belongs to and where it came from."""

    run_id: str
    stored: bool
    """True: the run's own stored predictions; False: evaluated here from its checkpoint."""


@dataclass
class Scores:
    """`score_runs`' answer: each scored run's score by run id, the test sets read (when any was), and notes."""

    runs: dict[str, RunScore] = field(default_factory=dict)
    datasets: dict[str, ImageDataset] = field(default_factory=dict)
    """Each run's test data as it saw it, by run id (only where it was read: `need_data`, or to score the run)."""
    notes: list[str] = field(default_factory=list)

    def correct(self) -> dict[str, np.ndarray]:
        """Per run id: each test image classified right or wrong (what McNemar's test compares)."""
        return {run_id: s.correct for run_id, s in self.runs.items()}


class TestCopies:
    """The test data read so far, by the fingerprint of the copy as read (`original`): the one rule for which copy
    a stored run is scored, reported or explained on."""

    def __init__(self, dataset: ImageDataset | None, progress: bool | None, data: dict[str, Any]) -> None:
        self.by_sha = {original(dataset).sha256: original(dataset)} if dataset is not None else {}
        self.given, self.progress, self.data = dataset, progress, data
        self.told: set[tuple[str, str]] = set()

    def seen_by(self, run: RunRecord, config: TrainConfig, *, own: bool) -> ImageDataset:
        """The test data as `run` saw it: the given data set serves every run; else a copy with the run's base
        fingerprint, read where the run's data config says (a run from elsewhere: the local defaults)."""
        recorded = run.dataset or {}
        base = self.given if self.given is not None else self.by_sha.get(
            recorded.get("base_sha256") or recorded.get("sha256"))
        if base is None:
            base = original(load_dataset(config.data.for_loading(foreign=not own, **self.data),
                                         progress=self.progress))
            self.by_sha[base.sha256] = base
        seen = prepare(base, config.data)
        trained_on = str(recorded.get("sha256"))
        if seen.sha256 != trained_on and (trained_on, seen.sha256) not in self.told:
            self.told.add((trained_on, seen.sha256))
            say(f"note: run {run.run_id} was trained on data with fingerprint {trained_on[:12]}..., not this copy's "
                f"({seen.sha256[:12]}...)", enabled=self.progress)
        return seen


def score_runs(runs: Sequence[RunRecord], *, dataset: ImageDataset | None = None, need_data: bool = False,
               device: str = "auto", runs_dir: str | os.PathLike | None = None, trust_code: bool = False,
               progress: bool | None = None, data_dir: str | None = None, verify: bool | None = None,
               download: bool | None = None) -> Scores:
    """Each run's per-image test-set predictions, reused from its final evaluation where stored (see the module
    docstring for the rule). `dataset` is the test data as read, when the caller has it; `need_data` also reads
    it for runs whose own stored predictions need none (the report draws its images). Runs without a checkpoint
    or stored predictions are left out, with a note; a damaged predictions file is said, and the run evaluated."""
    copies = TestCopies(dataset, progress, {"data_dir": data_dir, "verify": verify, "download": download})
    scores = Scores()
    for run in runs:
        folder = Path(run.run_dir) if run.run_dir else None
        if folder is None:
            continue
        own = run.origin is None
        try:
            config = TrainConfig.from_dict(run.config)
        except CifarbenchError:
            config = None
        if not own and config is not None:  # data never names code: a run that does is refused, not scored
            check_foreign_model(config.model, config.model_sha256, source=f"run {run.run_id!r}")
        if dataset is not None and config is not None and config.data.dataset != dataset.name:
            raise CifarbenchError(f"run {run.run_id} was trained on {config.data.dataset}, not {dataset.name}; "
                                  "McNemar's test compares predictions on one test set")
        try:
            stored = read_predictions(folder) if config is not None and own else None
        except CifarbenchError as exc:  # damaged: evaluated here instead
            stored = None
            scores.notes.append(str(exc))
        seen = None
        if stored is not None and (need_data or dataset is not None):
            seen = copies.seen_by(run, config, own=own)
            stored = _matching(stored, seen)
        if stored is not None:
            scores.runs[run.run_id] = RunScore(run_id=run.run_id, stored=True, **{
                f.name: getattr(stored, f.name) for f in fields(StoredPredictions)})
            if seen is not None:
                scores.datasets[run.run_id] = seen
            continue
        if not (folder / folders.CHECKPOINT).is_file():
            scores.notes.append(f"run {run.run_id} has neither stored predictions nor a checkpoint; it is in the "
                                "tables but not in the paired tests or per-example figures")
            continue
        score, seen, note = _evaluate(run, copies, device=device, runs_dir=runs_dir, trust_code=trust_code)
        scores.runs[run.run_id], scores.datasets[run.run_id] = score, seen
        scores.notes.append(note)
    return scores


def _matching(stored: StoredPredictions, seen: ImageDataset) -> StoredPredictions | None:
    """An own run's stored predictions, scored against the local test labels when they are for this test set;
    None when they are not for a test set of this size and classes (the run is evaluated here instead)."""
    if len(stored.predicted) != len(seen.test) or stored.classes != len(seen.classes):
        return None
    if stored.dataset_sha256 != seen.sha256:
        return stored  # its own labels' verdicts; the report notes the copy
    return stored.rescored(seen.test.labels)


def _evaluate(run: RunRecord, copies: TestCopies, *, device: str, runs_dir: str | os.PathLike | None,
              trust_code: bool) -> tuple[RunScore, ImageDataset, str]:
    """A run without usable stored predictions, evaluated from its checkpoint with the TTA its final evaluation
    used (a budget may have cut the config's), and the one line that says so."""
    from cifarbench.inference import load_trained_model

    loaded = load_trained_model(str(Path(run.run_dir) / folders.CHECKPOINT), device=device, runs_dir=runs_dir,
                                trust_code=trust_code)
    seen = copies.seen_by(run, loaded.config, own=loaded.own)
    c = loaded.config
    tta, threshold = c.tta, c.tta_threshold
    if run.budget is not None:
        tta, threshold = run.budget.tta_used, run.budget.tta_threshold_used
    loaded = replace(loaded, config=replace(c, tta=tta, tta_threshold=threshold if tta else 0.0))
    result = loaded.evaluate_split(seen.test, len(seen.classes), keep_predictions=True)
    assert result.predictions is not None and result.confidences is not None
    views = f"TTA level {tta}" if tta else "no TTA"
    note = (f"run {run.run_id} has no usable stored predictions (trained before they were kept, or from "
            f"elsewhere); evaluated its checkpoint here with its own settings ({views})")
    score = RunScore(run_id=run.run_id, predicted=result.predictions, correct=result.predictions == seen.test.labels,
                     confidence=result.confidences, tta=tta, tta_threshold=threshold if tta else 0.0, stored=False,
                     dataset_sha256=seen.sha256, classes=len(seen.classes))
    return score, seen, note
