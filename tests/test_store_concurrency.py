"""The run store under pressure: many writer processes, writers killed mid-write, and schema migrations."""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cifarbench.errors import CifarbenchError
from cifarbench.runs import store as store_mod
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore
from cifarbench.training.state import EpochMetrics

CONFIG = {"model": "fnn", "recipe": "seed", "seed": 0, "epochs": 2}

# A writer process: waits for the go file (so all start together), then records COUNT runs, printing each
# id only after its transaction has committed. With PARTY > 0 it also waits, after its first commit, until
# PARTY writers have committed one: on a fast disk a writer can otherwise finish all its rows before the next
# one wakes up, and the "concurrent" test would test nothing.
WRITER = r"""
import sys, time
from pathlib import Path
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore

runs, prefix, count, go, party = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])


def wait_for(done, what):
    deadline = time.monotonic() + 60
    while not done():
        if time.monotonic() > deadline:
            sys.exit(what + " never happened")
        time.sleep(0.002)


print("ready", flush=True)  # imports done: the parent releases everyone at once only after all are here
wait_for(go.exists, "the go file")
config = {"model": "fnn", "recipe": "seed", "seed": 0, "epochs": 2}
with RunStore(runs) as store:
    for i in range(count):
        run_id = f"{prefix}-{i}"
        store.start_run(RunRecord(run_id=run_id, model="fnn", recipe="seed", seed=0, epochs=2, config=config,
                                  dataset={"sha256": "ab"}))
        print(run_id, flush=True)
        if i == 0 and party:
            Path(f"{go}.{prefix}").touch()
            wait_for(lambda: len(list(go.parent.glob(go.name + ".*"))) >= party, "the first commit of all writers")
"""


def writer(runs: Path, prefix: str, count: int, go: Path, party: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(runs), prefix, str(count), str(go), str(party)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=runs.parent)


def integrity(db_file: Path) -> str:
    db = sqlite3.connect(db_file)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def ids(db_file: Path) -> list[str]:
    db = sqlite3.connect(db_file)
    try:
        return [r[0] for r in db.execute("SELECT id FROM runs")]
    finally:
        db.close()


@pytest.mark.slow  # 1-6 s here, depending on the disk and the load
def test_eight_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    runs, go = tmp_path / "runs", tmp_path / "go"
    procs = [writer(runs, f"p{w}", 200, go, party=8) for w in range(8)]  # all open a store that does not exist yet
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    for code, out, err in results:
        assert code == 0, err
        assert "locked" not in err and "Traceback" not in err
        assert len(out.split()) == 200
    stored = ids(runs / "cifarbench.db")
    assert len(stored) == 1600 and len(set(stored)) == 1600
    assert set(stored) == {f"p{w}-{i}" for w in range(8) for i in range(200)}
    assert integrity(runs / "cifarbench.db") == "ok"
    db = sqlite3.connect(runs / "cifarbench.db")
    spans = db.execute("SELECT substr(id, 1, 2), MIN(created_at), MAX(created_at) FROM runs GROUP BY 1").fetchall()
    db.close()
    overlapping = sum(1 for a in spans for b in spans if a < b and a[1] < b[2] and b[1] < a[2])
    assert overlapping == 28  # every pair of the 8 writers was writing at the same time (the barrier's doing)


@pytest.mark.slow
def test_sigkilled_writers_never_lose_a_committed_run(tmp_path: Path) -> None:
    """20 writers, each SIGKILLed at a random moment: every id a writer reported committed is there, and
    the file is intact. Each writer is allowed far more rows than it gets to write before its kill."""
    runs, go = tmp_path / "runs", tmp_path / "go"
    go.touch()
    rng = random.Random(20)
    reported: list[str] = []
    for round_ in range(20):
        proc = writer(runs, f"k{round_}", 100_000, go)
        lines: list[str] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout))  # until EOF
        reader.start()
        first_seen = time.monotonic() + 10
        while len(lines) < 2 and proc.poll() is None and time.monotonic() < first_seen:  # "ready", then ids
            time.sleep(0.002)  # wait until this writer is committing, then kill it mid-stream
        time.sleep(rng.uniform(0, 0.05))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(10)
        proc.stderr.close()  # type: ignore[union-attr]
        assert proc.returncode == -signal.SIGKILL
        reported += [ln.strip() for ln in lines[1:] if ln.endswith("\n")]  # a cut-off last line does not count
    db_file = runs / "cifarbench.db"
    assert integrity(db_file) == "ok"
    stored = set(ids(db_file))
    assert len(reported) >= 20, reported
    missing = [r for r in reported if r not in stored]
    assert not missing, f"{len(missing)} committed ids lost, e.g. {missing[:3]}"
    with RunStore(runs) as store:  # reopening marks the killed writers' runs as crashed
        statuses = {r["status"] for r in store.list_runs()}
    assert statuses == {"crashed"}


# --- migrations -----------------------------------------------------------------------------------------


