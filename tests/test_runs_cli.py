"""`cifarbench runs [list|show|compare|rm]`, backward compatible with `runs --json` / `runs --runs-dir X`;
and optional TensorBoard logging."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import types
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore
from cifarbench.training.state import EpochMetrics


def cli_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main([*argv]) == 0
    return json.loads(capsys.readouterr().out)


def train(capsys: pytest.CaptureFixture, data: Path, runs: str, model: str = "fnn", seed: int = 0,
          epochs: int = 2, *extra: str) -> dict:
    return cli_json(capsys, "train", model, "--data-dir", str(data), "--no-verify", "--epochs", str(epochs), "--seed",
                    str(seed), "--batch-size", "20", "--device", "cpu", "--runs-dir", runs, "--json", *extra)


@pytest.fixture
def two_runs(tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[str, list[dict]]:
    runs = str(tmp_path / "runs")
    return runs, [train(capsys, tiny_py, runs, "fnn", 0), train(capsys, tiny_py, runs, "fnn", 1)]


def test_runs_without_an_action_still_lists(two_runs, capsys: pytest.CaptureFixture) -> None:
    runs, trained = two_runs
    ids = {t["run_id"] for t in trained}
    assert {r["run_id"] for r in cli_json(capsys, "runs", "--json", "--runs-dir", runs)["runs"]} == ids
    assert {r["run_id"] for r in cli_json(capsys, "runs", "--runs-dir", runs, "--json")["runs"]} == ids
    assert {r["run_id"] for r in cli_json(capsys, "runs", "--runs-dir", runs, "list", "--json")["runs"]} == ids
    assert len(cli_json(capsys, "runs", "--runs-dir", runs, "--limit", "1", "--json")["runs"]) == 1
    assert len(cli_json(capsys, "runs", "list", "--runs-dir", runs, "--limit", "1", "--json")["runs"]) == 1
    assert main(["runs", "--runs-dir", runs]) == 0
    listed = capsys.readouterr().out
    assert all(i in listed for i in ids)


def test_runs_show_prints_config_dataset_and_epochs(two_runs, capsys: pytest.CaptureFixture) -> None:
    runs, (first, _) = two_runs
    assert main(["runs", "show", first["run_id"][:-2], "--runs-dir", runs]) == 0  # a unique prefix is enough
    out = capsys.readouterr().out
    assert first["run_id"] in out and first["dataset"]["sha256"] in out and '"batch_size": 20' in out
    assert "| epoch | train loss" in out and "\n| 2 " in out
    shown = cli_json(capsys, "runs", "--json", "--runs-dir", runs, "show", first["run_id"])  # flags before the action
    assert shown["run_id"] == first["run_id"] and [h["epoch"] for h in shown["history"]] == [1, 2]
    assert main(["runs", "show", "nope", "--runs-dir", runs]) == 1
    assert "not in" in capsys.readouterr().err


def test_runs_compare_tabulates_stored_runs_without_training(two_runs, capsys: pytest.CaptureFixture,
                                                             tiny_py: Path) -> None:
    runs, trained = two_runs
    cnn = train(capsys, tiny_py, runs, "cnn", 0, 1)
    ids = [t["run_id"] for t in trained] + [cnn["run_id"]]
    out = cli_json(capsys, "runs", "compare", *ids, "--target", "0.2", "--runs-dir", runs, "--json")
    fnn_row, cnn_row = out["results"]
    assert (fnn_row["model"], fnn_row["seeds"], cnn_row["model"], cnn_row["seeds"]) == ("fnn", [0, 1], "cnn", [0])
    assert fnn_row["test_accuracy_mean"] == pytest.approx(sum(t["test_accuracy"] for t in trained) / 2)
    assert fnn_row["macs_per_image"] == 394_496 and cnn_row["flops_per_image"] == 2 * 4_188_800
    first_hit = next((h for h in trained[0]["history"] if h["test_accuracy"] >= 0.2), None)
    expected = {"epoch": first_hit["epoch"], "seconds": first_hit["seconds"]} if first_hit else None
    assert out["runs"][0]["time_to_target"] == expected
    assert fnn_row["time_to_target"]["per_seed"][0]["reached"] is (first_hit is not None)
    assert main(["runs", "compare", *ids, "--target", "0.2", "--runs-dir", runs]) == 0
    text = capsys.readouterr().out
    assert "| fnn" in text and "| cnn" in text and "time to 20%" in text and ids[2] in text
    assert main(["runs", "compare", ids[0], "--target", "90", "--runs-dir", runs]) == 1
    assert "0.9 for 90%" in capsys.readouterr().err


def test_runs_rm_removes_rows_epochs_and_folder(two_runs, capsys: pytest.CaptureFixture) -> None:
    runs, (first, second) = two_runs
    folder = Path(first["run_dir"])
    out = cli_json(capsys, "runs", "rm", first["run_id"], "--runs-dir", runs, "--json")
    assert out["removed"][0]["folder"] == "removed" and not folder.exists() and folder.parent.is_dir()
    db = sqlite3.connect(Path(runs) / "cifarbench.db")
    assert db.execute("SELECT count(*) FROM runs WHERE id = ?", (first["run_id"],)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM epochs WHERE run_id = ?", (first["run_id"],)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM epochs WHERE run_id = ?", (second["run_id"],)).fetchone()[0] == 2
    assert Path(second["run_dir"]).is_dir()


def test_runs_rm_refuses_what_does_not_look_like_a_run_folder(two_runs, capsys: pytest.CaptureFixture) -> None:
    runs, (first, second) = two_runs
    folder = Path(first["run_dir"])
    (folder / "notes.txt").write_text("mine")
    assert main(["runs", "rm", first["run_id"], "--runs-dir", runs]) == 1
    err = capsys.readouterr().err
    assert "refusing to delete" in err and "notes.txt" in err and len(err.strip().splitlines()) == 1
    assert (folder / "checkpoint.pt").is_file() and (folder / "notes.txt").is_file()
    with RunStore(runs) as store:
        assert store.get_run(first["run_id"])["id"] == first["run_id"]  # the row stays too

    # A row whose run_dir points somewhere else (a hand-edited or copied history): the folder deleted is the
    # run's own in --runs-dir, never the stored path.
    elsewhere = folder.parent.parent / "precious" / second["run_id"]
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text(json.dumps({"run_id": second["run_id"]}))
    db = sqlite3.connect(Path(runs) / "cifarbench.db")
    db.execute("UPDATE runs SET run_dir = ? WHERE id = ?", (str(elsewhere), second["run_id"]))
    db.commit()
    assert main(["runs", "rm", second["run_id"], "--runs-dir", runs]) == 0
    assert (elsewhere / "config.json").is_file() and not (Path(runs) / second["run_id"]).exists()


def test_runs_rm_of_a_run_whose_folder_is_gone_and_of_a_running_run(two_runs, capsys: pytest.CaptureFixture) -> None:
    runs, (first, second) = two_runs
    for f in Path(first["run_dir"]).iterdir():
        f.unlink()
    Path(first["run_dir"]).rmdir()
    removed = cli_json(capsys, "runs", "rm", first["run_id"], "--runs-dir", runs, "--json")["removed"]
    assert removed[0]["folder"] == "already gone"
    db = sqlite3.connect(Path(runs) / "cifarbench.db")
    db.execute("UPDATE runs SET status = 'running', pid = ? WHERE id = ?", (os.getpid(), second["run_id"]))
    db.commit()
    assert main(["runs", "rm", second["run_id"], "--runs-dir", runs]) == 1
    assert "still running" in capsys.readouterr().err and Path(second["run_dir"]).is_dir()


def test_store_delete_run(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        store.start_run(RunRecord(run_id="r1", model="fnn", recipe="seed", seed=0, epochs=1, config={"model": "fnn"},
                                  device="cpu", params=1))
        store.add_epoch("r1", EpochMetrics(epoch=1, train_loss=1.0, test_loss=1.0, test_accuracy=0.1, seconds=1.0,
                                           eval_seconds=0.1))
        assert store.delete_run("r1") is True and store.delete_run("r1") is False and store.list_runs() == []


class FakeWriter:
    logs: dict[str, list[tuple[str, float, int]]] = {}

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        FakeWriter.logs[log_dir] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        FakeWriter.logs[self.log_dir].append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_tensorboard_logs_every_epoch_when_installed(tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.logs.clear()
    out = train(capsys, tiny_py, str(tmp_path / "runs"), "fnn", 3, 2, "--tensorboard", str(tmp_path / "tb"))
    (log_dir, scalars), = FakeWriter.logs.items()
    assert log_dir.startswith(str(tmp_path / "tb")) and log_dir.endswith("-fnn-s3")
    accuracy = [(step, value) for tag, value, step in scalars if tag == "test/accuracy"]
    assert accuracy == [(h["epoch"], h["test_accuracy"]) for h in out["history"]]
    assert {tag for tag, _, _ in scalars} >= {"train/loss", "test/loss", "time/train_seconds"}


def test_tensorboard_missing_is_a_one_line_error_before_training(tiny_py: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["compare", "fnn", "--data-dir", str(tiny_py), "--no-verify", "--epochs", "1",
                 "--runs-dir", str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the tensorboard package" in err[0]
    assert not (tmp_path / "runs" / "cifarbench.db").exists() or RunStore(tmp_path / "runs").list_runs() == []
