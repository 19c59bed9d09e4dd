"""What a run will cost, said before it starts and while it runs: the estimate line (measured on a copy, so the run
is unchanged, and recorded), and a step line at least every 30 s where no bar can be drawn. Clocks are fakes."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifarbench import progress
from cifarbench.errors import as_flag
from cifarbench.progress import StepLines, duration
from cifarbench.running import train_run
from cifarbench.runs import folders
from cifarbench.training import estimate as est
from cifarbench.training.recipes import make_config
from cifarbench.training.state import RunCheckpoint


def ticking(step: float):
    """A clock that advances `step` seconds at every reading."""
    counter = itertools.count()
    return lambda: step * next(counter)


def test_step_lines_appear_every_30_s_with_steps_rate_and_time_left() -> None:
    out = io.StringIO()
    now = [0.0]
    lines = StepLines("cnn", stream=out, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = 2.0 * step  # 2 s a step of 64 images
        lines(step, 100, 64)
    printed = out.getvalue().splitlines()
    assert len(printed) == 6  # at 30, 60, ... 180 s: never 30 s without a line
    assert printed[0] == "cnn: step 15/100, 32 images/s, about 2 min 50 s of training left"
    assert printed[-1].startswith("cnn: step 90/100") and "20 s of training left" in printed[-1]


def test_a_budgeted_runs_unplanned_total_is_not_shown() -> None:
    out = io.StringIO()
    lines = StepLines("speedrun", stream=out, clock=ticking(31.0))
    lines(3, 10**9, 100)
    assert out.getvalue().strip() == "speedrun: step 3, 3 images/s"


def test_no_step_lines_where_a_bar_is_drawn_or_progress_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "draws_bar", lambda: True)
    assert not isinstance(progress.step_lines("cnn"), StepLines)
    monkeypatch.setattr(progress, "draws_bar", lambda: False)
    assert isinstance(progress.step_lines("cnn"), StepLines)
    assert not isinstance(progress.step_lines("cnn", enabled=False), StepLines)


def test_durations_read_as_a_person_would_say_them() -> None:
    assert [duration(s) for s in (4.24, 42, 185, 7620)] == ["4.2 s", "42 s", "3 min 05 s", "2 h 07 min"]


def estimate_of(total: float, budget: float | None = None) -> est.RunEstimate:
    return est.RunEstimate(params=62_006, flops_per_image=1_300_000, images_per_second=250.0,
                           eval_images_per_second=900.0, source="probe", steps=3, batch=64, steps_per_epoch=782,
                           epochs=10, epoch_seconds=total / 11, eval_seconds=total / 11, total_seconds=total,
                           budget_seconds=budget)


def test_the_line_names_the_cost_and_past_ten_minutes_how_to_cut_it_in_the_callers_spelling() -> None:
    short = estimate_of(300).line("cnn")
    assert short.startswith("cost: cnn: 62,006 parameters, 1.30 MFLOPs per image (forward; 2 per multiply-add), "
                            "250 images/s (measured on 3 steps of 64)")
    assert "5 min 00 s for 10 epochs with evaluation" in short and "--epochs" not in short
    long = estimate_of(3600).line("cnn")
    assert "1 h 00 min for 10 epochs" in long and "epochs=... trains fewer epochs, budget=... fits" in long
    assert "--epochs trains fewer epochs, --budget fits" in estimate_of(3600).line("cnn", as_flag)
    assert estimate_of(120, budget=120).line("speedrun").endswith("planned to end within its 120 s budget")


def test_measure_times_a_copy_and_prices_with_the_clock_it_is_given() -> None:
    config = make_config("cnn", "seed", batch_size=8, device="cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    train, forward, steps, batch, seconds = est.measure(model, config, torch.device("cpu"), (3, 32, 32), 10,
                                                        clock=ticking(0.5))
    # Each timed step and the timed forward pass read the clock twice, 0.5 s apart.
    assert (steps, batch) == (est.PROBE_STEPS, 8) and train == pytest.approx(16.0) and forward == pytest.approx(16.0)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_evaluations_are_counted_as_the_loop_makes_them() -> None:
    config = make_config("cnn", "seed", epochs=4, tta=0, device="cpu")
    assert est.evaluated_images(config, 10_000, 0) == 4 * 10_000  # the test curve: every epoch
    assert est.evaluated_images(config, 10_000, 5_000) == 4 * 5_000 + 10_000  # validation curve, test once


def run(data: Path, runs: Path, estimated: bool, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(est, "SHORTEST_RUN_IMAGES", 0 if estimated else 10**12)
    config = make_config("cnn", "seed", data_dir=str(data), verify=False, epochs=2, batch_size=20, device="cpu")
    record = train_run(config, runs_dir=runs, progress=False)
    return {"record": record, "weights": RunCheckpoint.load(Path(record.run_dir) / folders.CHECKPOINT).state_dict}


@pytest.mark.slow
def test_the_estimate_is_recorded_and_changes_nothing_the_run_computes(tiny_py: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    plain = run(tiny_py, tmp_path / "a", False, monkeypatch)
    measured = run(tiny_py, tmp_path / "b", True, monkeypatch)
    assert plain["record"].estimate is None and measured["record"].estimate is not None
    assert measured["record"].test_accuracy == plain["record"].test_accuracy
    assert all(torch.equal(plain["weights"][k], v) for k, v in measured["weights"].items())
    folder = Path(measured["record"].run_dir)
    saved = json.loads((folder / folders.METRICS).read_text())["estimate"]
    assert saved["source"] == "probe" and saved["steps"] >= 1 and saved["steps_per_epoch"] == 5
    assert json.loads((folder / folders.CONFIG).read_text())["estimate"] == saved
    assert saved["params"] == measured["record"].params
    from cifarbench.cli import main

    assert main(["runs", "show", measured["record"].run_id, "--runs-dir", str(tmp_path / "b")]) == 0
    shown = capsys.readouterr().out
    assert f"estimate before training: {duration(saved['total_seconds'])}" in shown and "; took " in shown


def test_an_estimate_from_elsewhere_is_shown_only_when_every_field_has_its_type() -> None:
    good = estimate_of(300).to_dict()
    assert est.RunEstimate.from_dict(good) == estimate_of(300)
    for bad in ({**good, "total_seconds": "300"}, {**good, "source": 1}, {**good, "params": float("nan")},
                {**good, "epoch_seconds": True}, {**good, "params": 10**400}, {"params": 1}, None, []):
        assert est.RunEstimate.from_dict(bad) is None


@pytest.mark.slow
def test_a_budgeted_cpu_run_reuses_its_probe_and_measures_nothing_again(tiny_py: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("measured twice")

    monkeypatch.setattr(est, "measure", refuse)
    config = make_config("cnn", "seed", data_dir=str(tiny_py), verify=False, budget_seconds=2.0, batch_size=20,
                         device="cpu")
    record = train_run(config, runs_dir=tmp_path / "runs", progress=False)
    assert record.estimate.source == "budget probe" and record.estimate.total_seconds == 2.0
    assert record.estimate.images_per_second == record.budget.probe["images_per_second"]


@pytest.mark.slow
def test_without_a_bar_the_run_says_where_it_is_at_least_every_30_s(tiny_py: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "draws_bar", lambda: False)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=ticking(31.0)))  # every step 31 s later
    monkeypatch.setattr(est, "SHORTEST_RUN_IMAGES", 0)
    config = make_config("fnn", "seed", data_dir=str(tiny_py), verify=False, epochs=2, batch_size=20, device="cpu")
    train_run(config, runs_dir=tmp_path / "runs")
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("fnn: step ")]
    assert [line.split(",")[0] for line in steps] == [f"fnn: step {i}/10" for i in range(1, 11)]
    assert steps[0].endswith("of training left") and err[0].startswith("cost: fnn: ")


def test_compare_ends_with_each_runs_wall_time_its_estimate_their_sum_and_the_commands_own() -> None:
    from cifarbench.reporting.tables import wall_times
    from cifarbench.runs.records import RunRecord

    def record(run_id: str, model: str, seed: int, wall: float, **more) -> RunRecord:
        return RunRecord(run_id=run_id, model=model, recipe="seed", seed=seed, epochs=10, wall_seconds=wall, **more)

    runs = [record("a", "fnn", 0, 30.0), record("b", "cnn", 0, 90.0, estimate=estimate_of(80.0)),
            record("c", "cnn", 1, 500.0)]
    line = wall_times(runs, 150.0, reused=["c"])
    assert line == ("wall time: fnn seed 0 30 s; cnn seed 0 1 min 30 s, estimated 1 min 20 s; cnn seed 1 reused. "
                    "Runs trained: 2 min 00 s together; this command: 2 min 30 s")
