"""A budget is a promise: the final evaluation gives up TTA views (not training steps) when time is short, the plan
stops on time however slow the machine, and a budgeted speedrun's shape follows the compute this machine buys."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from cifarbench.data.cifar10 import load_cifar10
from cifarbench.runs.records import RunRecord
from cifarbench.training import budget as budget_module
from cifarbench.training import loop as loop_module
from cifarbench.training.budget import BudgetReport, StepPlan, choose_final_evaluation, evaluation_options
from cifarbench.training.loop import train
from cifarbench.training.recipes import (
    CPU_SPEEDRUN,
    PROBE_TO_LOOP,
    REFERENCE_IMAGES_PER_SECOND,
    cpu_speedrun_for_compute,
    cpu_speedrun_settings,
    make_config,
    shape_by_compute,
)

SMALL = {"widths": [8, 16, 16]}


class FakeClock:
    """A stand-in for time.perf_counter: advances only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_evaluation_options_give_up_threshold_then_views_then_tta() -> None:
    assert evaluation_options(2, 0.6) == [(2, 0.6), (2, 0.5), (2, 0.4), (1, 0.6), (1, 0.5), (1, 0.4), (0, 0.0)]
    assert evaluation_options(2, 0.0) == [(2, 0.0), (1, 0.0), (0, 0.0)]
    assert evaluation_options(0, 0.0) == [(0, 0.0)]


def test_final_evaluation_keeps_full_tta_when_it_fits_and_cuts_it_when_not() -> None:
    sure = torch.full((100,), 0.9)
    unsure = torch.full((100,), 0.3)
    # Every image unsure: 6 views of 10 batches at 0.1 s = 6 s.
    index, kept = choose_final_evaluation(2, 0.6, left=6.5, batch_seconds=0.1, batches=10, confidences=unsure)
    assert (index, kept.tta, kept.cut) == (0, 2, None)
    _, mirror = choose_final_evaluation(2, 0.6, left=2.5, batch_seconds=0.1, batches=10, confidences=unsure)
    assert (mirror.tta, mirror.threshold) == (1, 0.6)
    assert mirror.cut == "TTA level 2 (threshold 0.6) -> level 1 (threshold 0.6)"
    _, plain = choose_final_evaluation(2, 0.6, left=0.5, batch_seconds=0.1, batches=10, confidences=unsure)
    assert (plain.tta, plain.cut) == (0, "TTA level 2 (threshold 0.6) -> off")  # even when plain does not fit
    # With a margin for a machine whose speed changes, views must fit with room to spare.
    _, spared = choose_final_evaluation(2, 0.6, left=6.5, batch_seconds=0.1, batches=10, confidences=unsure,
                                        margin=1.25)
    assert (spared.tta, spared.estimate_seconds) == (1, pytest.approx(2.0))  # 6 s x 1.25 > 6.5 s; 2 s x 1.25 fits
    # Confident images skip the extra views: full selective TTA costs the plain pass only.
    _, cheap = choose_final_evaluation(2, 0.6, left=1.1, batch_seconds=0.1, batches=10, confidences=sure)
    assert cheap.tta == 2 and cheap.cut is None


