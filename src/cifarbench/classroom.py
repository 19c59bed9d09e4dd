"""The classroom: students submit runs; the teacher re-scores every submission and publishes a leaderboard.

`submit` writes one student run as `<student>-<run id>.tar.gz` (the runs/bundle.py archive, with the student's
name). `grade` takes a folder of such archives and, for each one: reads it without executing anything, imports
it into a runs folder of its own, rebuilds the model (a student's own model code only with `trust_code`), and
re-scores it on the whole test set and, when given, on a hidden labelled image set. A bad archive becomes one
row with its reason; the others go on. What a run claims is checked against what it scores (`claim_flags`), how
it was selected against the test set (`selection_flags`), and the leaderboard ranks the re-scored figures,
with entries whose gap is within noise sharing a rank (`rank_entries`). docs/classroom.md explains the rules.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarbench import display_hooks
from cifarbench.config import DataConfig, TrainConfig
from cifarbench.data import ImageDataset, load_dataset, prepare
from cifarbench.data.dataset import Split
from cifarbench.errors import CifarbenchError, Keyword, Spelling, as_keyword, spelled
from cifarbench.evaluation.stats import Spread, mean_spread
from cifarbench.models.reference import is_reference, label
from cifarbench.runs import folders
from cifarbench.runs.bundle import BundleLimits, export_runs, import_runs, read_bundle
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.records import RunRecord
from cifarbench.sandbox import Isolation, Limits, child_environment, choose_isolation, python_command, run_boxed

STUDENT = re.compile(r"[^\W_](?:[\w .-]{0,62}[\w.-])?")
"""A student's name: letters, digits, spaces and `-_.`, starting with a letter or digit (it becomes part of a
file name)."""
CLAIM_TOLERANCE = 0.0025
"""Re-scoring the same weights with the same test-time augmentation on the same images is deterministic up to
floating-point noise (other kernels, thread counts or bf16 on other hardware flip a few near-tie images): a
claim may differ from the re-scored accuracy by a quarter of a percentage point..."""
CLAIM_TOLERANCE_IMAGES = 3
"""...and never by less than three images, so a tiny test set does not turn one flipped image into a flag."""
TIE_Z = 1.96
"""Two leaderboard entries tie when their scores differ by less than this many standard errors of the
difference (a two-sided 95% test; see `standard_error`)."""
WORK_MARK = ".cifarbench-grading"
"""The file that marks a grading folder as ours, so that re-grading may empty it and nothing else."""


@dataclass
class Submission:
    """One student run written as a submission archive."""

    archive: str
    student: str
    run_id: str
    model: str
    test_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Flag:
    """Something the grader noticed about a run, in words a student can act on."""

    kind: str
    """claim-mismatch | claim-from-epoch | data-mismatch | test-selection | duplicate | no-claim"""
    severity: str
    """"error": the claim cannot stand as submitted; "warning": worth a look, not proof of anything."""
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(kw_only=True)
class GradedRun:
    """One run of one submission: what it claims, what it re-scores, its flags, or why it was not graded."""

    archive: str
    student: str | None
    run_id: str | None = None
    model: str | None = None
    recipe: str | None = None
    seed: int | None = None
    epochs: int | None = None
    params: int | None = None
    """Counted on the rebuilt model."""
    train_flops: int | None = None
    """As the run reports it (training compute cannot be re-measured without training again)."""
    train_seconds: float | None = None
    """As the run reports it, on the student's machine."""
    claimed_accuracy: float | None = None
    rescored_accuracy: float | None = None
    hidden_accuracy: float | None = None
    tta: int | None = None
    test_images: int | None = None
    flags: list[Flag] = field(default_factory=list)
    error: str | None = None
    """Why the run was not graded (None when it was)."""
    isolation: str | None = None
    """How its model ran: 'in-process' (cifarbench's own models only), 'bubblewrap' or 'process' (sandbox.py)."""
    weights_sha256: str | None = field(default=None, repr=False)
    """The weights' content hash (RunCheckpoint.weights_sha256): a copy re-saved under another id matches."""
    model_sha256: str | None = field(default=None, repr=False)

    @property
    def graded(self) -> bool:
        return self.error is None and self.rescored_accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "flags"}, "graded": self.graded,
                "flags": [f.to_dict() for f in self.flags]}


@dataclass(kw_only=True)
class LeaderboardEntry:
    """One student's runs of one model (several seeds: mean ± spread), ranked by their re-scored accuracy (on the
    hidden set when there is one)."""

    rank: int
    tied: bool
    student: str
    model: str
    recipe: str
    run_ids: list[str]
    params: int | None
    train_flops: float | None
    train_seconds: Spread | None
    claimed: Spread | None
    rescored: Spread
    hidden: Spread | None
    images: int
    """Images the score was measured on (the test set's, or the hidden set's)."""
    flags: list[str]
    isolation: str = "-"
    """How its runs' models ran (GradedRun.isolation)."""

    @property
    def score(self) -> float:
        return (self.hidden or self.rescored).mean

    @property
    def noise(self) -> float:
        return standard_error(self.hidden or self.rescored, self.images)

    @property
    def rank_label(self) -> str:
        return f"{self.rank}=" if self.tied else str(self.rank)

    def to_dict(self) -> dict[str, Any]:
        spread = lambda s: None if s is None else s.to_dict()  # noqa: E731
        return {"rank": self.rank, "tied": self.tied, "student": self.student, "model": self.model,
                "recipe": self.recipe, "run_ids": self.run_ids, "seeds": len(self.run_ids), "params": self.params,
                "train_flops": self.train_flops, "train_seconds": spread(self.train_seconds),
                "claimed_accuracy": spread(self.claimed), "rescored_accuracy": spread(self.rescored),
                "hidden_accuracy": spread(self.hidden), "score": self.score, "standard_error": self.noise,
                "images": self.images, "flags": self.flags, "isolation": self.isolation}


