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
from pathlib import Path
from typing import Any

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import pid_alive

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


# MIGRATIONS[n] turns a version n-1 database into version n (PRAGMA user_version); a new version appends
# one step (ALTER TABLE ..., a data fix-up) and never edits an old one. Version 0 is a new, empty file.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_v1}
SCHEMA_VERSION = max(MIGRATIONS)  # what this cifarbench writes
_EPOCH_FIELDS = ("epoch", "train_loss", "test_loss", "test_accuracy", "seconds", "eval_seconds")


def resolve_runs_dir(runs_dir: str | os.PathLike | None = None) -> Path:
    """The argument (`--runs-dir`), else $CIFARBENCH_HOME, else ./runs."""
    if runs_dir:
        return Path(runs_dir).expanduser()
    env = os.environ.get("CIFARBENCH_HOME")
    return Path(env).expanduser() if env else Path("runs")


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
                db.executemany("UPDATE runs SET status = 'crashed', finished_at = ? "
                               "WHERE id = ? AND status = 'running'", [(time.time(), rid) for rid in dead])

    def start_run(self, run_id: str, *, config: dict, dataset: dict, device: str, params: int, run_dir: str,
                  code_version: str, torch_version: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, created_at, status, model, recipe, seed, epochs, device, params, config_json,"
                " dataset_json, code_version, torch_version, run_dir, host, pid)"
                " VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, time.time(), config["model"], config["recipe"], config["seed"], config["epochs"], device,
                 params, json.dumps(config), json.dumps(dataset), code_version, torch_version, run_dir,
                 socket.gethostname(), os.getpid()))

    def reopen_run(self, run_id: str) -> None:
        """Mark a stopped run as running again (it is being resumed by this process)."""
        with self._write() as db:
            cur = db.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, pid = ?"
                             " WHERE id = ? AND status != 'running'", (socket.gethostname(), os.getpid(), run_id))
        if cur.rowcount != 1:
            raise CifarbenchError(f"run {run_id!r} is not in {self.path} or is still running")

    def add_epoch(self, run_id: str, metrics: dict) -> None:
        with self._write() as db:
            db.execute(f"INSERT OR REPLACE INTO epochs (run_id, {', '.join(_EPOCH_FIELDS)}) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, *(metrics[k] for k in _EPOCH_FIELDS)))

    def finish_run(self, run_id: str, status: str, *, test_accuracy: float | None = None,
                   test_loss: float | None = None, train_seconds: float | None = None,
                   error: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET status = ?, finished_at = ?, test_accuracy = ?, test_loss = ?,"
                       " train_seconds = ?, error = ? WHERE id = ?",
                       (status, time.time(), test_accuracy, test_loss, train_seconds, error, run_id))

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
        if with_epochs:
            run["history"] = [dict(r) for r in self._db.execute(
                f"SELECT {', '.join(_EPOCH_FIELDS)} FROM epochs WHERE run_id = ? ORDER BY epoch", (run["id"],))]
        return run

    def delete_run(self, run_id: str) -> bool:
        """Remove a run's row and its epochs (exact id); False when there was no such run."""
        with self._write() as db:
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            return db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0