def test_plan_reserves_tta_at_the_timed_price_and_plain_evaluation_at_the_current_one(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    clock.now = 2.0
    # Full TTA (6 views) timed at 6 s: 1 s plain, 5 s extra views; steps then slow down twofold.
    plan = StepPlan(10**9, budget=100.0, started=0.0, eval_seconds=lambda: 6.0, eval_views=6)
    plan.calibrate(step=20, step_seconds=0.1)
    assert plan.reserved_evaluation() == pytest.approx(6.0)
    plan.replan(40, seconds=4.0, steps=20)
    assert plan.reserved_evaluation() == pytest.approx(2.0 + 5.0)  # plain doubled, the views not re-priced up
    # TTA beyond EVAL_CAP of the budget is not reserved: training steps come first.
    capped = StepPlan(10**9, budget=20.0, started=0.0, eval_seconds=lambda: 6.0, eval_views=6)
    capped.calibrate(step=20, step_seconds=0.1)
    assert capped.reserved_evaluation() == pytest.approx(1.0 + 2.0)  # 15% of 20 s, plain included
    # Where the cap cannot buy even one extra view of every unsure image (1 s here), nothing is kept for views.
    short = StepPlan(10**9, budget=10.0, started=0.0, eval_seconds=lambda: 6.0, eval_views=6)
    short.calibrate(step=20, step_seconds=0.1)
    assert short.reserved_evaluation() == pytest.approx(1.0)


@pytest.mark.parametrize("plain_now, cut", [(0.4, False), (2.0, True)])
def test_only_a_plain_pass_dearer_than_first_timed_is_reported_as_a_cut(plain_now: float, cut: bool,
                                                                      monkeypatch) -> None:
    # 6 views timed at 6 s in a 10 s budget: 1 s plain, and the 15% cap (1.5 s) cannot buy a view for every
    # unsure image, so only the plain pass is reserved. Re-measured at 0.4 s, the pass leaves room for the views
    # (reserved 1.5 s): that is not a cut for a dearer evaluation. At 2.0 s it is.
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    clock.now = 2.0
    plan = StepPlan(10**9, budget=10.0, started=0.0, eval_seconds=lambda: 6.0, eval_views=6,
                    eval_share=lambda: (1.0, plain_now))
    plan.calibrate(step=20, step_seconds=0.1)
    assert plan.reserved_evaluation() == pytest.approx(1.0)
    plan.replan(30, seconds=1.0, steps=10)
    assert plan.reserved_evaluation() == pytest.approx(1.5 if plain_now < 1 else plain_now)
    if cut:
        assert plan.eval_cut is not None and plan.eval_cut[0] > 0 and plan.eval_cut[1:] == (1.0, 2.0)
    else:
        assert plan.eval_cut is None


def test_guard_stops_a_run_whose_calibration_steps_use_the_budget_up(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    plan = StepPlan(10**9, budget=10.0, started=0.0, guard_every_step=True)
    clock.now = 6.0
    plan.after_step(1)
    clock.now = 9.9  # the second step took 3.9 s: nothing left for more
    plan.after_step(2)
    assert plan.total_steps == 2 and plan.stopped == 2


def test_calibration_steps_leave_room_for_the_plain_evaluation(monkeypatch) -> None:
    # 5 s steps (a loaded machine) and a 6 s plain evaluation, timed right after the first step: the third step
    # ends at 12 s, and another would end at 17 s, leaving less than the evaluation's 6 s of the 19.4 s usable.
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    plan = StepPlan(10**9, budget=20.0, started=0.0, eval_seconds=lambda: 6.0, guard_every_step=True)
    for step, now in ((1, 2.0), (2, 7.0)):
        clock.now = now
        plan.after_step(step)
    assert plan.stopped is None and plan.reserved_evaluation() == pytest.approx(6.0)
    clock.now = 12.0
    plan.after_step(3)
    assert plan.total_steps == plan.stopped == 3  # 12 s + 6 s of evaluation: the run ends at 18 s, not 23


def _run_with_dearer_evaluation(monkeypatch, data: Path, slower: float, tta: int, budget_seconds: float = 20.0
                                ) -> tuple[object, StepPlan]:
    """A budgeted run on a fake clock that advances 0.5 s per optimiser step and, for every image an evaluation
    forward pass sees, 10 ms: `slower` times that once the plan has timed the final evaluation and calibrated."""
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)
    plan_box: dict[str, StepPlan] = {}
    make_plan = budget_module.make_plan

    def spy_plan(*args, **kwargs) -> StepPlan:
        plan_box["plan"] = make_plan(*args, **kwargs)
        return plan_box["plan"]

    monkeypatch.setattr(loop_module.budget, "make_plan", spy_plan)
    build = loop_module.build_model

    def slow_eval_model(*args, **kwargs):
        model = build(*args, **kwargs)

        def cost(module, inputs, output) -> None:
            if not module.training:
                plan = plan_box.get("plan")
                dearer = plan is not None and plan.calibrated and plan._eval_estimate > 0
                fake.now += 0.01 * (slower if dearer else 1.0) * len(inputs[0])

        model.register_forward_hook(cost)
        return model

    monkeypatch.setattr(loop_module, "build_model", slow_eval_model)

    def tick(*_: object) -> None:
        fake.now += 0.5

    dataset = load_cifar10(data, verify=False, download=False)
    config = make_config("speedrun", data_dir=str(data), verify=False, batch_size=16, device="cpu",
                         budget_seconds=budget_seconds, model_kwargs=SMALL, eval_batch_size=10, tta=tta)
    hook = register_optimizer_step_post_hook(tick)
    try:
        result = train(config, dataset, torch.device("cpu"), progress=False)
    finally:
        hook.remove()
    return result, plan_box["plan"]


@pytest.mark.slow
def test_dearer_evaluation_costs_steps_for_its_plain_pass_and_views_for_the_rest(tiny_py: Path, monkeypatch) -> None:
    # The evaluation turns three times dearer after it was timed (20 test images x 10 ms = 0.2 s plain, 1.2 s
    # with full TTA). The plan re-measures its plain pass at every re-plan and gives steps for it; the extra
    # TTA views, which no longer fit, are given up instead of more steps. The run ends inside its budget.
    result, plan = _run_with_dearer_evaluation(monkeypatch, tiny_py, slower=3.0, tta=2)
    report = result.budget
    assert report is not None and plan.stopped is None  # the plan made room, not the guard
    assert result.steps == plan.total_steps and report.steps == result.steps
    steps_cut, cut_views = report.cuts
    assert steps_cut.endswith("training step, for a final evaluation dearer than first timed (plain pass "
                              "0.2 s -> 0.6 s)") or "training steps, for a final" in steps_cut
    assert cut_views == "TTA level 2 -> level 1" and (report.tta_planned, report.tta_used) == (2, 1)
    assert result.wall_seconds <= 20.0 and report.used_seconds == pytest.approx(result.wall_seconds)


@pytest.mark.slow
def test_slow_final_evaluation_forces_cutting_steps_and_the_run_ends_in_budget(tiny_py: Path, monkeypatch) -> None:
    # No TTA: nothing but steps can pay for an evaluation that turns ten times dearer (0.2 s -> 2 s plain).
    same, _ = _run_with_dearer_evaluation(monkeypatch, tiny_py, slower=1.0, tta=0)
    slow, plan = _run_with_dearer_evaluation(monkeypatch, tiny_py, slower=10.0, tta=0)
    assert same.budget.cuts == [] and same.wall_seconds <= 20.0
    assert plan.stopped is None and slow.wall_seconds <= 20.0  # the plan, not the guard, kept the budget
    (cut,) = slow.budget.cuts
    steps = int(cut.split()[0])
    assert cut.endswith("for a final evaluation dearer than first timed (plain pass 0.2 s -> 2.0 s)")
    # 1.8 s more of evaluation: steps of the plan's measured price (0.5 s, plus its share of the re-plans'
    # evaluation checks, which turned dearer too) to within one step.
    assert (steps + 1) * plan.step_seconds() >= 1.8 and slow.steps <= same.steps - steps
    assert slow.budget.eval_seconds == pytest.approx(2.0)  # the whole test set, plain, at the dearer price


def test_half_the_throughput_picks_the_row_tuned_for_half_the_compute() -> None:
    config = make_config("speedrun", "fast", budget_seconds=120, device="cpu")
    assert config.budget_shape == "compute"
    as_tuned = REFERENCE_IMAGES_PER_SECOND / PROBE_TO_LOOP  # a probe reading of the machine the rows were tuned on
    same, chosen = shape_by_compute(config, as_tuned)
    assert same.model_kwargs == config.model_kwargs and chosen["reference_seconds"] == pytest.approx(120)
    for budget in (60, 120, 300, 600):
        config = make_config("speedrun", "fast", budget_seconds=budget, device="cpu")
        half, chosen = shape_by_compute(config, as_tuned / 2)
        row = cpu_speedrun_settings(budget / 2)  # what the rows were tuned to do with half the compute
        assert half.model_kwargs == {"widths": list(row.widths), "act": row.act} and half.batch_size == row.batch
        assert chosen["row"]["widths"] == list(row.widths)
        assert chosen["expected_pflop"] == pytest.approx(shape_by_compute(config, as_tuned)[1]["expected_pflop"] / 2)
        # The SGD rate is per example: it follows the batch.
        assert half.optimizer.lr / half.batch_size == pytest.approx(config.optimizer.lr / config.batch_size)
    # At 60 s, half the compute crosses a boundary: the narrow net of short budgets.
    half60, _ = shape_by_compute(make_config("speedrun", "fast", budget_seconds=60, device="cpu"), as_tuned / 2)
    assert half60.model_kwargs["widths"] == list(CPU_SPEEDRUN[0].widths)


def test_rows_are_keyed_by_compute() -> None:
    bounds = [row.up_to for row in CPU_SPEEDRUN]
    assert bounds == sorted(bounds)
    for i, row in enumerate(CPU_SPEEDRUN[:-1]):
        assert cpu_speedrun_for_compute(row.up_to) == row
        assert cpu_speedrun_for_compute(row.up_to * 1.01) == CPU_SPEEDRUN[i + 1]


def test_user_chosen_shape_is_kept() -> None:
    assert make_config("speedrun", "fast", budget_seconds=60, device="cpu", model_kwargs=SMALL).budget_shape == "fixed"
    assert make_config("speedrun", "fast", budget_seconds=60, device="cpu", batch_size=256).budget_shape == "fixed"
    assert make_config("speedrun", "airbench94", budget_seconds=60, device="cpu").budget_shape == "fixed"


def test_airbench94_recipe_is_airbench94_on_every_device() -> None:
    for device in ("cpu", "cuda"):
        c = make_config("speedrun", "airbench94", budget_seconds=30, device=device)
        assert (c.batch_size, c.model_kwargs, c.optimizer.name, c.tta, c.tta_threshold) == \
            (1024, {"widths": [64, 256, 256]}, "sgd", 2, 0.0)
        assert (c.optimizer.momentum, c.optimizer.nesterov, c.label_smoothing) == (0.85, True, 0.2)
        assert c.optimizer.lr == pytest.approx(1.5) and c.optimizer.weight_decay == pytest.approx(0.0153 / 11.5)
        assert c.optimizer.bias_lr_scale == 64 and c.eval_batch_size == 2000 and c.whiten


def test_budget_report_travels_in_the_run_record() -> None:
    report = BudgetReport(budget_seconds=30.0, used_seconds=29.1, steps=100, steps_per_second=3.4,
                          images_per_second=1740.8, step_seconds=0.29, eval_reserved_seconds=1.0,
                          eval_estimate_seconds=0.8, eval_seconds=0.9, tta_planned=2, tta_threshold_planned=0.6,
                          tta_used=1, tta_threshold_used=0.6,
                          cuts=["TTA level 2 (threshold 0.6) -> level 1 (threshold 0.6)"], threads=1,
                          probe={"images_per_second": 900.0}, shape={"by": "compute", "expected_pflop": 0.01})
    record = RunRecord(run_id="r", model="speedrun", recipe="fast", seed=0, epochs=1, budget=report)
    d = record.to_dict()
    assert d["budget"]["cuts"] == report.cuts and d["budget"]["shape"]["by"] == "compute"
    assert RunRecord.from_dict(d).budget == report
    assert RunRecord.from_dict({**d, "budget": None}).budget is None


@pytest.mark.slow
def test_budgeted_cpu_run_records_probe_and_shape(tiny_py: Path, monkeypatch, tmp_path: Path) -> None:
    from cifarbench.running import train_run
    from cifarbench.training import shape

    monkeypatch.setenv(shape.THROUGHPUT_FACTOR_ENV, "0.5")
    config = make_config("speedrun", data_dir=str(tiny_py), verify=False, device="cpu", budget_seconds=4)
    config = replace(config, batch_size=16)
    threads = torch.get_num_threads()
    record = train_run(config, runs_dir=tmp_path / "runs", progress=False)
    assert torch.get_num_threads() == threads  # the probe's choice was for the run only
    b = record.budget
    assert b is not None and b.probe["factor"] == 0.5 and b.shape["by"] == "compute"
    assert b.shape["probe_images_per_second"] == pytest.approx(b.probe["images_per_second"])
    assert record.config["model_kwargs"]["widths"] == b.shape["row"]["widths"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "fast"])