@dataclass(kw_only=True)
class Grading:
    """A graded inbox: every run (graded or not, with reasons), the leaderboard, and where it was written."""

    inbox: str
    runs: list[GradedRun]
    leaderboard: list[LeaderboardEntry]
    dataset: dict
    hidden: dict | None
    trust_code: bool
    work_dir: str
    isolation: str = "in-process"
    """How student code ran (sandbox.Isolation.describe), or 'in-process' when none ran."""
    roster: str | None = None
    missing: list[str] = field(default_factory=list)
    """Roster names with no submission."""
    html: str | None = None
    csv: str | None = None

    @property
    def not_graded(self) -> list[GradedRun]:
        return [r for r in self.runs if not r.graded]

    def to_dict(self) -> dict[str, Any]:
        return {"inbox": self.inbox, "leaderboard": [e.to_dict() for e in self.leaderboard],
                "runs": [r.to_dict() for r in self.runs], "dataset": self.dataset, "hidden": self.hidden,
                "trust_code": self.trust_code, "work_dir": self.work_dir, "isolation": self.isolation,
                "roster": self.roster, "missing": self.missing, "html": self.html, "csv": self.csv}

    def __repr__(self) -> str:
        return (f"Grading({self.inbox}: {len(self.leaderboard)} entries, {sum(r.graded for r in self.runs)} runs "
                f"graded, {len(self.not_graded)} not)")

    def _repr_html_(self) -> str:
        return display_hooks.html(self)


# --- Submitting ---------------------------------------------------------------------------------------------

def check_student(name: str) -> str:
    """`name` if it can name a student (and a file), else a one-line error. Letters are taken as NFKC leaves them
    (no full-width or styled forms), and never invisible ones."""
    if (not isinstance(name, str) or not STUDENT.fullmatch(name) or unicodedata.normalize("NFKC", name) != name
            or any(ord(c) in _INVISIBLE for c in name)):
        raise CifarbenchError("{option} {name!r}: use letters, digits, spaces and -_. (up to 64 characters, "
                              "starting with a letter or digit; plain letters, not full-width or styled ones)",
                              option=Keyword("student"), name=name)
    return name


def submit(run: str | None = None, *, student: str, out: str | os.PathLike,
           runs_dir: str | os.PathLike | None = None) -> Submission:
    """Write one completed run (id or unique prefix; default: the newest completed run) as
    `out/<student>-<run id>.tar.gz`: checkpoint, model code, config, metrics, history and provenance, with the
    student's name."""
    name = check_student(student)
    (record,) = stored_runs([run or _newest_completed(runs_dir)], runs_dir=runs_dir)
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CifarbenchError("{option} {folder}: not a folder", option=Keyword("out"), folder=folder)
    folder.mkdir(parents=True, exist_ok=True)
    archive = export_runs([record.run_id], folder / f"{name.replace(' ', '_')}-{record.run_id}.tar.gz",
                          runs_dir=runs_dir, student=name)
    return Submission(str(archive), name, record.run_id, record.model, record.test_accuracy)


def _newest_completed(runs_dir: str | os.PathLike | None) -> str:
    from cifarbench.runs.store import RunStore

    with RunStore(runs_dir, read_only=True) as store:
        for row in store.list_runs():
            if row.get("status") == "completed":
                return row["id"]
    raise CifarbenchError("no completed run in {folder} to submit ({option} names another runs folder)",
                          folder=folders.resolve_runs_dir(runs_dir), option=Keyword("runs_dir", ...))


# --- The rules ------------------------------------------------------------------------------------------------

def claim_tolerance(images: int) -> float:
    """How far a claim may sit from the re-scored accuracy on `images` images (see CLAIM_TOLERANCE)."""
    return max(CLAIM_TOLERANCE, CLAIM_TOLERANCE_IMAGES / max(images, 1))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def claim_flags(claimed: float | None, rescored: float, images: int, *, same_data: bool,
                tta_matches: Callable[[float], str | None] | None = None) -> list[Flag]:
    """The claim against the re-scored accuracy: a claim beyond `claim_tolerance` is flagged (with, when
    `tta_matches` finds one, the evaluation setting that does give the claimed figure). A run trained on other
    data cannot have its claim checked on this test set: that is flagged instead."""
    if claimed is None:
        return [Flag("no-claim", "warning", "the submission claims no test accuracy")]
    if not same_data:
        return [Flag("data-mismatch", "warning", f"trained and claimed ({_pct(claimed)}) on a data set other than "
                     f"this test set (different fingerprint); re-scored here: {_pct(rescored)}")]
    tolerance = claim_tolerance(images)
    if abs(claimed - rescored) <= tolerance + 1e-9:  # exactly at the tolerance passes, float rounding aside
        return []
    hint = tta_matches(claimed) if tta_matches else None
    return [Flag("claim-mismatch", "error", f"claims {_pct(claimed)} but re-scores {_pct(rescored)} "
                 f"({100 * (claimed - rescored):+.2f} points; evaluation noise is at most "
                 f"{100 * tolerance:.2f})" + (f"; {hint}" if hint else ""))]


