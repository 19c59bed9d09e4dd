"""Interruptions leave nothing stranded: a stopped run names itself and its resume command, SIGTERM is recorded
as a stop (not a crash), and `compare` reuses finished runs, so an interrupted compare finishes by running the same
command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarbench import comparing
from cifarbench.cli import main
from cifarbench.runs.store import RunStore


def completed(runs: Path) -> list[dict]:
    with RunStore(runs, read_only=True) as store:
        return [r for r in store.list_runs() if r["status"] == "completed"]


def test_compare_after_train_reuses_the_trained_run_and_retrain_trains_again(
        tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    flags = ["--epochs", "1", "--batch-size", "50", "--data-dir", str(tiny_py), "--no-verify", "--runs-dir", str(runs),
             "--device", "cpu"]
    assert main(["train", "fnn", *flags]) == 0
    (first,) = [r["id"] for r in completed(runs)]
    capsys.readouterr()
    assert main(["compare", "fnn", "--seeds", "2", "--json", *flags]) == 0
    out, err = capsys.readouterr()
    ids = [r["run_id"] for r in json.loads(out)["runs"]]
    assert first in ids and len(ids) == 2 and f"reusing run {first}" in err
    assert len(completed(runs)) == 2  # only seed 1 was trained
    assert main(["compare", "fnn", "--seeds", "2", "--retrain", "--json", *flags]) == 0
    assert first not in [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]]
    assert len(completed(runs)) == 4
    assert main(["compare", "fnn", "--seeds", "1", "--lr", "0.02", "--json", *flags]) == 0  # another config: trained
    assert len(completed(runs)) == 5


def test_an_interrupted_compare_finishes_with_the_same_command_and_retrains_nothing(
        tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    command = ["compare", "fnn", "cnn", "--seeds", "2", "--epochs", "1", "--batch-size", "50", "--data-dir",
               str(tiny_py), "--no-verify", "--runs-dir", str(runs), "--device", "cpu", "--report",
               str(tmp_path / "report.html")]
    real, calls = comparing.train_run, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C as the fourth run starts
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(comparing, "train_run", interrupting)
    assert main(command) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cifarbench: compare interrupted with 3 of 4 runs finished")
    assert "Run the same command again to finish" in err[-1] and not (tmp_path / "report.html").exists()
    finished = {r["id"] for r in completed(runs)}
    assert len(finished) == 3
    monkeypatch.setattr(comparing, "train_run", real)
    assert main(command) == 0
    err = capsys.readouterr().err
    assert sum(f"reusing run {i}" in err for i in finished) == 3
    assert len(completed(runs)) == 4 and finished < {r["id"] for r in completed(runs)}
    assert (tmp_path / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_a_stopped_train_names_the_run_and_its_resume_command_and_records_why(
        tiny_py: Path, tmp_path: Path, how: str) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "cifarbench", "train", "cnn", "--epochs", "200", "--batch-size",
                             "10", "--data-dir", str(tiny_py), "--no-verify", "--runs-dir", str(runs), "--device",
                             "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(runs.glob("*/checkpoint.pt")):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (130 if how == "SIGINT" else 143), err
    (run_id,) = [p.name for p in runs.iterdir() if p.is_dir()]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cifarbench: run {run_id} ") and f"cifarbench train --resume {run_id} --runs-dir" in last
    assert ("SIGTERM" in last) == (how == "SIGTERM") and "Traceback" not in err
    with RunStore(runs, read_only=True) as store:
        row = store.get_run(run_id)
    assert row["status"] == "interrupted" and "--resume" in row["error"]
    assert ("SIGTERM" in row["error"]) == (how == "SIGTERM")


def test_ctrl_c_before_any_run_exists_claims_nothing(tiny_py: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarbench import running

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "preflight", stop)
    assert main(["train", "fnn", "--data-dir", str(tiny_py), "--no-verify", "--runs-dir",
                 str(tmp_path / "runs")]) == 130
    assert capsys.readouterr().err.strip() == "cifarbench: interrupted"
