"""`--executor ray` on a local Ray cluster (ray.init(num_cpus=2) on 127.0.0.1): runs come back as bundles and are
stored under the ids the driver chose, with the local executor's accuracies; a dead worker is retried or reported
in one line; Ctrl-C keeps what finished; grading gives the local leaderboard."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifarbench import runtime
from cifarbench.classroom import grade, submit
from cifarbench.comparing import compare
from cifarbench.errors import Interrupted
from cifarbench.running import train_run
from cifarbench.runs.store import RunStore
from cifarbench.training.recipes import make_config
from conftest import write_python_layout

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

KILLER = '''
import os
import signal
from pathlib import Path

from torch import nn

MARK = Path({mark!r})


class Net(nn.Module):
    """A linear net whose training kills its own process the first time{always}."""

    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        self.fc = nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes)

    def forward(self, x):
        if self.training and ({always_flag} or not MARK.exists()):
            MARK.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.fc(x.flatten(1))
'''


@pytest.fixture(scope="module")
def local_ray():
    runtime.configure()  # the workers inherit MKL's reproducible mode, as they would from the CLI
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def maker(data: Path, epochs: int = 1):
    return lambda m, s: make_config(m, data_dir=str(data), verify=False, epochs=epochs, batch_size=10, seed=s,  # noqa: E731
                                    device="cpu")


def stored(runs: Path) -> dict[tuple[str, int], dict]:
    with RunStore(runs, read_only=True) as store:
        return {(r["model"], r["seed"]): r for r in store.list_runs()}


def test_compare_on_ray_stores_the_local_executors_runs(local_ray, tiny_py: Path, tmp_path: Path) -> None:
    local = compare(["fnn", "cnn"], maker(tiny_py), seeds=2, jobs=2, runs_dir=tmp_path / "local")
    on_ray = compare(["fnn", "cnn"], maker(tiny_py), seeds=2, jobs=2, runs_dir=tmp_path / "ray", executor="ray")
    assert on_ray.failures == [] and local.failures == []
    here, there = stored(tmp_path / "local"), stored(tmp_path / "ray")
    assert sorted(there) == [("cnn", 0), ("cnn", 1), ("fnn", 0), ("fnn", 1)]
    for key, row in there.items():  # the user's own runs, completed, with the same accuracy seed for seed
        assert row["status"] == "completed" and row["origin"] is None
        assert row["test_accuracy"] == here[key]["test_accuracy"]
        assert (Path(row["run_dir"]) / "checkpoint.pt").is_file()
    assert {r.run_id for r in on_ray.runs} == {r["id"] for r in there.values()}
    # Run again: the Ray-trained runs count as this folder's own finished runs and are reused, not retrained.
    again = compare(["fnn"], maker(tiny_py), seeds=2, jobs=2, runs_dir=tmp_path / "ray",
                    executor="ray")
    assert {r.run_id for r in again.runs} == {there[("fnn", 0)]["id"], there[("fnn", 1)]["id"]}


@pytest.mark.parametrize("always", [False, True])
def test_a_killed_worker_is_retried_or_reported_in_one_line(local_ray, tiny_py: Path, tmp_path: Path,
                                                            always: bool) -> None:
    mark = tmp_path / "killed"
    code = tmp_path / "killer.py"
    code.write_text(KILLER.format(mark=str(mark), always=" (every time)" if always else "",
                                  always_flag=str(always)))
    out = compare(["fnn", f"{code}:Net"], maker(tiny_py), seeds=1, jobs=2, runs_dir=tmp_path / "runs", executor="ray")
    assert mark.exists()  # a worker really died
    if always:
        (failure,) = out.failures
        assert "worker died" in failure["error"] and "\n" not in failure["error"]
        assert [r.model for r in out.runs] == ["fnn"]  # the other run is kept
    else:
        assert out.failures == [] and len(out.runs) == 2  # the retry trained it
        assert all(r["status"] == "completed" for r in stored(tmp_path / "runs").values())


def test_ctrl_c_cancels_the_rest_and_keeps_finished_runs(local_ray, tiny_py: Path, tmp_path: Path) -> None:
    arrived = []

    def interrupt(run) -> None:
        arrived.append(run.run_id)
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="1 of 4 runs finished") as stopped:
        compare(["fnn"], maker(tiny_py, epochs=2), seeds=4, jobs=2, runs_dir=tmp_path / "runs", executor="ray",
                on_run=interrupt)
    assert arrived[0] in str(stopped.value)
    with RunStore(tmp_path / "runs", read_only=True) as store:
        assert store.get_run(arrived[0])["status"] == "completed"
        assert len(store.list_runs()) == 1  # the cancelled tasks' runs never reach the store


def test_grading_on_ray_gives_the_local_leaderboard(local_ray, tmp_path: Path) -> None:
    data = write_python_layout(tmp_path / "data", n=100)
    inbox = tmp_path / "inbox"
    for student, model in (("Ann", "fnn"), ("Ben", "cnn")):
        config = make_config(model, "seed", device="cpu", data_dir=str(data), verify=False, epochs=1, batch_size=50)
        run = train_run(config, runs_dir=tmp_path / student, progress=False)
        submit(run.run_id, student=student, out=inbox, runs_dir=tmp_path / student)
    again = Path(submit(run.run_id, student="Ben", out=tmp_path / "again", runs_dir=tmp_path / "Ben").archive)
    again.rename(inbox / "Ben-again.tar.gz")  # the same run twice: graded once, as locally
    (inbox / "broken.tar.gz").write_bytes(b"not an archive")
    local = grade(inbox, data_dir=str(data), verify=False, device="cpu", out=tmp_path / "l").to_dict()
    on_ray = grade(inbox, data_dir=str(data), verify=False, device="cpu", out=tmp_path / "r",
                   executor="ray").to_dict()
    assert on_ray["leaderboard"] == local["leaderboard"]
    keep = ("archive", "student", "run_id", "rescored_accuracy", "error", "flags")
    assert [{k: r[k] for k in keep} for r in on_ray["runs"]] == [{k: r[k] for k in keep} for r in local["runs"]]
    assert sum(r["graded"] for r in local["runs"]) == 2


def test_tune_on_ray_stores_every_trial_and_scores_test_once(local_ray, tiny_py: Path, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from cifarbench.tuning import parse_param, tune

    config = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=2, batch_size=20, device="cpu",
                         val_split=20)
    out = tune(config, [parse_param("optimizer.lr=log:1e-3:3e-1")], trials=3, jobs=2, executor="ray",
               runs_dir=tmp_path / "runs")
    assert [t.state for t in out.trials] == ["complete"] * 3
    with RunStore(tmp_path / "runs", read_only=True) as store:
        runs = store.list_runs()  # (every trial is fnn seed 0)
    assert sorted(r["id"] for r in runs) == sorted(t.run_id for t in out.trials)
    tested = [r for r in runs if r["test_accuracy"] is not None]  # trials never touch the test set
    assert [r["id"] for r in tested] == [out.best.run_id] and tested[0]["test_accuracy"] == out.test_accuracy


OWN_MODEL = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        self.fc = nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def test_student_code_on_ray_runs_in_the_same_box(local_ray, tmp_path: Path) -> None:
    from cifarbench.sandbox import Limits

    data = write_python_layout(tmp_path / "data", n=100)
    code = tmp_path / "student.py"
    code.write_text(OWN_MODEL)
    config = make_config(f"{code}:Net", "seed", device="cpu", data_dir=str(data), verify=False, epochs=1,
                         batch_size=50)
    run = train_run(config, runs_dir=tmp_path / "ann", progress=False)
    inbox = tmp_path / "inbox"
    submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    graded = {}
    for executor in ("local", "ray"):
        without = grade(inbox, data_dir=str(data), verify=False, device="cpu", executor=executor)
        assert "--trust-code" in without.runs[0].error or "trust_code" in without.runs[0].error
        graded[executor] = grade(inbox, data_dir=str(data), verify=False, device="cpu", trust_code=True,
                                 isolation="process", limits=Limits(timeout=120), executor=executor)
    local, on_ray = graded["local"].runs[0], graded["ray"].runs[0]
    assert on_ray.isolation == local.isolation == "process"  # boxed in the task as here, never in-process
    assert on_ray.rescored_accuracy == local.rescored_accuracy == run.test_accuracy
