"""Exact resume: a run killed (SIGKILL) or interrupted (Ctrl-C) and resumed ends with the same weights, bit
for bit, as one that never stopped (CPU, deterministic settings)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarbench.config import parse_changes
from cifarbench.errors import CifarbenchError
from cifarbench.running import train_run
from cifarbench.runs.store import RunStore
from cifarbench.training.checkpoint import load_checkpoint
from cifarbench.training.recipes import make_config
from conftest import write_python_layout

pytestmark = pytest.mark.slow

CASES = {
    # the notebook's CNN, plain SGD; killed between epochs
    "cnn": (["cnn", "--epochs", "8", "--batch-size", "10"], {"epochs": 8, "batch_size": 10}),
    # the fast recipe: whitening, lookahead, augmentation, BatchNorm, bf16; interrupted mid-epoch
    "speedrun": (["speedrun", "--widths", "8,16,16", "--epochs", "8", "--batch-size", "25"],
                 {"epochs": 8, "batch_size": 25, "model_kwargs": {"widths": [8, 16, 16]}}),
    # the same with Muon for the filters (the CPU budgets' optimiser: its momentum buffers must resume too)
    "speedrun-muon": (["speedrun", "--widths", "8,16,16", "--epochs", "8", "--batch-size", "25",
                       "--set", "optimizer.name=muon"],
                      {"epochs": 8, "batch_size": 25, "model_kwargs": {"widths": [8, 16, 16]}}),
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_python_layout(tmp_path / "data", n=60)  # 300 training images: a few hundred ms per epoch


def start(data: Path, runs: Path, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cifarbench", "train", *argv, "--data-dir", str(data), "--no-verify",
           "--device", "cpu", "--runs-dir", str(runs), "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CIFARBENCH_HOME": str(runs)})


def wait_for_checkpoint(runs: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(runs.glob("*/checkpoint.pt"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("case,how", [("cnn", signal.SIGKILL), ("speedrun", signal.SIGINT),
                                      ("speedrun-muon", signal.SIGKILL)])
def test_stopped_and_resumed_run_matches_uninterrupted_run(data: Path, tmp_path: Path, case: str, how: int) -> None:
    argv, overrides = CASES[case]
    config = make_config(argv[0], data_dir=str(data), verify=False, device="cpu", **overrides)
    if "--set" in argv:
        config = config.with_changes(parse_changes([argv[argv.index("--set") + 1]]))
    reference = train_run(config, runs_dir=tmp_path / "ref", progress=False).to_dict()
    assert reference["config"]["optimizer"]["name"] == ("muon" if "muon" in case else "sgd")

    runs = tmp_path / "runs"
    proc = start(data, runs, argv)
    wait_for_checkpoint(runs, proc)
    time.sleep(0.15)  # somewhere in the next epoch
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130), err
    assert "Traceback" not in err
    run_id = next(runs.glob("*/checkpoint.pt")).parent.name
    stopped = load_checkpoint(runs / run_id / "checkpoint.pt")
    assert stopped["position"]["step"] < reference["steps"], "the run finished before it was stopped"
    if how == signal.SIGINT:
        assert stopped["position"]["in_epoch"], "Ctrl-C should save the position inside the epoch"
        with RunStore(runs) as store:
            assert store.get_run(run_id)["status"] == "interrupted"

    resumed = train_run(resume=run_id, runs_dir=runs, progress=False).to_dict()
    assert resumed["run_id"] == run_id and resumed["steps"] == reference["steps"]
    assert_same_weights(load_checkpoint(runs / run_id / "checkpoint.pt")["state_dict"],
                        load_checkpoint(Path(reference["run_dir"]) / "checkpoint.pt")["state_dict"])
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in reference["history"]]
    assert resumed["train_flops"] == reference["train_flops"] > 0  # the images before the stop count too
    with RunStore(runs) as store:
        run = store.get_run(run_id)
    assert run["status"] == "completed" and len(run["history"]) == 8

    with pytest.raises(CifarbenchError, match="already finished"):
        train_run(resume=run_id, runs_dir=runs, progress=False)


def test_resume_cli_and_errors(data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = start(data, runs, CASES["cnn"][0])
    wait_for_checkpoint(runs, proc)
    proc.kill()
    proc.wait(30)
    run_id = next(runs.glob("*/checkpoint.pt")).parent.name
    other = write_python_layout(tmp_path / "other", n=60, seed=5)
    from cifarbench.config import DataConfig
    with pytest.raises(CifarbenchError, match="fingerprint"):
        train_run(resume=run_id, runs_dir=runs, data=DataConfig(data_dir=str(other), verify=False), progress=False)
    env = {**os.environ, "CIFARBENCH_HOME": str(runs)}
    wrong = subprocess.run([sys.executable, "-m", "cifarbench", "train", "fnn", "--resume", run_id, "--data-dir",
                            str(data), "--no-verify"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 1 and "not 'fnn'" in wrong.stderr and "Traceback" not in wrong.stderr
    ok = subprocess.run([sys.executable, "-m", "cifarbench", "train", "--resume", run_id, "--data-dir", str(data),
                         "--no-verify", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
