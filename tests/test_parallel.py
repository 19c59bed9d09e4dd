"""compare --jobs: runs in worker processes, gathered into one table; a failing run loses nobody else's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cifarbench.comparing import _run_parallel, compare
from cifarbench.runs.store import RunStore
from cifarbench.training.recipes import make_config

pytestmark = pytest.mark.slow


def test_parallel_compare_gathers_every_seed(tiny_py: Path, tmp_path: Path) -> None:
    make = lambda m, s: make_config(m, data_dir=str(tiny_py), verify=False, epochs=2, batch_size=10, seed=s,  # noqa: E731
                                    device="cpu")
    out = compare(["fnn", "cnn"], make, seeds=2, jobs=2, runs_dir=tmp_path / "runs").to_dict()
    assert out["jobs"] == 2 and out["failures"] == []
    assert [(r["model"], r["seeds"]) for r in out["results"]] == [("fnn", [0, 1]), ("cnn", [0, 1])]
    with RunStore(tmp_path / "runs") as store:
        assert sorted((r["model"], r["seed"], r["status"]) for r in store.list_runs()) == [
            ("cnn", 0, "completed"), ("cnn", 1, "completed"), ("fnn", 0, "completed"), ("fnn", 1, "completed")]


def test_a_failing_worker_is_reported_and_the_rest_kept(tiny_py: Path, tmp_path: Path) -> None:
    good = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=1, batch_size=10, device="cpu")
    bad = replace(good, seed=1, val_split=10_000)  # more than the training set: fails inside the worker
    runs, failures = _run_parallel([good, bad], 2, tmp_path / "runs", on_run=None)
    (run,) = runs
    assert (run.seed, run.status) == (0, "completed")
    with RunStore(tmp_path / "runs") as store:  # the worker's run was recorded, completed, with its accuracy
        stored = store.get_run(run.run_id)
    assert stored["status"] == "completed" and stored["test_accuracy"] == run.test_accuracy
    assert run.test_accuracy == sum(run.confusion[k][k] for k in range(10)) / 20
    assert [f["seed"] for f in failures] == [1] and "val_split" in failures[0]["error"]


def test_deterministic_runs_match_across_worker_thread_counts(tiny_py: Path, tmp_path: Path) -> None:
    # jobs=1 trains in this process with every core's threads, jobs=2 in workers with half as many each: with
    # `deterministic` the conv net's weights must come out bit for bit the same (oneDNN's would not).
    import torch

    from cifarbench.training.checkpoint import load_checkpoint

    make = lambda m, s: make_config(m, data_dir=str(tiny_py), verify=False, epochs=2, batch_size=10, seed=s,  # noqa: E731
                                    device="cpu", deterministic=True)
    weights = []
    for jobs in (1, 2):
        out = compare(["cnn"], make, seeds=2, jobs=jobs, runs_dir=tmp_path / f"runs{jobs}").to_dict()
        assert out["failures"] == []
        with RunStore(tmp_path / f"runs{jobs}") as store:
            runs = sorted(store.list_runs(), key=lambda r: r["seed"])
            assert all(r["config"]["deterministic"] for r in runs)
        weights.append([load_checkpoint(Path(r["run_dir"]) / "checkpoint.pt")["state_dict"] for r in runs])
    for one, two in zip(*weights, strict=True):
        assert all(torch.equal(one[k], two[k]) for k in one)