def selection_flags(record: RunRecord, config: TrainConfig, claimed: float | None, images: int,
                    recipe_epochs: int | None, spelling: Spelling = as_keyword) -> list[Flag]:
    """Signs that the test set took part in choosing the model.

    - claim-from-epoch (error): the claim is not the final model's test accuracy but equals an earlier epoch's,
      i.e. a figure picked from the per-epoch test curve (which cifarbench prints after every epoch).
    - test-selection (warning): the run trained for another number of epochs than its recipe's default with
      no validation split (`--val-split`), and its test accuracy was shown after an earlier epoch (a curve to
      choose the epoch count on). Not when the run was shorter than the default and its test accuracy still
      rose past evaluation noise in its last epoch: stopping before the peak can only understate the figure.
      It says the choice may have looked at the test set, not that it did.
    """
    flags = []
    history = record.history
    final = _number(history[-1].test_accuracy) if history else None
    same = 0.5 / max(images, 1)  # the same count of correct images
    if claimed is not None and final is not None and abs(claimed - final) > same:
        for h in history[:-1]:
            if _number(h.test_accuracy) is not None and abs(claimed - h.test_accuracy) <= same:
                flags.append(Flag("claim-from-epoch", "error", f"the claimed {_pct(claimed)} is epoch {h.epoch}'s "
                                  f"test accuracy, not the final model's ({_pct(final)}): a figure picked from the "
                                  "per-epoch test curve"))
                break
    if (config.val_split == 0 and not config.budget_seconds and recipe_epochs is not None
            and config.epochs != recipe_epochs and _test_curve_could_choose(history, config.epochs < recipe_epochs,
                                                                             claim_tolerance(images))):
        epochs = f"{config.epochs} epoch" + ("s" if config.epochs != 1 else "")
        flags.append(Flag("test-selection", "warning", f"trained {epochs} (the {config.recipe} recipe's default is "
                          f"{recipe_epochs}) with no validation split, watching the per-epoch test accuracy: if the "
                          "epoch count was chosen on it, the test figure is optimistic (choose on "
                          f"{spelling(Keyword('val_split', 5000))} instead)"))
    return flags


def _test_curve_could_choose(history: list, shorter: bool, noise: float) -> bool:
    """Whether the run showed test accuracies before its last epoch that an epoch count could have been chosen
    on: none shown (one epoch, or no per-epoch evaluation) cannot have chosen it, and a shorter run whose test
    accuracy was still rising by more than `noise` at its end stopped before any peak."""
    earlier = [a for a in (_number(h.test_accuracy) for h in history[:-1]) if a is not None]
    final = _number(history[-1].test_accuracy) if history else None
    if not earlier:
        return False
    rising = final is not None and final - max(earlier) > noise
    return not (shorter and rising)


def recipe_epochs(config: TrainConfig, convolutional: bool) -> int | None:
    """The epochs the run's recipe gives its model (what it trains without `--epochs`). An own model is treated
    as the recipes treat one: like a registered model of its kind (`convolutional` or not)."""
    from cifarbench.training.recipes import make_config

    name = config.model
    if is_reference(name):
        name = "cnn" if convolutional else "fnn"
    try:
        return make_config(name, config.recipe).epochs
    except CifarbenchError:
        return None


def standard_error(spread: Spread, images: int) -> float:
    """The standard error of an entry's score: the binomial error of measuring an accuracy on `images` images
    (would the ranking hold on a fresh set of that size?), plus, with several seeds, the seed-to-seed spread of
    their mean (std / sqrt(seeds))."""
    p = min(max(spread.mean, 0.0), 1.0)
    seeds = (spread.std or 0.0) ** 2 / spread.n if spread.n > 1 else 0.0
    return math.sqrt(p * (1 - p) / max(images, 1) + seeds)


def rank_entries(entries: Sequence[LeaderboardEntry]) -> list[LeaderboardEntry]:
    """Entries sorted by score, best first, with competition ranks (1, 1, 3). An entry shares the rank of the
    best entry of its group while its score is within TIE_Z standard errors of that entry's (the root sum of
    both squared errors): such gaps are noise, and the table shows them as ties."""
    ordered = sorted(entries, key=lambda e: (-e.score, e.student, e.model))
    leader = None
    for i, entry in enumerate(ordered):
        if leader is not None and leader.score - entry.score <= TIE_Z * math.hypot(leader.noise, entry.noise):
            entry.rank = leader.rank
        else:
            entry.rank, leader = i + 1, entry
    for entry in ordered:
        entry.tied = sum(e.rank == entry.rank for e in ordered) > 1
    return ordered


def _spread(values: Sequence[float | None]) -> Spread | None:
    """Mean and spread when every run has the value, else None (a partial mean would mislead)."""
    known = [v for v in values if v is not None]
    return mean_spread(known) if known and len(known) == len(values) else None


