"""The run history as a user manages it: look stored runs up, remove them (folder and rows together)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from cifarbench.errors import CifarbenchError
from cifarbench.runs import folders
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore
from cifarbench.training.budget import BudgetReport
from cifarbench.training.estimate import RunEstimate


def stored_runs(refs: Sequence[str], *, runs_dir: str | os.PathLike | None = None) -> list[RunRecord]:
    """The runs named by ids (or unique prefixes), in the order given, each once, with their learning curves;
    each record's folder is the one in `runs_dir`, whatever path the history row holds."""
    if not refs:
        raise CifarbenchError("name at least one run (`cifarbench runs` lists them)")
    with RunStore(runs_dir, read_only=True) as store:  # looking runs up writes nothing (a read-only mount works)
        rows = [store.get_run(ref) for ref in refs]
    records = [RunStore.to_record(row) for row in {row["id"]: row for row in rows}.values()]
    for record in records:
        record.run_dir = str(folders.run_folder(runs_dir, record.run_id))
        record.budget = BudgetReport.from_dict(folders.read_budget(record.run_dir))  # kept in metrics.json only
        record.estimate = RunEstimate.from_dict(folders.read_estimate(record.run_dir))
    return records


@dataclass
class Removal:
    run_id: str
    run_dir: str
    folder: str
    """'removed', or 'already gone'."""
    removed_files: list[str]

    def to_dict(self) -> dict:
        return dict(vars(self))


def delete_run(ref: str, *, runs_dir: str | os.PathLike | None = None) -> Removal:
    """Remove a run: its folder in the runs folder (only if it looks like one of ours) and its history rows."""
    with RunStore(runs_dir) as store:
        run = store.get_run(ref)
        if run["status"] == "running":
            raise CifarbenchError(f"run {run['id']} is still running (pid {run['pid']} on {run['host']}); "
                                  "stop it first")
        folder = folders.run_folder(runs_dir, run["id"])
        existed = folder.exists() or folder.is_symlink()
        removed = folders.delete_run_folder(folder, run["id"])
        store.delete_run(run["id"])
    return Removal(run["id"], str(folder), "removed" if existed else "already gone", removed)
