"""The run history: one SQLite file (standard library), safe for several processes on one host.

WAL mode lets readers run beside a writer, the busy timeout turns lock contention into waiting instead of
"database is locked", and every write is one short `BEGIN IMMEDIATE` transaction.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import pid_alive
from cifarbench.runs.folders import resolve_runs_dir
from cifarbench.runs.records import RunRecord
from cifarbench.training.state import EpochMetrics

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,            -- running | completed | failed | interrupted | crashed
    model TEXT NOT NULL,
    recipe TEXT NOT NULL,
    seed INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    device TEXT,
    params INTEGER,
    test_accuracy REAL,
    test_loss REAL,
    train_seconds REAL,
    config_json TEXT NOT NULL,
    dataset_json TEXT,
    code_version TEXT,
    torch_version TEXT,
    run_dir TEXT,
    host TEXT,
    pid INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    train_loss REAL,
    test_loss REAL,
    test_accuracy REAL,
    seconds REAL,
    eval_seconds REAL,
    PRIMARY KEY (run_id, epoch)
);
"""


def _to_v1(db: sqlite3.Connection) -> None:
    """Version 1: the runs and epochs tables."""
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            db.execute(statement)


def _to_v2(db: sqlite3.Connection) -> None:
    """Version 2: every epoch field (validation too), the run's compute and provenance, its model code's hash,
    and where it came from (trained here, or imported)."""
    for column in ("val_loss REAL", "val_accuracy REAL"):
        db.execute(f"ALTER TABLE epochs ADD COLUMN {column}")
    for column in ("flops_per_image INTEGER", "train_flops INTEGER", "wall_seconds REAL", "steps INTEGER",
                   "world_size INTEGER", "environment_json TEXT", "model_sha256 TEXT", "origin TEXT"):
        db.execute(f"ALTER TABLE runs ADD COLUMN {column}")


# MIGRATIONS[n] turns a version n-1 database into version n (PRAGMA user_version); a new version appends
# one step (ALTER TABLE ..., a data fix-up) and never edits an old one. Version 0 is a new, empty file.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_v1, 2: _to_v2}
SCHEMA_VERSION = max(MIGRATIONS)  # what this cifarbench writes
_EPOCH_FIELDS = ("epoch", "train_loss", "test_loss", "test_accuracy", "seconds", "eval_seconds", "val_loss",
                 "val_accuracy")