def start(store: RunStore, run_id: str) -> None:
    store.start_run(RunRecord(run_id=run_id, model="fnn", recipe="seed", seed=0, epochs=2, config=CONFIG,
                              dataset={"sha256": "ab"}, device="cpu", params=10, run_dir="/x",
                              environment={"code_version": "v", "torch_version": "t"}))


def user_version(db_file: Path) -> int:
    db = sqlite3.connect(db_file)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("kind", ["zero-byte file", "sqlite file without tables"])
def test_version_0_database_is_migrated(tmp_path: Path, kind: str) -> None:
    db_file = tmp_path / "cifarbench.db"
    if kind == "zero-byte file":
        db_file.touch()
    else:
        db = sqlite3.connect(db_file)
        db.executescript("CREATE TABLE t (x); DROP TABLE t;")
        db.close()
    assert user_version(db_file) == 0
    with RunStore(tmp_path) as store:
        start(store, "r1")
        assert store.get_run("r1")["status"] == "running"
    assert user_version(db_file) == store_mod.SCHEMA_VERSION == 2
    assert integrity(db_file) == "ok"


def test_migrations_run_in_order_and_keep_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunStore(tmp_path) as store:
        start(store, "old")
    done: list[int] = []

    def to_v3(db: sqlite3.Connection) -> None:
        done.append(3)
        db.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    def to_v4(db: sqlite3.Connection) -> None:
        done.append(4)
        db.execute("UPDATE runs SET note = 'migrated'")

    monkeypatch.setitem(store_mod.MIGRATIONS, 3, to_v3)
    monkeypatch.setitem(store_mod.MIGRATIONS, 4, to_v4)
    with RunStore(tmp_path) as store:
        run = store.get_run("old")
    assert done == [3, 4] and run["note"] == "migrated" and run["config"] == CONFIG
    assert user_version(tmp_path / "cifarbench.db") == 4
    with RunStore(tmp_path):
        pass
    assert done == [3, 4]  # an up-to-date file is not migrated again


def test_a_failing_migration_leaves_the_file_at_its_old_version(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with RunStore(tmp_path) as store:
        start(store, "old")

    def broken(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE runs ADD COLUMN note TEXT")
        db.execute("ALTER TABLE no_such_table ADD COLUMN x")

    monkeypatch.setitem(store_mod.MIGRATIONS, 3, broken)
    with pytest.raises(CifarbenchError, match="cannot migrate schema 2 to 3") as info:
        RunStore(tmp_path)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert user_version(tmp_path / "cifarbench.db") == 2
    with RunStore(tmp_path) as store:
        run = store.get_run("old")
    assert "note" not in run  # the first half of the failed step was rolled back too


def test_newer_schema_is_refused_without_touching_the_file(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    db_file = tmp_path / "cifarbench.db"
    db = sqlite3.connect(db_file)
    db.execute("PRAGMA journal_mode = DELETE")  # what a future version might choose
    db.execute("PRAGMA user_version = 7")
    db.close()
    before = hashlib.sha256(db_file.read_bytes()).hexdigest()
    with pytest.raises(CifarbenchError) as info:
        RunStore(tmp_path)
    message = str(info.value)
    assert "schema 7" in message and "newer" in message and "(2)" in message and "\n" not in message
    assert hashlib.sha256(db_file.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifarbench.db"]


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_migrate_it_once(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runs, go = tmp_path / "runs", tmp_path / "go"
    procs = [writer(runs, f"m{w}", 1, go) for w in range(4)]
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert sorted(ids(runs / "cifarbench.db")) == [f"m{w}-0" for w in range(4)]
    assert user_version(runs / "cifarbench.db") == 2


def test_a_version_1_store_keeps_its_runs_and_gains_every_epoch_field(tmp_path: Path) -> None:
    """A store written before validation figures were kept (schema 1) opens, keeps its rows, and takes new ones."""
    db = sqlite3.connect(tmp_path / "cifarbench.db")
    store_mod._to_v1(db)
    db.execute("INSERT INTO runs (id, created_at, status, model, recipe, seed, epochs, config_json, test_accuracy)"
               " VALUES ('old', 0, 'completed', 'fnn', 'seed', 0, 1, '{}', 0.4)")
    db.execute("INSERT INTO epochs (run_id, epoch, train_loss, test_accuracy) VALUES ('old', 1, 2.0, 0.4)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with RunStore(tmp_path) as store:
        old = store.record("old")
        assert (old.test_accuracy, old.history[0].test_accuracy, old.history[0].val_accuracy) == (0.4, 0.4, None)
        start(store, "new")
        store.add_epoch("new", EpochMetrics(epoch=1, train_loss=1.0, test_loss=1.1, test_accuracy=0.5, seconds=2.0,
                                            eval_seconds=0.1, val_loss=1.2, val_accuracy=0.45))
        assert store.record("new").history[0].val_accuracy == 0.45
    assert user_version(tmp_path / "cifarbench.db") == 2
