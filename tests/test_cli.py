"""The command line end to end in tmp_path: what a user types, what lands on stdout and on disk."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.data import cifar10
from cifarbench.runs.store import RunStore

TRAIN_KEYS = {"run_id", "model", "recipe", "seed", "epochs", "test_accuracy", "test_loss", "train_seconds", "device",
              "params", "dataset", "history"}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_train_eval_runs_round_trip(tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = str(tmp_path / "runs")
    out = run_json(capsys, "train", "fnn", "--data-dir", str(tiny_py), "--no-verify", "--epochs", "2", "--seed", "3",
                   "--batch-size", "10", "--device", "cpu", "--runs-dir", runs)
    assert TRAIN_KEYS <= out.keys()
    assert (out["model"], out["recipe"], out["seed"], out["epochs"]) == ("fnn", "seed", 3, 2)
    assert out["params"] == 394_634
    assert set(out["dataset"]) >= {"name", "sha256", "verified"} and out["dataset"]["verified"] is False
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert set(out["history"][0]) >= {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}

    ev = run_json(capsys, "eval", out["run_id"], "--runs-dir", runs)
    assert ev["test_accuracy"] == out["test_accuracy"] and len(ev["per_class_accuracy"]) == 10
    # The accuracy is the count of correct predictions (the confusion's diagonal) over the 20 test images.
    assert sum(map(sum, ev["confusion"])) == 20
    assert out["test_accuracy"] == sum(ev["confusion"][k][k] for k in range(10)) / 20
    ev2 = run_json(capsys, "eval", str(Path(out["run_dir"]) / "checkpoint.pt"), "--runs-dir", runs)
    assert ev2["confusion"] == ev["confusion"]

    listed = run_json(capsys, "runs", "--runs-dir", runs)["runs"]
    assert [r["run_id"] for r in listed] == [out["run_id"]] and listed[0]["status"] == "completed"

    assert main(["eval", out["run_id"], "--runs-dir", runs]) == 0
    human = capsys.readouterr().out
    assert "test accuracy" in human and "airplane" in human


@pytest.mark.slow
def test_deterministic_flag_is_recorded_and_eval_reproduces_the_run(tiny_py: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    runs = str(tmp_path / "runs")
    out = run_json(capsys, "train", "cnn", "--data-dir", str(tiny_py), "--no-verify", "--epochs", "1",
                   "--batch-size", "10", "--device", "cpu", "--runs-dir", runs, "--deterministic")
    saved = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert saved["config"]["deterministic"] is True
    ev = run_json(capsys, "eval", out["run_id"], "--runs-dir", runs)
    assert ev["test_accuracy"] == out["test_accuracy"]


@pytest.mark.slow
def test_compare_table_json_and_plot(tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plot, runs = tmp_path / "curves.png", tmp_path / "runs"
    args = ["compare", "fnn", "cnn", "--data-dir", str(tiny_py), "--no-verify", "--epochs", "2", "--seeds", "2",
            "--batch-size", "10", "--plot", str(plot), "--runs-dir", str(runs)]
    out = run_json(capsys, *args)
    assert [r["model"] for r in out["results"]] == ["fnn", "cnn"]
    for r in out["results"]:
        assert set(r) >= {"model", "recipe", "seeds", "test_accuracy_mean", "test_accuracy_std", "train_seconds_mean",
                          "params"}
        assert r["seeds"] == [0, 1]
        # Mean and (sample) standard deviation of the runs' own accuracies, as the run store recorded them.
        with RunStore(runs) as store:
            acc = [store.get_run(i)["test_accuracy"] for i in r["run_ids"]]
        assert len(acc) == 2 and r["test_accuracy_mean"] == pytest.approx(statistics.fmean(acc))
        assert r["test_accuracy_std"] == pytest.approx(statistics.stdev(acc))
    assert out["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| fnn" in table and "| cnn" in table and "±" in table


def test_explore_writes_grid_and_counts(tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.png"
    out = run_json(capsys, "explore", "--data-dir", str(tiny_py), "--no-verify", "--per-class", "2", "--out", str(grid))
    assert out["counts"]["train"] == [10] * 10 and out["counts"]["test"] == [2] * 10
    from PIL import Image
    with Image.open(grid) as im:
        assert im.size[0] > 100 and im.size[1] > 300  # a row per class


def test_models_lists_the_registry(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "fnn" in out and "cnn" in out and "seed" in out


def test_data_dir_falls_back_to_env(tiny_py: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CIFARBENCH_DATA", str(tiny_py))
    out = run_json(capsys, "train", "fnn", "--no-verify", "--epochs", "1", "--runs-dir", str(tmp_path / "r"))
    assert out["dataset"]["source"] == str((tiny_py / cifar10.PY_DIR).resolve())


def _cli(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarbench", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_1(tiny_py: Path, tmp_path: Path) -> None:
    env = {"CIFARBENCH_HOME": str(tmp_path / "runs")}
    missing = _one_line_error(_cli("train", "fnn", "--data-dir", str(tmp_path / "none"), "--no-download", env=env))
    assert "not found" in missing and str(tmp_path / "none") in missing

    assert "unknown model 'resnet9000'" in _one_line_error(_cli("train", "resnet9000", env=env))
    assert "unknown device" in _one_line_error(_cli("train", "fnn", "--device", "tpu", env=env))
    assert "--epochs" in _one_line_error(_cli("train", "fnn", "--epochs", "many", env=env))
    assert "unrecognized" in _one_line_error(_cli("train", "fnn", "--bogus", env=env))
    typo = _one_line_error(_cli("train", "fnn", "--set", "optimizer.lrr=1", env=env))
    assert "unknown config field 'optimizer.lrr'" in typo
    assert "FIELD=VALUE" in _one_line_error(_cli("train", "fnn", "--set", "epochs", env=env))

    # bf16 asked for: refused (`auto` is resolved to fp32 for a deterministic run instead)
    fp32 = _one_line_error(_cli("train", "cnn-bn", "--data-dir", str(tiny_py), "--no-verify", "--epochs", "1",
                                "--device", "cpu", "--deterministic", "--precision", "bf16", env=env))
    assert "--precision fp32" in fp32 and not (tmp_path / "runs").exists()  # refused before any run was recorded

    md5 = _one_line_error(_cli("train", "fnn", "--data-dir", str(tiny_py), env=env))
    assert "data_batch_1" in md5 and "--no-verify" in md5

    batch = tiny_py / cifar10.PY_DIR / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-50])
    assert "data_batch_2" in _one_line_error(_cli("train", "fnn", "--data-dir", str(tiny_py), "--no-verify", env=env))

    bad_ckpt = tmp_path / "x.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    assert "x.pt" in _one_line_error(_cli("eval", str(bad_ckpt), "--data-dir", str(tiny_py), env=env))
    assert "not in" in _one_line_error(_cli("eval", "no-such-run", env=env))


@pytest.mark.slow
def test_offline_training_without_data_fails_cleanly(tmp_path: Path) -> None:
    # No data anywhere and (in this sandbox) no route to the official server: a download attempt must end in
    # one line that says where we looked. The URL is pointed at a closed loopback port so the test never
    # leaves the machine.
    env = {"CIFARBENCH_HOME": str(tmp_path / "runs")}
    proc = _cli("download", "--data-dir", str(tmp_path / "d"), "--url", "https://127.0.0.1:9/cifar.tar.gz", env=env)
    line = _one_line_error(proc)
    assert "127.0.0.1:9" in line and "not found" in line
    assert not any((tmp_path / "d").glob("*.tar.gz*"))
