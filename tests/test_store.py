"""The run history: rows, epochs, crash marking, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from cifarbench.errors import CifarbenchError
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore, resolve_runs_dir
from cifarbench.training.state import EpochMetrics

CONFIG = {"model": "fnn", "recipe": "seed", "seed": 0, "epochs": 2}


def start(store: RunStore, run_id: str) -> None:
    store.start_run(RunRecord(run_id=run_id, model="fnn", recipe="seed", seed=0, epochs=2, config=CONFIG,
                              dataset={"sha256": "ab"}, device="cpu", params=10, run_dir="/x",
                              environment={"code_version": "v", "torch_version": "t"}))


def test_run_lifecycle(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        start(store, "run-one")
        store.add_epoch("run-one", EpochMetrics(epoch=1, train_loss=2.0, test_loss=1.9, test_accuracy=0.3, seconds=1.0,
                                                eval_seconds=0.1, val_loss=2.5, val_accuracy=0.25))
        assert store.get_run("run-one")["status"] == "running"
        store.finish_run("run-one", "completed",
                         record=RunRecord(run_id="run-one", model="fnn", recipe="seed", seed=0, epochs=2,
                                          status="completed", test_accuracy=0.3, test_loss=1.9, train_seconds=1.0))
        run = store.get_run("run-on")  # unique prefix of 6 characters
        assert run["status"] == "completed" and run["config"] == CONFIG and run["history"][0]["test_accuracy"] == 0.3
        assert (run["history"][0]["val_loss"], run["history"][0]["val_accuracy"]) == (2.5, 0.25)  # every epoch field
        assert run["test_accuracy"] == 0.3 and run["train_seconds"] == 1.0
        assert [r["id"] for r in store.list_runs()] == ["run-one"]
        with pytest.raises(CifarbenchError, match="not in"):
            store.get_run("zzz")
    db = sqlite3.connect(tmp_path / "cifarbench.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2


@pytest.mark.slow
def test_run_of_a_dead_process_is_marked_crashed(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        start(store, "dead")
        start(store, "alive")
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()
    db = sqlite3.connect(tmp_path / "cifarbench.db")
    db.execute("UPDATE runs SET pid = ? WHERE id = 'dead'", (proc.pid,))
    db.commit()
    with RunStore(tmp_path) as store:
        assert store.get_run("dead")["status"] == "crashed"
        assert store.get_run("alive")["status"] == "running"  # this process is still alive


def _writer(path: str, worker: int, count: int) -> None:
    with RunStore(path) as store:
        for i in range(count):
            start(store, f"w{worker}-{i}")


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    db = sqlite3.connect(tmp_path / "cifarbench.db")
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 200
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "cifarbench.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    with pytest.raises(CifarbenchError, match="newer"):
        RunStore(tmp_path)


def test_runs_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFARBENCH_HOME")
    assert resolve_runs_dir() == Path("runs")
    monkeypatch.setenv("CIFARBENCH_HOME", str(tmp_path))
    assert resolve_runs_dir() == tmp_path and resolve_runs_dir("x") == Path("x")