def leaderboard(runs: Sequence[GradedRun], *, test_images: int, hidden_images: int | None = None
                ) -> list[LeaderboardEntry]:
    """One entry per student and model (several seeds pooled: mean ± spread), ranked by `rank_entries` on the
    hidden set's accuracy when there is one, else on the re-scored test accuracy."""
    groups: dict[tuple, list[GradedRun]] = {}
    for run in runs:
        if run.graded:
            groups.setdefault((run.student, run.model, run.recipe, run.model_sha256), []).append(run)
    entries = []
    for (student, model, recipe, _), rs in groups.items():
        hidden = _spread([r.hidden_accuracy for r in rs]) if hidden_images else None
        flops = [r.train_flops for r in rs if r.train_flops is not None]
        kinds = list(dict.fromkeys(f.kind for r in rs for f in r.flags))
        isolation = ", ".join(dict.fromkeys(r.isolation or "-" for r in rs))
        entries.append(LeaderboardEntry(rank=0, tied=False, student=student or "?", model=model or "?",
                                        recipe=recipe or "?", run_ids=[r.run_id or "?" for r in rs],
                                        params=rs[0].params, train_flops=statistics.fmean(flops) if flops else None,
                                        train_seconds=_spread([r.train_seconds for r in rs]),
                                        claimed=_spread([r.claimed_accuracy for r in rs]),
                                        rescored=mean_spread([r.rescored_accuracy for r in rs]),  # type: ignore[misc]
                                        hidden=hidden, images=hidden_images if hidden is not None else test_images,
                                        flags=kinds, isolation=isolation))
    return rank_entries(entries)


# --- Grading ----------------------------------------------------------------------------------------------------

@dataclass
class HiddenSet:
    """A labelled image folder the students never saw, decoded once per model input size."""

    folder: Path
    labels_file: Path
    files: list[Path]
    labels: np.ndarray
    _decoded: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, folder: str | os.PathLike, labels_file: str | os.PathLike | None,
             classes: Sequence[str]) -> HiddenSet:
        from cifarbench.image_files import expand_images, match_labels, read_labels

        folder = Path(folder)
        if not folder.is_dir():
            raise CifarbenchError("{option} {folder}: not a folder of images", option=Keyword("hidden"), folder=folder)
        labels_file = Path(labels_file) if labels_file else folder / "labels.csv"
        files = expand_images([folder])
        return cls(folder, labels_file, files, match_labels(files, read_labels(labels_file, classes), labels_file))

    def split(self, in_shape: tuple[int, int, int]) -> Split:
        from cifarbench.image_files import load_images

        key = tuple(in_shape)
        if key not in self._decoded:
            self._decoded[key] = load_images(self.files, in_shape)
        return Split(self._decoded[key], self.labels)

    def info(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "labels": str(self.labels_file), "images": len(self.files)}


def _work_folder(path: Path) -> Path:
    """An empty grading folder at `path`: created, or emptied when an earlier grading made it (and only then)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CifarbenchError("{option} {path}: not a plain folder", option=Keyword("work_dir"), path=path)
    if path.exists() and any(path.iterdir()):
        if not (path / WORK_MARK).is_file():
            raise CifarbenchError("{option} {path} holds files that no grading wrote; name an empty or new folder",
                                  option=Keyword("work_dir"), path=path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WORK_MARK).write_text("made by `cifarbench grade`; emptied when grading runs again\n")
    return path


def _line(exc: BaseException, spelling: Spelling = as_keyword) -> str:
    return " ".join(spelled(exc, spelling).split())[:300] or type(exc).__name__


# --- Student names ----------------------------------------------------------------------------------------------

_LOOKALIKES = str.maketrans({
    # Letters drawn like Latin ones (after Unicode's confusables.txt, the common cases), mapped before case folding
    # so that capitals keep their own look-alikes: Cyrillic А and Greek Α are A, Greek Η is H (its small η is n).
    **dict.fromkeys("АΑ", "A"), **dict.fromkeys("ВΒ", "B"), **dict.fromkeys("СϹ", "C"), **dict.fromkeys("ЕΕ", "E"),
    **dict.fromkeys("НΗ", "H"), **dict.fromkeys("ІΙӀ", "I"), "Ј": "J", **dict.fromkeys("КΚ", "K"),
    **dict.fromkeys("МΜ", "M"), "Ν": "N", **dict.fromkeys("ОΟ", "O"), **dict.fromkeys("РΡ", "P"), "Ѕ": "S",
    **dict.fromkeys("ТΤ", "T"), **dict.fromkeys("ХΧ", "X"), **dict.fromkeys("УҮΥ", "Y"), "Ζ": "Z",
    **dict.fromkeys("аɑα", "a"), "в": "b", **dict.fromkeys("сϲ", "c"), "ԁ": "d", **dict.fromkeys("еёε", "e"),
    "ɡ": "g", "һ": "h", **dict.fromkeys("іїιı", "i"), "ј": "j", **dict.fromkeys("кκ", "k"), **dict.fromkeys("ӏℓ", "l"),
    "м": "m", "н": "h", "η": "n", **dict.fromkeys("оο", "o"), **dict.fromkeys("рρ", "p"), "ԛ": "q", "ѕ": "s",
    **dict.fromkeys("тτ", "t"), "υ": "u", "ν": "v", **dict.fromkeys("ԝω", "w"), **dict.fromkeys("хχ", "x"),
    **dict.fromkeys("уү", "y"), "ӡ": "3",
})
_SEQUENCES = (("rn", "m"), ("vv", "w"), ("cl", "d"), ("i", "l"), ("1", "l"), ("|", "l"), ("0", "o"), ("_", " "))
"""Shapes that pass for one another once case is gone: I and l, rn and m."""
_INVISIBLE = {0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x180E}
"""Fillers that count as letters but show nothing."""


def name_key(name: str) -> str:
    """How two names are compared: NFKC (full-width and styled letters become plain), case folded, spaces
    collapsed."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def name_skeleton(name: str) -> str:
    """A name as it looks: look-alike letters (Cyrillic а for Latin a, zero for o, rn for m) mapped to one."""
    text = " ".join(unicodedata.normalize("NFKC", name).translate(_LOOKALIKES).casefold().split())
    for shape, same in _SEQUENCES:
        text = text.replace(shape, same)
    return text


