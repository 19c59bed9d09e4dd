"""`tune` on tiny data: Optuna's study in the runs folder, every trial a stored run scored on the validation split
(never the test set), pruned trials recorded as pruned, the study resumed by running again, and the best trial
scored on the test set exactly once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from cifarbench import tuning
from cifarbench.api import write_study
from cifarbench.cli import main
from cifarbench.errors import CifarbenchError
from cifarbench.runs.store import RunStore
from cifarbench.training import loop
from cifarbench.training.recipes import make_config
from cifarbench.tuning import parse_param, tune

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

PARAMS = [parse_param("optimizer.lr=log:1e-3:3e-1"), parse_param("optimizer.momentum=float:0:0.9")]


def base(data: Path, epochs: int = 2, **choices):
    return make_config("fnn", data_dir=str(data), verify=False, epochs=epochs, batch_size=20, device="cpu",
                       val_split=20, **choices)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the test set is evaluated: by a training's final evaluation, and by tune's one score."""
    calls = {"training": 0, "tune": 0}
    final, score = loop._Setup.final_evaluation, tuning.score_on_test

    def counted_final(self):
        calls["training"] += 1
        return final(self)

    def counted_score(*args, **kwargs):
        calls["tune"] += 1
        return score(*args, **kwargs)

    monkeypatch.setattr(loop._Setup, "final_evaluation", counted_final)
    monkeypatch.setattr(tuning, "score_on_test", counted_score)
    return calls


def runs_of(runs: Path) -> dict[str, dict]:
    with RunStore(runs, read_only=True) as store:
        return {r["id"]: r for r in store.list_runs()}


def test_four_trials_then_two_more_resume_the_study_and_test_is_scored_once(tiny_py: Path, tmp_path: Path,
                                                                           counted: dict[str, int]) -> None:
    runs = tmp_path / "runs"
    first = tune(base(tiny_py), PARAMS, trials=4, runs_dir=runs, study="lr")
    assert [t.number for t in first.trials] == [0, 1, 2, 3] and first.new_trials == 4
    assert Path(first.storage) == runs / "studies" / "lr.db"
    stored = runs_of(runs)
    assert {t.run_id for t in first.trials} == set(stored)  # every trial is a stored run, linked by its id
    assert first.best is not None and first.best.value == max(t.value for t in first.trials if t.state == "complete")
    # The test set: never in a trial, once for the best trial's model, kept as that run's test accuracy.
    assert counted == {"training": 0, "tune": 1} and first.tested_now
    assert stored[first.best.run_id]["test_accuracy"] == first.test_accuracy
    assert all(r["test_accuracy"] is None for i, r in stored.items() if i != first.best.run_id)
    for trial in first.trials:  # its value is the last epoch's validation accuracy, as stored with the run
        if trial.state == "complete":
            with RunStore(runs, read_only=True) as store:
                assert store.get_run(trial.run_id)["history"][-1]["val_accuracy"] == trial.value

    again = write_study(tune(base(tiny_py), PARAMS, trials=2, runs_dir=runs, study="lr"), tmp_path / "study.html",
                        runs_dir=runs)
    assert [t.number for t in again.trials] == [0, 1, 2, 3, 4, 5] and again.new_trials == 2
    assert len(runs_of(runs)) == 6
    changed = again.best.number != first.best.number
    assert counted == {"training": 0, "tune": 1 + changed} and again.tested_now == changed
    page = (tmp_path / "study.html").read_text()
    assert "Optimisation history" in page and "Parameter importances" in page and "Best trial" in page
    assert again.importances and set(again.importances) == {"optimizer.lr", "optimizer.momentum"}
    report = tune(base(tiny_py), PARAMS, trials=0, runs_dir=runs, study="lr")  # the study as it is: nothing new
    assert report.new_trials == 0 and report.best == again.best and report.test_accuracy == again.test_accuracy
    assert not report.tested_now and counted == {"training": 0, "tune": 1 + changed}