def test_throughput_factor_refuses_what_is_not_a_positive_number(value: str, monkeypatch) -> None:
    from cifarbench.errors import CifarbenchError
    from cifarbench.training import shape

    monkeypatch.setenv(shape.THROUGHPUT_FACTOR_ENV, value)
    with pytest.raises(CifarbenchError, match=shape.THROUGHPUT_FACTOR_ENV):
        shape.throughput_factor()


@pytest.mark.parametrize("faster", [1, 2])
def test_beside_other_work_the_probe_times_both_thread_counts_and_keeps_the_faster(faster: int, monkeypatch) -> None:
    """Every core busy with another process's threads: the probe still times one thread against all of them
    (with libgomp's short spin, two threads beat one beside a 2-thread training) and records what it saw."""
    from cifarbench.training import shape

    kernels = shape.KernelChoice(precision="fp32", channels_last=True, requested="auto", native_bf16=False)
    checked = []

    def check(step, threads):
        checked.append(threads)
        return {"1": 300.0, str(threads): 450.0 if faster == 2 else 200.0}

    monkeypatch.setattr(shape, "others_running", lambda: 2)
    monkeypatch.setattr(shape, "training_steps", lambda *a, **k: lambda *b, **c: None)
    monkeypatch.setattr(shape, "reference_model", lambda: torch.nn.Linear(1, 1))
    monkeypatch.setattr(shape, "choose_kernels", lambda *a, **k: kernels)
    monkeypatch.setattr(shape, "check_threads", check)
    monkeypatch.setattr(shape, "_seconds", lambda *a: 0.1)
    threads = torch.get_num_threads()
    try:
        result = shape.probe_throughput(2)
    finally:
        torch.set_num_threads(threads)
    assert checked == [2] and result.threads == faster and result.others_running == 2
    assert result.tried == {"1": 300.0, "2": 450.0 if faster == 2 else 200.0}


