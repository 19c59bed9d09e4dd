"""Run folders: their layout, their ids, and their safe deletion.

A run's folder is always `<runs dir>/<run id>`, derived from the runs folder the user chose and a validated id,
never from a path stored in a file or the database, so nothing a run does (or a copied store says) can reach
outside the runs folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import atomic_write_json, read_regular_file

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
MODEL_CODE = "model.py"
EXPERIMENTS = "experiments.json"
"""The controlled experiments run on the trained model (translation, corruption), by name."""
PREDICTIONS = "predictions.npz"
"""The final evaluation's per-image predictions (`runs.predictions`)."""
RUN_FILES = {CONFIG, CHECKPOINT, METRICS, MODEL_CODE, EXPERIMENTS, PREDICTIONS}
"""Everything cifarbench writes into a run folder (deletion refuses a folder holding anything else)."""
MAX_METRICS_BYTES = 64 << 20  # a run's record: history, confusion matrix, budget
MAX_EXPERIMENTS_BYTES = 16 * 2**20

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a run id may look like: a plain file name (no separators, no leading dot), so it is safe as a folder."""


def resolve_runs_dir(runs_dir: str | os.PathLike | None = None) -> Path:
    """The argument (`--runs-dir`), else $CIFARBENCH_HOME, else ./runs."""
    if runs_dir:
        return Path(runs_dir).expanduser()
    env = os.environ.get("CIFARBENCH_HOME")
    return Path(env).expanduser() if env else Path("runs")


def check_run_id(run_id: str) -> str:
    """`run_id` if it is a safe run id, else a one-line error."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or run_id.endswith(".tmp"):
        raise CifarbenchError(f"{run_id!r} is not a valid run id (letters, digits, '.', '_', '-')")
    return run_id


def new_run_id(model_label: str, seed: int) -> str:
    """A fresh id: time, model, seed and a random suffix (the model label reduced to safe characters)."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", model_label).strip("-.")[:40] or "model"
    return check_run_id(f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-s{int(seed)}-{secrets.token_hex(2)}")


def run_folder(runs_dir: str | os.PathLike | None, run_id: str) -> Path:
    """Where run `run_id` lives in the runs folder `runs_dir`."""
    return resolve_runs_dir(runs_dir) / check_run_id(run_id)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically; NaN or infinity is refused rather than written as invalid JSON."""
    atomic_write_json(path, obj)


def read_experiments(run_dir: str | os.PathLike) -> dict[str, dict]:
    """The experiments stored with a run ({name: result}); empty when there are none or the file is damaged."""
    path = Path(run_dir) / EXPERIMENTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_regular_file(path, MAX_EXPERIMENTS_BYTES, "experiments file"))
    except (CifarbenchError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def read_budget(run_dir: str | os.PathLike) -> dict | None:
    """A budgeted run's `budget` from its metrics.json (None when absent, not budgeted or damaged)."""
    return _read_entry(Path(run_dir) / METRICS, "budget")


def read_estimate(run_dir: str | os.PathLike) -> dict | None:
    """The run's cost `estimate` from its config.json (written as it starts, so a stopped run has it too)."""
    return _read_entry(Path(run_dir) / CONFIG, "estimate")


def _read_entry(path: Path, key: str) -> dict | None:
    """One object-valued entry of a run's JSON file (None when absent or damaged)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(read_regular_file(path, MAX_METRICS_BYTES, "run file"))
    except (CifarbenchError, ValueError, RecursionError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def store_experiment(run_dir: str | os.PathLike, name: str, result: dict) -> None:
    """Keep one experiment's result with the run (replacing an earlier one of the same name), atomically."""
    write_json(Path(run_dir) / EXPERIMENTS, {**read_experiments(run_dir), name: result})


def delete_run_folder(folder: Path, run_id: str) -> list[str]:
    """Remove a run folder after checking it is one (see `run_folder_files`); return the files removed."""
    if not (folder.exists() or folder.is_symlink()):
        return []
    removed = []
    for f in run_folder_files(folder, run_id):  # checks everything before deleting anything
        f.unlink()
        removed.append(str(f))
    folder.rmdir()
    return removed


def run_folder_files(folder: Path, run_id: str) -> list[Path]:
    """The files of a run folder, after checking it is one: named after the run, not a link, holding only what
    `train_run` writes (and its temp files), with a config.json that names the run. Anything else is refused."""
    refuse = f"refusing to delete {folder}: "
    if folder.is_symlink() or not folder.is_dir():
        raise CifarbenchError(refuse + "not a plain folder")
    if folder.name != run_id:
        raise CifarbenchError(refuse + f"its name is not the run id {run_id}")
    entries = list(folder.iterdir())
    if not entries:
        return []
    for entry in entries:
        temp = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if entry.is_symlink() or not entry.is_file() or not (entry.name in RUN_FILES or temp):
            raise CifarbenchError(refuse + f"it holds {entry.name!r}, which cifarbench does not write; "
                                  "not a run folder (remove it by hand if you are sure)")
    try:
        recorded = json.loads((folder / CONFIG).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != run_id:
        raise CifarbenchError(refuse + f"its config.json does not name run {run_id}")
    return entries