def _scripts(name: str) -> set[str]:
    return {unicodedata.name(c, "?").split()[0] for c in unicodedata.normalize("NFKC", name) if c.isalpha()}


def read_roster(path: str | os.PathLike) -> list[str]:
    """The expected students: one name per line (blank lines and lines starting with # are skipped; a CSV's
    first column is the name)."""
    from cifarbench.fsutil import read_regular_file

    try:
        text = read_regular_file(path, 1 << 20, "roster file", error=CifarbenchError).decode("utf-8", "replace")
    except CifarbenchError as exc:  # named by the option that gave it, in the caller's spelling
        raise CifarbenchError("{option}: {reason}", option=Keyword("roster"), reason=exc) from None
    names = [line.split(",")[0].strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise CifarbenchError("{option} {path}: no names in it (one student per line)", option=Keyword("roster"),
                              path=path)
    return names


def name_flags(runs: Sequence[GradedRun], roster: Sequence[str] | None) -> list[str]:
    """Flag names that could pass for another (a look-alike of another student's or a roster name, mixed
    scripts) and names not on the roster; return the roster names that submitted nothing."""
    names = sorted({r.student for r in runs if r.student})
    by_skeleton: dict[str, set[str]] = {}
    for name in [*names, *(roster or [])]:
        by_skeleton.setdefault(name_skeleton(name), set()).add(name)
    on_roster = {name_key(n) for n in roster or []}
    flags: dict[str, list[Flag]] = {}
    for name in names:
        others = sorted(n for n in by_skeleton[name_skeleton(name)] if n != name)
        if others:
            flags.setdefault(name, []).append(Flag("look-alike", "error", f"the name {name!r} looks like "
                                                   f"{', '.join(map(repr, others))}: submissions are told apart by "
                                                   "name, so one may pass for another"))
        elif len(_scripts(name)) > 1:
            flags.setdefault(name, []).append(Flag("mixed-script", "warning", f"the name {name!r} mixes "
                                                   f"{' and '.join(sorted(_scripts(name)))} letters"))
        if roster is not None and name_key(name) not in on_roster:
            flags.setdefault(name, []).append(Flag("not-on-roster", "error", f"{name!r} is not on the roster"))
    for run in runs:
        run.flags += flags.get(run.student or "", [])
    submitted = {name_key(n) for n in names}
    return [n for n in roster or [] if name_key(n) not in submitted]


# --- Grading ----------------------------------------------------------------------------------------------------

def grade(inbox: str | os.PathLike, *, trust_code: bool = False, data_dir: str | None = None,
          verify: bool | None = None, download: bool | None = None, dataset: str = "cifar10",
          hidden: str | os.PathLike | None = None, hidden_labels: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None, device: str = "auto",
          progress: bool | None = None, on_run: Callable[[GradedRun], None] | None = None,
          data: ImageDataset | None = None, roster: str | os.PathLike | None = None, isolation: str = "auto",
          limits: Limits | None = None, bundle_limits: BundleLimits | None = None,
          spelling: Spelling = as_keyword, executor: str = "local", address: str | None = None) -> Grading:
    """Grade every submission (`*.tar.gz`) in `inbox`: re-score each run on the whole test set (and the hidden
    set), flag claims, selections and names that do not hold, and return the leaderboard. The front doors write
    it (`api.grade`: `leaderboard.html` and `leaderboard.csv` in `out`, default the inbox); `out` is also kept
    out of the students' sandbox.

    Each archive is read in one bounded pass (`bundle_limits`) into a folder of its own under `work_dir` (default:
    a fresh temporary folder), removed once it is graded. cifarbench's own models are rebuilt here; student model
    code runs only with `trust_code`, and then each submission runs in a sandboxed child process with `limits` (time and
    memory; bubblewrap's namespaces where `isolation` allows: sandbox.py). The child sees images, never labels:
    the scores are computed here. A bad submission is one row with its reason and never stops the others; a
    reason that names an option spells it by `spelling` (the caller's: the CLI's flags, the API's keywords).

    With `executor` "ray" each submission is one task on the Ray cluster at `address` (a local one without): the
    task grades it exactly so, in the same box with the same limits, and returns its rows."""
    from cifarbench.executors import check_executor

    check_executor(executor, address)
    inbox = Path(inbox).expanduser()
    if not inbox.is_dir():
        raise CifarbenchError(f"{inbox} is not a folder of submissions")
    if hidden_labels is not None and hidden is None:
        raise CifarbenchError("{labels} needs {hidden}", labels=Keyword("hidden_labels"), hidden=Keyword("hidden", ...))
    archives = sorted(p for p in inbox.iterdir() if p.name.endswith(".tar.gz") and not p.name.startswith(".")
                      and p.is_file() and not p.is_symlink())  # a link could name a file outside the inbox
    if not archives:
        raise CifarbenchError(f"{inbox} holds no .tar.gz submissions (students make them with `cifarbench submit`)")
    expected = read_roster(roster) if roster is not None else None
    box = _Box(choose_isolation(isolation), limits or Limits(), device) if trust_code else None
    data = data or load_dataset(DataConfig(dataset=dataset, data_dir=data_dir, verify=verify is not False,
                                           download=download is not False), progress=progress)
    hidden_set = HiddenSet.load(hidden, hidden_labels, data.classes) if hidden is not None else None
    # By default a fresh folder outside the inbox: whoever can write the inbox cannot plant anything in it.
    work = (_work_folder(Path(work_dir).expanduser()) if work_dir
            else Path(tempfile.mkdtemp(prefix="cifarbench-grading-")))
    if box is not None:
        source = Path(str(data.info().get("source") or ""))
        private = [inbox, work, *([hidden_set.folder, hidden_set.labels_file] if hidden_set else []),
                   *([Path(out).expanduser()] if out else []), *([source] if source.is_absolute() else []),
                   *([Path(roster)] if roster else [])]
        box.prepare(work, private=private)
    runs: list[GradedRun] = []
    seen: dict[str, GradedRun] = {}  # weights sha256 -> the first run graded with them
    try:
        if executor == "ray":
            from cifarbench.executors import grade_on_ray

            for graded in grade_on_ray(archives, data, hidden_set, grade=grade_task, failed=_failed_row, box=box,
                                       device=device, bundle_limits=bundle_limits, private=box.private if box else [],
                                       address=address, spelling=spelling):
                runs += graded
            _flag_repeats(runs)
            for run in runs:
                if on_run:
                    on_run(run)
        for i, archive in enumerate(archives if executor == "local" else []):
            for run in _grade_one(archive, work / f"{i:03d}", data, hidden_set, seen, box=box, device=device,
                                  bundle_limits=bundle_limits, spelling=spelling):
                runs.append(run)
                if on_run:
                    on_run(run)
    finally:
        if box is not None:
            box.close()
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    _flag_shared_weights(runs)
    missing = name_flags(runs, expected)
    board = leaderboard(runs, test_images=len(data.test), hidden_images=len(hidden_set.files) if hidden_set else None)
    result = Grading(inbox=str(inbox), runs=runs, leaderboard=board, dataset=data.info(),
                     hidden=hidden_set.info() if hidden_set else None, trust_code=trust_code, work_dir=str(work),
                     isolation=box.isolation.describe() if box else "in-process (no student code runs)",
                     roster=str(roster) if roster is not None else None, missing=missing)
    return result


def _grade_one(archive: Path, folder: Path, data: ImageDataset, hidden: HiddenSet | None,
               seen: dict[str, GradedRun], *, box: _Box | None, device: str,
               bundle_limits: BundleLimits | None, spelling: Spelling = as_keyword) -> list[GradedRun]:
    """One submission unpacked into `folder`, graded, and `folder` removed."""
    try:
        return _grade_archive(archive, folder, data, hidden, seen, box=box, device=device,
                              bundle_limits=bundle_limits, spelling=spelling)
    except (Exception, SystemExit) as exc:  # a crafted archive must not stop the others either
        return [GradedRun(archive=archive.name, student=None,
                          error=f"could not be graded ({type(exc).__name__}: {_line(exc, spelling)})")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the work folder never holds more than one submission


def _failed_row(archive: str, why: str) -> GradedRun:
    return GradedRun(archive=archive, student=None, error=why)


def grade_task(archive: bytes, name: str, data: ImageDataset, hidden: HiddenSet | None, *,
               box: tuple[Isolation, Limits] | None, device: str, bundle_limits: BundleLimits | None,
               private: Sequence[str], spelling: Spelling = as_keyword) -> list[GradedRun]:
    """One submission graded where a Ray task runs: the archive's bytes in a fresh private folder, the same box
    (isolation and limits, chosen by the driver: a node without bubblewrap fails the row, never falls back) with
    the driver's private paths hidden too, and the rows returned. Only the submission's own repeats are caught
    here; the driver checks repeats across submissions (`_flag_repeats`)."""
    work = Path(tempfile.mkdtemp(prefix="cifarbench-grading-"))
    boxed = _Box(box[0], box[1], device) if box is not None else None
    try:
        inbox = work / "inbox"
        inbox.mkdir()
        path = inbox / Path(name).name
        path.write_bytes(archive)
        if boxed is not None:
            boxed.prepare(work, private=[work, *(Path(p) for p in private)])
        rows = _grade_one(path, work / "000", data, hidden, {}, box=boxed, device=device,
                          bundle_limits=bundle_limits, spelling=spelling)
        for row in rows:  # reasons name the submission as the teacher knows it, not this task's copy
            row.error = row.error.replace(str(path), name) if row.error else row.error
        return rows
    finally:
        if boxed is not None:
            boxed.close()
        shutil.rmtree(work, ignore_errors=True)


def _flag_repeats(runs: Sequence[GradedRun]) -> None:
    """The rule `_score` applies as it grades one submission after another, applied afterwards to submissions
    graded apart: a run with the weights of a run of the same student graded before it is not graded."""
    seen: dict[str, GradedRun] = {}
    for row in runs:
        if row.weights_sha256 is None:
            continue
        first = seen.get(row.weights_sha256)
        if first is not None and first.student == row.student and first is not row and row.error is None:
            row.error = f"the same weights as run {first.run_id} of {first.archive}, already graded"
            row.rescored_accuracy = row.hidden_accuracy = row.params = row.test_images = row.tta = None
            row.flags = []
            continue
        seen.setdefault(row.weights_sha256, row)


def _number(value: Any, high: float = 1e15) -> float | None:
    """A number from a manifest in [0, high], else None (the manifest is the student's text: a 1e308 would
    overflow the means of the leaderboard)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and 0 <= value <= high else None


def _integer(value: Any, high: int = 10**18) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high else None


class _Box:
    """Where student code runs under `grade --trust-code`: one sandboxed child process per run
    (classroom_worker), handed image files and asked for the classes it gives them."""

    def __init__(self, isolation: Isolation, limits: Limits, device: str) -> None:
        self.isolation, self.limits, self.device = isolation, limits, device
        self.inputs: Path | None = None
        self.private: list[Path] = []
        self.deadline = time.monotonic() + limits.timeout
        self._files: dict[tuple, Path] = {}

    def prepare(self, work: Path, private: Sequence[Path]) -> None:
        self.inputs = Path(tempfile.mkdtemp(prefix=".inputs-", dir=work))
        self.private = list(private)

    def close(self) -> None:
        if self.inputs is not None:
            shutil.rmtree(self.inputs, ignore_errors=True)

    def _file(self, images: np.ndarray) -> Path:
        """The images as an .npy file the child may read (written once per distinct array)."""
        key = (images.shape, hashlib.sha256(images.tobytes()).hexdigest())
        if key not in self._files:
            assert self.inputs is not None
            path = self.inputs / f"images-{len(self._files)}.npy"
            np.save(path, images, allow_pickle=False)
            self._files[key] = path
        return self._files[key]

    def start(self) -> None:
        """A new submission: its time starts now (--timeout is per submission, whatever it asks for)."""
        self.deadline = time.monotonic() + self.limits.timeout

    def predict(self, checkpoint: Path, images: dict[str, np.ndarray], ttas: Sequence[int | str],
                classes: int) -> dict[str, np.ndarray]:
        request = {"checkpoint": str(checkpoint), "device": self.device, "ttas": list(ttas),
                   "images": {split: str(self._file(array)) for split, array in images.items()}}
        outcome = run_boxed(python_command("cifarbench.classroom_worker", json.dumps(request)),
                            isolation=self.isolation, limits=self.limits, hidden=self.private,
                            readable=[checkpoint.parent, self.inputs], env=child_environment(),
                            seconds=self.deadline - time.monotonic())
        failure = outcome.failure(self.limits)
        if failure:
            raise CifarbenchError("its model code {failure}", failure=failure)
        try:
            arrays = json.loads(outcome.stdout)
        except (ValueError, RecursionError):
            raise CifarbenchError("its model code ended without a result (did it exit early?)") from None
        predictions = {}
        for split, array in images.items():
            for tta in ttas:
                got = arrays.get(f"{split}_{tta}") if isinstance(arrays, dict) else None
                if (not isinstance(got, list) or len(got) != len(array)
                        or not all(type(c) is int and 0 <= c < classes for c in got)):
                    raise CifarbenchError("its model code returned no valid predictions")
                predictions[f"{split}_{tta}"] = np.asarray(got, dtype=np.int64)
        return predictions


def _predict_here(checkpoint: Path, images: dict[str, np.ndarray], ttas: Sequence[int | str], *,
                  device: str) -> dict[str, np.ndarray]:
    """What the child returns, computed in this process: only for cifarbench's own models (no student code
    runs; load_trained_model refuses anything else without --trust-code, and bounds their size and compute)."""
    from cifarbench.inference import load_trained_model

    loaded = load_trained_model(str(checkpoint), device=device, trust_code=False)
    return {f"{split}_{tta}": loaded.predicted_classes(array, tta=None if tta == "own" else int(tta))
            for split, array in images.items() for tta in ttas}


def _grade_archive(archive: Path, store: Path, data: ImageDataset, hidden: HiddenSet | None,
                   seen: dict[str, GradedRun], *, box: _Box | None, device: str,
                   bundle_limits: BundleLimits | None, spelling: Spelling) -> list[GradedRun]:
    """Every run of one archive, graded; or one row saying why the archive could not be."""
    try:
        bundle = read_bundle(archive, bundle_limits)
        if bundle.student is None:
            raise CifarbenchError(f"{archive.name}: not a submission (no student name; students make them with "
                                  "`cifarbench submit`)")
        student = check_student(bundle.student)
        imported = import_runs(archive, runs_dir=store, limits=bundle_limits)
    except CifarbenchError as exc:
        return [GradedRun(archive=archive.name, student=None, error=exc.spelled(spelling))]
    rows = [GradedRun(archive=archive.name, student=student, run_id=run_id, error=f"not imported: {why}")
            for run_id, why in imported.skipped]
    for record in imported.imported:
        # The manifest is the student's text: only well-typed values go into the leaderboard.
        code_sha = record.config.get("model_sha256") if isinstance(record.config, dict) else None
        row = GradedRun(archive=archive.name, student=student, run_id=record.run_id,
                        model=label(str(record.model))[:200], recipe=str(record.recipe)[:64],
                        seed=_integer(record.seed), epochs=len(record.history) or _integer(record.epochs), params=None,
                        train_flops=_integer(record.train_flops), train_seconds=_number(record.train_seconds),
                        claimed_accuracy=_number(record.test_accuracy, 1),
                        isolation=box.isolation.kind if box else "in-process",
                        model_sha256=code_sha if isinstance(code_sha, str) else None)
        if box is not None:
            box.start()
        _score(row, record, store, data, hidden, seen, box=box, device=device, spelling=spelling)
        rows.append(row)
    return rows


def _score(row: GradedRun, record: RunRecord, store: Path, data: ImageDataset, hidden: HiddenSet | None,
           seen: dict[str, GradedRun], *, box: _Box | None, device: str, spelling: Spelling) -> None:
    """Rebuild one imported run and fill in its scores and flags, or its error. Everything but the model's
    predictions is computed here, from the checkpoint read as data, before any of its code could run."""
    from cifarbench.models.registry import check_foreign_model
    from cifarbench.training.state import RunCheckpoint

    checkpoint = folders.run_folder(store, record.run_id) / folders.CHECKPOINT
    try:
        ckpt = RunCheckpoint.load(checkpoint)
        config = TrainConfig.from_dict(ckpt.config)
        if config.model != ckpt.model:
            raise CifarbenchError(f"its checkpoint names model {ckpt.model!r} but its config {config.model!r}")
        check_foreign_model(ckpt.model, config.model_sha256, source=f"run {record.run_id!r}")
        if tuple(ckpt.classes) != tuple(data.classes) or tuple(ckpt.in_shape) != tuple(data.image_shape):
            raise CifarbenchError(f"trained on {ckpt.dataset.get('name', 'another data set')} "
                                  f"({len(ckpt.classes)} classes, input {tuple(ckpt.in_shape)}), not on "
                                  f"{data.name} ({len(data.classes)} classes, input {data.image_shape})")
        row.weights_sha256 = ckpt.weights_sha256()
        first = seen.get(row.weights_sha256)
        if first is not None and first.student == row.student:
            raise CifarbenchError(f"the same weights as run {first.run_id} of {first.archive}, already graded")
        seen.setdefault(row.weights_sha256, row)
        test = prepare(data, config.data).test
        images = {"test": test.images, **({"hidden": hidden.split(ckpt.in_shape).images} if hidden else {})}

        def predict(images: dict[str, np.ndarray], ttas: Sequence[int | str]) -> dict[str, np.ndarray]:
            if box is not None:
                return box.predict(checkpoint, images, ttas, len(data.classes))
            return _predict_here(checkpoint, images, ttas, device=device)

        row.params = ckpt.weight_count()
        predicted = predict(images, ["own"])
        row.model, row.tta = label(config.model), config.tta
        row.rescored_accuracy, row.test_images = float(np.mean(predicted["test_own"] == test.labels)), len(test)
        if hidden is not None:
            row.hidden_accuracy = float(np.mean(predicted["hidden_own"] == hidden.labels))

        def tta_matches(claimed: float) -> str | None:
            others = [t for t in (0, 1, 2) if t != config.tta]
            other = predict({"test": test.images}, others)
            for tta in others:
                if abs(float(np.mean(other[f"test_{tta}"] == test.labels)) - claimed) <= \
                        claim_tolerance(len(test)) + 1e-9:
                    return (f"that is this model's accuracy with test-time augmentation {tta}, while its "
                            f"run evaluates with {config.tta}")
            return None

        same_data = ckpt.dataset.get("sha256") == data.sha256
        row.flags = claim_flags(row.claimed_accuracy, row.rescored_accuracy, len(test), same_data=same_data,
                                tta_matches=tta_matches)
        convolutional = any(t.ndim == 4 for t in ckpt.state_dict.values())  # conv filters, read from the weights
        row.flags += selection_flags(record, config, row.claimed_accuracy, len(test),
                                     recipe_epochs(config, convolutional), spelling)
    except CifarbenchError as exc:
        row.error = exc.spelled(spelling)
    except (Exception, SystemExit) as exc:  # a model that crashes while building or scoring
        row.error = f"crashed while being rebuilt or scored ({type(exc).__name__}: {_line(exc)})"
    if row.error:
        row.rescored_accuracy = row.hidden_accuracy = None


def _flag_shared_weights(runs: Sequence[GradedRun]) -> None:
    """Runs of different students with the very same weights (whatever the run id or file): one of them is not
    their own."""
    by_sha: dict[str, list[GradedRun]] = {}
    for run in runs:
        if run.weights_sha256 and run.error is None:
            by_sha.setdefault(run.weights_sha256, []).append(run)
    for group in by_sha.values():
        for run in group:
            others = sorted({f"{r.student} ({r.archive})" for r in group if r.student != run.student})
            if others:
                run.flags.append(Flag("duplicate", "error", "the same weights as the submission of "
                                      + ", ".join(others)))