class RunStore:
    """Runs and their per-epoch metrics in `<runs_dir>/cifarbench.db`."""

    def __init__(self, runs_dir: str | os.PathLike | None = None):
        self.dir = resolve_runs_dir(runs_dir)
        self.path = self.dir / "cifarbench.db"
        deadline = time.monotonic() + 60
        while True:
            try:
                self._open()
                break
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL (or migrating it) while another process does the same can answer
                # "locked" at once, without waiting in the busy handler: wait and try again.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise CifarbenchError(f"run store {self.path} cannot be opened: {exc}") from None
                time.sleep(0.05)
        self._mark_dead_runs()

    def _open(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 60000")
            # A newer schema is refused before anything (even the journal mode) is written to the file.
            self._check_version(self._db.execute("PRAGMA user_version").fetchone()[0], max(MIGRATIONS))
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            if isinstance(exc, sqlite3.DatabaseError):
                raise CifarbenchError(f"run store {self.path} cannot be opened: {exc}") from None
            if isinstance(exc, OSError):
                raise CifarbenchError(f"run store folder {self.dir} cannot be created: {exc.strerror or exc}") from None
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        target = max(MIGRATIONS)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version, target)
        if version == target:
            return
        # All steps in one write transaction: another process opening the same file waits on the lock and
        # then sees the new version, and a step that fails leaves the file at its old version.
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version, target)
            for step in range(version + 1, target + 1):
                try:
                    MIGRATIONS[step](db)
                except (KeyError, sqlite3.Error) as exc:
                    raise CifarbenchError(f"run store {self.path}: cannot migrate schema {step - 1} to {step}: "
                                          f"{exc}; the file is unchanged") from None
            db.execute(f"PRAGMA user_version = {target}")

    def _check_version(self, version: int, target: int) -> None:
        if version > target:
            raise CifarbenchError(f"run store {self.path} has schema {version}, newer than this cifarbench "
                                  f"({target}); upgrade cifarbench, or use another --runs-dir")

    def _mark_dead_runs(self) -> None:
        """A run left 'running' by a process that no longer exists on this host crashed."""
        host = socket.gethostname()
        rows = self._db.execute("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)).fetchall()
        dead = [r["id"] for r in rows if r["pid"] and not pid_alive(r["pid"])]
        if dead:
            with self._write() as db:
                db.executemany("UPDATE runs SET status = 'crashed', finished_at = ?"
                               " WHERE id = ? AND status = 'running'",
                               [(time.time(), rid) for rid in dead])

    def start_run(self, record: RunRecord, *, model_sha256: str | None = None) -> None:
        """Record a run that starts now (status 'running', or the record's own status for an imported run)."""
        c = record.config
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, created_at, status, model, recipe, seed, epochs, device, params, config_json,"
                " dataset_json, code_version, torch_version, run_dir, host, pid, flops_per_image, world_size,"
                " environment_json, model_sha256, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.run_id, time.time(), "running" if record.origin is None else record.status, record.model,
                 record.recipe, record.seed, record.epochs, record.device, record.params, json.dumps(c),
                 json.dumps(record.dataset), record.environment.get("code_version"),
                 record.environment.get("torch_version"), record.run_dir, socket.gethostname(), os.getpid(),
                 record.flops_per_image, record.world_size, json.dumps(record.environment), model_sha256,
                 record.origin))
            if record.origin is not None:  # an imported run arrives finished, with its history
                self._finish(db, record)
                for h in record.history:
                    self._add_epoch(db, record.run_id, h)

    def reopen_run(self, run_id: str) -> None:
        """Mark a stopped run as running again (it is being resumed by this process)."""
        with self._write() as db:
            cur = db.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, pid = ?"
                             " WHERE id = ? AND status != 'running'", (socket.gethostname(), os.getpid(), run_id))
        if cur.rowcount != 1:
            raise CifarbenchError(f"run {run_id!r} is not in {self.path} or is still running")

    def add_epoch(self, run_id: str, metrics: EpochMetrics) -> None:
        with self._write() as db:
            self._add_epoch(db, run_id, metrics)

    @staticmethod
    def _add_epoch(db: sqlite3.Connection, run_id: str, metrics: EpochMetrics) -> None:
        values = metrics.to_dict()
        db.execute(f"INSERT OR REPLACE INTO epochs (run_id, {', '.join(_EPOCH_FIELDS)})"
                   f" VALUES (?{', ?' * len(_EPOCH_FIELDS)})", (run_id, *(values[k] for k in _EPOCH_FIELDS)))

    def finish_run(self, run_id: str, status: str, *, record: RunRecord | None = None,
                   error: str | None = None) -> None:
        """Mark a run finished with `status`; a completed run brings its final `record` (accuracy, cost)."""
        with self._write() as db:
            if record is not None:
                self._finish(db, record)
            db.execute("UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                       (status, time.time(), error, run_id))

    @staticmethod
    def _finish(db: sqlite3.Connection, r: RunRecord) -> None:
        db.execute("UPDATE runs SET status = ?, finished_at = ?, test_accuracy = ?, test_loss = ?, train_seconds = ?,"
                   " wall_seconds = ?, steps = ?, train_flops = ?, error = ? WHERE id = ?",
                   (r.status, time.time(), r.test_accuracy, r.test_loss, r.train_seconds, r.wall_seconds, r.steps,
                    r.train_flops, r.error, r.run_id))

    def record(self, run_id: str) -> RunRecord:
        """One run as a typed record (a unique id prefix is enough)."""
        return self.to_record(self.get_run(run_id))

    @staticmethod
    def to_record(row: dict[str, Any]) -> RunRecord:
        """A decoded row (`get_run`, `list_runs`) as a typed record."""
        record = RunRecord(row["id"], row["model"], row["recipe"], row["seed"], row["epochs"], row["status"],
                           row["test_accuracy"], row["test_loss"], row["train_seconds"], row.get("wall_seconds"),
                           row.get("steps"), row["params"], row.get("flops_per_image"), row.get("train_flops"),
                           row["device"], row.get("world_size") or 1, row["dataset"] or {},
                           [EpochMetrics.from_dict(h) for h in row.get("history", [])], config=row["config"],
                           run_dir=row["run_dir"], error=row.get("error"), origin=row.get("origin"))
        record.environment = row.get("environment") or {k: row[k] for k in ("code_version", "torch_version") if row[k]}
        return record

    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run with its config, dataset and epochs decoded; a unique id prefix is enough."""
        rows = self._db.execute("SELECT * FROM runs WHERE id = ? OR id LIKE ? ORDER BY id = ? DESC",
                                (run_id, run_id.replace("%", "") + "%", run_id)).fetchall()
        exact = [r for r in rows if r["id"] == run_id]
        if not rows or (len(rows) > 1 and not exact):
            what = "matches several runs" if rows else "is not in"
            raise CifarbenchError(f"run {run_id!r} {what} {self.path} (`cifarbench runs` lists them)")
        return self._decode((exact or rows)[0])

    def list_runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs, newest first."""
        sql = "SELECT * FROM runs ORDER BY created_at DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._decode(r, with_epochs=False) for r in self._db.execute(sql).fetchall()]

    def _decode(self, row: sqlite3.Row, with_epochs: bool = True) -> dict[str, Any]:
        run = dict(row)
        run["config"] = json.loads(run.pop("config_json"))
        run["dataset"] = json.loads(run.pop("dataset_json") or "null")
        run["environment"] = json.loads(run.pop("environment_json", None) or "null")
        if with_epochs:
            run["history"] = [dict(r) for r in self._db.execute(
                f"SELECT {', '.join(_EPOCH_FIELDS)} FROM epochs WHERE run_id = ? ORDER BY epoch", (run["id"],))]
        return run

    def delete_run(self, run_id: str) -> bool:
        """Remove a run's row and its epochs (exact id); False when there was no such run."""
        with self._write() as db:
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            return db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0