def test_a_pruned_trial_is_recorded_as_pruned(tiny_py: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pruner that stops every trial after its warm-up: what the median rule does to a trial below the median.
    monkeypatch.setattr(optuna.pruners, "MedianPruner",
                        lambda **kw: optuna.pruners.ThresholdPruner(lower=1.5, n_warmup_steps=kw["n_warmup_steps"]))
    # (every epoch's validation accuracy is below 1.5: stopped as soon as the warm-up allows)
    out = tune(base(tiny_py, epochs=3), PARAMS, trials=2, runs_dir=tmp_path / "runs")
    assert [t.state for t in out.trials] == ["pruned", "pruned"] and out.best is None
    assert [t.epochs for t in out.trials] == [tuning.WARMUP_EPOCHS + 1] * 2
    stored = runs_of(tmp_path / "runs")
    assert [stored[t.run_id]["status"] for t in out.trials] == ["pruned", "pruned"]
    with sqlite3.connect(Path(out.storage)) as db:
        assert db.execute("SELECT state FROM trials").fetchall() == [("PRUNED",), ("PRUNED",)]


def test_tune_without_a_validation_split_is_refused_in_one_line(tiny_py: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    argv = ["tune", "fnn", "--param", "optimizer.lr=log:1e-3:1e-1", "--data-dir", str(tiny_py), "--no-verify",
            "--device", "cpu", "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-split" in err and "test" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(CifarbenchError, match="val_split"):  # from Python, the keyword's spelling
        tune(make_config("fnn", data_dir=str(tiny_py), verify=False), PARAMS, trials=1, runs_dir=tmp_path / "r")


def test_the_cli_runs_a_study_and_prints_the_one_test_score(tiny_py: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    argv = ["tune", "fnn", "--param", "optimizer.lr=log:1e-3:1e-1", "--trials", "2", "--val-split", "20",
            "--epochs", "1", "--batch-size", "20", "--data-dir", str(tiny_py), "--no-verify", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["study"] == "tune-fnn" and len(out["trials"]) == 2 and out["tested_now"]
    assert out["test_accuracy"] == runs_of(tmp_path / "runs")[out["best"]["run_id"]]["test_accuracy"]


@pytest.mark.parametrize("spec, message", [
    ("learning_rate=log:1e-3:1e-1", "unknown config field .learning_rate."),  # the same check as --set
    ("optimizer.momentum=float:0:1.5", "optimizer.momentum"),
    ("optimizer.name=choice:sgd,rmsprop", "optimizer.name"),
    ("optimizer.lr=log:0:1", "LOW > 0"),
    ("optimizer.lr=uniform:0:1", "KIND one of"),
])
def test_a_param_is_checked_like_set(tiny_py: Path, tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(CifarbenchError, match=message):
        tune(base(tiny_py), [parse_param(spec)], trials=1, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_run_options_keyword_names_its_field() -> None:
    # `--param lr=...` searches what `train --lr` sets; the trials and the study name the field.
    assert parse_param("lr=log:1e-3:3e-1") == parse_param("optimizer.lr=log:1e-3:3e-1")
    assert str(parse_param("optimizer=choice:sgd,adamw")) == "optimizer.name=choice:sgd,adamw"
    assert parse_param("epochs=int:1:3").name == "epochs"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_a_study_name_cannot_leave_the_studies_folder(tiny_py: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(CifarbenchError, match="study name"):
        tune(base(tiny_py), PARAMS, trials=1, runs_dir=tmp_path / "runs", study=name)


@pytest.mark.parametrize("planted", ["garbage", "hard link", "journal link"])
def test_a_planted_study_file_is_refused_in_one_line_and_nothing_outside_is_written(
        tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture, planted: str) -> None:
    studies, victim = tmp_path / "runs" / "studies", tmp_path / "victim.db"
    studies.mkdir(parents=True)
    victim.write_bytes(b"")
    if planted == "garbage":
        (studies / "s.db").write_bytes(b"not a database" * 100)
    elif planted == "hard link":
        (studies / "s.db").hardlink_to(victim)
    else:
        (studies / "s.db-journal").symlink_to(victim)
    code = main(["tune", "fnn", "--param", "optimizer.lr=log:1e-3:1e-1", "--study", "s", "--val-split", "20",
                 "--data-dir", str(tiny_py), "--no-verify", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "s.db" in err and "Traceback" not in err, err
    assert victim.read_bytes() == b""


def test_a_study_of_another_config_is_not_resumed(tiny_py: Path, tmp_path: Path) -> None:
    tune(base(tiny_py, epochs=1), PARAMS[:1], trials=1, runs_dir=tmp_path / "runs", study="s")
    with pytest.raises(CifarbenchError, match="differs in: epochs"):
        tune(base(tiny_py, epochs=2), PARAMS[:1], trials=1, runs_dir=tmp_path / "runs", study="s")


def test_ctrl_c_keeps_the_study_and_says_how_to_go_on(tiny_py: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarbench import running
    from cifarbench.errors import Interrupted

    tune(base(tiny_py), PARAMS, trials=2, runs_dir=tmp_path / "runs", study="s")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "train_run", interrupted)
    with pytest.raises(Interrupted, match="trial 2 .*2 earlier trials: the same command adds trials"):
        tune(base(tiny_py), PARAMS, trials=2, runs_dir=tmp_path / "runs", study="s")
    monkeypatch.undo()
    after = tune(base(tiny_py), PARAMS, trials=0, runs_dir=tmp_path / "runs", study="s")
    assert [t.state for t in after.trials] == ["complete", "complete", "fail"]