def test_thread_check_is_not_decided_by_one_step_a_passing_process_slowed(monkeypatch) -> None:
    """Two threads take 10 ms a step and one thread 16 ms, but the first timed two-thread step is slowed to
    40 ms (another process passed by): the fastest of the alternated rounds still picks two threads, where a
    single timing per count would have picked one. Under real contention every two-thread step is slow."""
    from cifarbench.training import shape

    clock = [0.0]
    monkeypatch.setattr(shape.time, "perf_counter", lambda: clock[0])
    threads = torch.get_num_threads()
    try:
        def step_with(slow_steps: list[float]):
            def step(batch: int) -> None:
                n = torch.get_num_threads()
                clock[0] += slow_steps.pop(0) if n == 2 and slow_steps else (0.010 if n == 2 else 0.016)
            return step

        # untimed two-thread warm-up at normal speed, then its first timed step slowed
        tried = shape.check_threads(step_with([0.010, 0.040]), 2)
        assert tried["2"] == pytest.approx(shape.CHECK_BATCH / 0.010) and tried["2"] > tried["1"]
        once = shape.check_threads(step_with([0.010, 0.040]), 2, rounds=1)
        assert once["1"] > once["2"]  # what the probe did before: one timing per count
        contended = shape.check_threads(step_with([0.040] * 10), 2)
        assert contended["1"] > contended["2"]
    finally:
        torch.set_num_threads(threads)
