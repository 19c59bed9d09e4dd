"""The run history: one SQLite file (standard library), safe for several processes on one host.

WAL mode lets readers run beside a writer, the busy timeout turns lock contention into waiting instead of
"database is locked", and every write is one short `BEGIN IMMEDIATE` transaction. Every SQLite or JSON
failure (a damaged or foreign file, a full disk) leaves a public method as one CifarbenchError line.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.fsutil import check_regular_file, pid_alive
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
_TABLES = {"runs", "epochs"}
MIN_PREFIX = 6
"""The shortest id prefix that may name a run (shorter ones match too much by accident)."""
_ASK = "name a run id (`cifarbench runs` lists them)"
_T = TypeVar("_T")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _guarded(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn SQLite's errors (and an integer too large for it) into one CifarbenchError line naming the file."""
    @functools.wraps(method)
    def wrapper(self: RunStore, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OverflowError) as exc:
            raise self._error(exc) from None
    return wrapper


class RunStore:
    """Runs and their per-epoch metrics in `<runs_dir>/cifarbench.db`.

    With `read_only`, nothing is ever written: the folder and file are not created, the schema is neither
    migrated nor switched to WAL, and dead runs are not marked; a store that does not exist yet reads as empty.
    """

    def __init__(self, runs_dir: str | os.PathLike | None = None, *, read_only: bool = False):
        self.dir = resolve_runs_dir(runs_dir)
        self.path = self.dir / "cifarbench.db"
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        if read_only:
            self._open_read_only()
            return
        deadline = time.monotonic() + 60
        while True:
            try:
                self._open()
                break
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL (or migrating it) while another process does the same can answer
                # "locked" at once, without waiting in the busy handler: wait and try again.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise self._error(exc, "cannot be opened") from None
                time.sleep(0.05)
        try:
            self._mark_dead_runs()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists() or self.path.is_symlink():  # SQLite would block on a FIFO, read a device
                check_regular_file(self.path, what="run store", error=CifarbenchError)
            self._db = db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 60000")
            # A newer schema or a foreign file is refused before anything (even the journal mode) is written to it.
            self._check_file()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException as exc:
            if db is not None:
                db.close()
            self._db = None
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            if isinstance(exc, sqlite3.DatabaseError):
                raise self._error(exc, "cannot be opened") from None
            if isinstance(exc, OSError):
                raise CifarbenchError(f"run store folder {self.dir} cannot be created: {exc.strerror or exc}") from None
            raise

    def _open_read_only(self) -> None:
        if not (self.path.exists() or self.path.is_symlink()):
            return  # no history yet: reads as empty, and nothing is created
        check_regular_file(self.path, what="run store", error=CifarbenchError)
        try:
            # mode=rw never creates the file, and query_only refuses every change. (mode=ro would leave the WAL's
            # -wal and -shm files behind, as a read-only connection cannot remove them when it closes.) In a
            # folder we cannot write (a read-only mount, a teacher's share) SQLite cannot make the WAL's -shm file,
            # even with mode=ro, so the file is read as it is on disk: immutable, without locks or -shm.
            mode = "rw" if os.access(self.dir, os.W_OK) else "ro&immutable=1"
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True, timeout=60,
                                       isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA query_only = ON")
            self._db.execute("PRAGMA busy_timeout = 60000")
            if self._check_file() == 0:  # created but never initialised (a writer died at once): no runs yet
                self.close()
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "cannot be opened") from None
            raise

    def _error(self, exc: BaseException, doing: str = "") -> CifarbenchError:
        """One line for an SQLite error: what happened to which file, and what to do about it."""
        text = _one_line(exc)
        if isinstance(exc, OverflowError):
            hint = "; a number is too large to store (SQLite integers are 64-bit)"
        elif "full" in text:
            hint = "; free space on that disk, or point {runs_dir} / $CIFARBENCH_HOME at another one"
        elif "malformed" in text or "not a database" in text or "no such table" in text or "no such column" in text:
            hint = ("; the file is damaged or not a cifarbench run store: move it aside (a new one is started) or "
                    "point {runs_dir} elsewhere")
        else:
            hint = ""
        return CifarbenchError("run store {path}{doing}: {text}" + hint, path=self.path,
                               doing=" " + doing if doing else "", text=text, runs_dir=Keyword("runs_dir", ...))

    def _check_file(self) -> int:
        """The file's schema version, refusing a newer one and an SQLite file that holds someone else's tables."""
        assert self._db is not None
        # One statement, so a writer initialising the file meanwhile cannot be seen half-way.
        version, names = self._db.execute(
            "SELECT (SELECT user_version FROM pragma_user_version),"
            " (SELECT group_concat(name, char(31)) FROM sqlite_master WHERE type = 'table')").fetchone()
        self._check_version(version, max(MIGRATIONS))
        tables = {n for n in (names or "").split("\x1f") if n and not n.startswith("sqlite_")}
        if (version == 0 and not tables <= _TABLES) or (version > 0 and not _TABLES <= tables):
            held = ", ".join(map(repr, sorted(tables)))[:200] or "none"
            raise CifarbenchError("run store {path} is an SQLite file but not a cifarbench run store (it holds "
                                  "tables {held}); point {runs_dir} elsewhere", path=self.path, held=held,
                                  runs_dir=Keyword("runs_dir", ...))
        return version

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.read_only or self._db is None:
            raise CifarbenchError(f"run store {self.path} was opened read-only")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may have rolled back itself (a full disk does); the first error is the one to report
            raise

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
            raise CifarbenchError("run store {path} has schema {version}, newer than this cifarbench ({target}); "
                                  "upgrade cifarbench, or use another {runs_dir}", path=self.path, version=version,
                                  target=target, runs_dir=Keyword("runs_dir"))

    @_guarded
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

    @_guarded
    def start_run(self, record: RunRecord, *, model_sha256: str | None = None, finished: bool = False) -> None:
        """Record a run that starts now (status 'running'), or one that arrives finished with its history: an
        imported run, or (`finished`) one of ours trained elsewhere (a Ray task's)."""
        c = record.config
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, created_at, status, model, recipe, seed, epochs, device, params, config_json,"
                " dataset_json, code_version, torch_version, run_dir, host, pid, flops_per_image, world_size,"
                " environment_json, model_sha256, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.run_id, time.time(), "running" if record.origin is None and not finished else record.status,
                 record.model,
                 record.recipe, record.seed, record.epochs, record.device, record.params, json.dumps(c),
                 json.dumps(record.dataset), record.environment.get("code_version"),
                 record.environment.get("torch_version"), record.run_dir, socket.gethostname(), os.getpid(),
                 record.flops_per_image, record.world_size, json.dumps(record.environment), model_sha256,
                 record.origin))
            if record.origin is not None or finished:  # it arrives finished, with its history
                self._finish(db, record)
                for h in record.history:
                    self._add_epoch(db, record.run_id, h)

    @_guarded
    def reopen_run(self, run_id: str) -> None:
        """Mark a stopped run as running again (it is being resumed by this process)."""
        with self._write() as db:
            cur = db.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, pid = ?"
                             " WHERE id = ? AND status != 'running'", (socket.gethostname(), os.getpid(), run_id))
        if cur.rowcount != 1:
            raise CifarbenchError(f"run {run_id!r} is not in {self.path} or is still running")

    @_guarded
    def add_epoch(self, run_id: str, metrics: EpochMetrics) -> None:
        with self._write() as db:
            self._add_epoch(db, run_id, metrics)

    @staticmethod
    def _add_epoch(db: sqlite3.Connection, run_id: str, metrics: EpochMetrics) -> None:
        values = metrics.to_dict()
        db.execute(f"INSERT OR REPLACE INTO epochs (run_id, {', '.join(_EPOCH_FIELDS)})"
                   f" VALUES (?{', ?' * len(_EPOCH_FIELDS)})", (run_id, *(values[k] for k in _EPOCH_FIELDS)))

    @_guarded
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
        record = RunRecord(run_id=row["id"], model=row["model"], recipe=row["recipe"], seed=row["seed"],
                           epochs=row["epochs"], status=row["status"], test_accuracy=row["test_accuracy"],
                           test_loss=row["test_loss"], train_seconds=row["train_seconds"],
                           wall_seconds=row.get("wall_seconds"), steps=row.get("steps"), params=row["params"],
                           flops_per_image=row.get("flops_per_image"), train_flops=row.get("train_flops"),
                           device=row["device"], world_size=row.get("world_size") or 1, dataset=row["dataset"] or {},
                           history=[EpochMetrics.from_dict(h) for h in row.get("history", [])], config=row["config"],
                           run_dir=row["run_dir"], error=row.get("error"), origin=row.get("origin"))
        record.environment = row.get("environment") or {k: row[k] for k in ("code_version", "torch_version") if row[k]}
        return record

    @_guarded
    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run with its config, dataset and epochs decoded: the exact id, or a unique prefix of at least
        MIN_PREFIX characters (compared exactly: case matters, and no character is a wildcard)."""
        if not isinstance(run_id, str) or not run_id.strip():
            raise CifarbenchError(_ASK)
        if self._db is None:
            raise CifarbenchError(f"run {run_id!r} is not in {self.path} (`cifarbench runs` lists them)")
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is not None:
            return self._decode(row)
        if len(run_id) < MIN_PREFIX:
            raise CifarbenchError(f"run {run_id!r} is not in {self.path}; an id prefix needs at least {MIN_PREFIX} "
                                  "characters (`cifarbench runs` lists them)")
        rows = self._db.execute("SELECT * FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                                (len(run_id), run_id)).fetchall()
        if len(rows) == 1:
            return self._decode(rows[0])
        if rows:
            shown = ", ".join(repr(r["id"]) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise CifarbenchError(f"run {run_id!r} matches several runs in {self.path} ({shown}); give more of the id")
        raise CifarbenchError(f"run {run_id!r} is not in {self.path} (`cifarbench runs` lists them)")

    @_guarded
    def list_runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs, newest first."""
        if self._db is None:
            return []
        sql = "SELECT * FROM runs ORDER BY created_at DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._decode(r, with_epochs=False) for r in self._db.execute(sql).fetchall()]

    def _decode(self, row: sqlite3.Row, with_epochs: bool = True) -> dict[str, Any]:
        assert self._db is not None
        run = dict(row)
        try:
            run["config"] = _json_field(run.pop("config_json"), dict, "config_json")
            run["dataset"] = _json_field(run.pop("dataset_json") or "null", (dict, type(None)), "dataset_json")
            run["environment"] = _json_field(run.pop("environment_json", None) or "null", (dict, type(None)),
                                             "environment_json")
        except KeyError as exc:
            raise CifarbenchError("run store {path}: table runs has no column {exc}; not a cifarbench run store "
                                  "(point {runs_dir} elsewhere)", path=self.path, exc=exc,
                                  runs_dir=Keyword("runs_dir", ...)) from None
        except ValueError as exc:
            raise CifarbenchError(f"run store {self.path}: run {run.get('id')!r} has a damaged {exc}; remove it with "
                                  f"`cifarbench runs rm {run.get('id')}`") from None
        if self.read_only and run.get("status") == "running" and run.get("host") == socket.gethostname() \
                and run.get("pid") and not pid_alive(run["pid"]):
            run["status"] = "crashed"  # what a writer would mark it (_mark_dead_runs); a reader only reports it
        if with_epochs:
            run["history"] = [dict(r) for r in self._db.execute(
                f"SELECT {', '.join(_EPOCH_FIELDS)} FROM epochs WHERE run_id = ? ORDER BY epoch", (run["id"],))]
        return run

    @_guarded
    def delete_run(self, run_id: str) -> bool:
        """Remove a run's row and its epochs (exact id); False when there was no such run."""
        with self._write() as db:
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            return db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0


def _json_field(text: Any, kind: type | tuple[type, ...], column: str) -> Any:
    """A JSON column's value, or ValueError("COLUMN (why)") when it is not JSON of the expected kind."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{column} (not JSON: {_one_line(exc)[:80]})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{column} (JSON {type(value).__name__}, not an object)")
    return value
