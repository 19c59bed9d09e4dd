"""torchrun with 2 processes (gloo on CPU) on synthetic data: one run written, by rank 0; its accuracy is the
single-process evaluation of its checkpoint; its weights match a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarbench.inference import evaluate_checkpoint
from cifarbench.running import train_run
from cifarbench.runs.store import RunStore
from cifarbench.training.checkpoint import load_checkpoint
from cifarbench.training.recipes import make_config
from conftest import write_python_layout

pytestmark = pytest.mark.distributed


def torchrun(args: list[str], runs: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cifarbench", *args, "--runs-dir", str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("model,batch", [("fnn", 20), ("cnn", 30)])
def test_two_ranks_match_one_process(tmp_path: Path, model: str, batch: int) -> None:
    data = write_python_layout(tmp_path / "data", n=40)
    runs = tmp_path / "runs"
    proc = torchrun(["train", model, "--data-dir", str(data), "--no-verify", "--epochs", "3", "--batch-size",
                     str(batch), "--device", "cpu", "--json"], runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON object: only rank 0 prints
    assert out["world_size"] == 2

    # Rank 0 alone wrote the run: one folder, one row.
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [out["run_id"]]
    with RunStore(runs) as store:
        assert [r["id"] for r in store.list_runs()] == [out["run_id"]]

    # Its accuracy (summed over the ranks' halves of the test set) is the whole test set's, counted once.
    single = evaluate_checkpoint(out["run_id"], runs_dir=runs, device="cpu").to_dict()
    assert single["n"] == 40 and out["test_accuracy"] == single["test_accuracy"]
    assert out["confusion"] == single["confusion"]

    # Same global batch in one process: the same weights, up to the order of floating-point reductions.
    reference = train_run(make_config(model, data_dir=str(data), verify=False, epochs=3, batch_size=batch,
                                      device="cpu"), runs_dir=tmp_path / "ref", progress=False).to_dict()
    a = load_checkpoint(runs / out["run_id"] / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(Path(reference["run_dir"]) / "checkpoint.pt")["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert out["train_flops"] == reference["train_flops"] > 0  # both ranks' images, each counted once
