"""Precision and layout chosen by measurement: the probe's choice from fake step timings for each precision and
layout (a CPU with native bf16, one without, and one simulated by CIFARBENCH_CPU_BF16=0), its record in the run,
and the thread count re-checked during a run."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cifarbench.device import CPU_BF16_ENV, cpu_bf16_native
from cifarbench.errors import CifarbenchError, as_flag
from cifarbench.training import shape
from cifarbench.training.recipes import make_config
from cifarbench.training.shape import ABANDON, KernelChoice, ThreadWatch, Throughput, choose_kernels


class FakeSteps:
    """Training steps whose cost per image depends on the precision and layout; each advances a fake clock. The
    first `loaded` calls run `slower` times slower (another process passing by)."""

    def __init__(self, per_image: dict[str, float], fail: str | None = None, loaded: int = 0,
                 slower: float = 1.0) -> None:
        self.per_image, self.fail, self.loaded, self.slower = per_image, fail, loaded, slower
        self.now = 0.0
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def __call__(self, batch: int, dtype: torch.dtype | None, channels_last: bool) -> None:
        name = shape.candidate("bf16" if dtype == torch.bfloat16 else "fp32", channels_last)
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError("view size is not compatible with input tensor's size and stride")
        self.now += self.per_image[name] * batch * (self.slower if len(self.calls) <= self.loaded else 1.0)


# Seconds per image on one thread: an AVX2-only CPU (bf16 14x slower, as measured on this project's AMD EPYC)
# and one with AVX-512 bf16 (bf16 about 3x faster).
AVX2 = {"fp32 channels-last": 0.0025, "fp32 contiguous": 0.0031, "bf16 channels-last": 0.035,
        "bf16 contiguous": 0.033}
AVX512_BF16 = {"fp32 channels-last": 0.0010, "fp32 contiguous": 0.0012, "bf16 channels-last": 0.0003,
               "bf16 contiguous": 0.0004}


@pytest.fixture(autouse=True)
def _no_bf16_override(monkeypatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)


def test_native_bf16_that_measures_faster_is_chosen_with_its_faster_layout() -> None:
    steps = FakeSteps(AVX512_BF16)
    choice = choose_kernels(steps, "auto", native_bf16=True, clock=steps.clock)
    assert (choice.precision, choice.channels_last, choice.name) == ("bf16", True, "bf16 channels-last")
    assert set(choice.images_per_second) == set(AVX512_BF16)  # every candidate timed
    assert choice.images_per_second["bf16 channels-last"] == pytest.approx(1 / 0.0003)
    assert choice.slowdown() is not None and choice.slowdown() < 1 and choice.not_chosen == {}


def test_native_bf16_that_measures_slower_loses_to_fp32() -> None:
    timings = {**AVX512_BF16, "bf16 channels-last": 0.0015, "bf16 contiguous": 0.0016}
    steps = FakeSteps(timings)
    choice = choose_kernels(steps, "auto", native_bf16=True, clock=steps.clock)
    assert choice.name == "fp32 channels-last"


def test_avx2_only_cpu_trains_in_fp32_and_times_bf16_once_for_the_record() -> None:
    steps = FakeSteps(AVX2)
    choice = choose_kernels(steps, "auto", native_bf16=False, clock=steps.clock)
    assert choice.name == "fp32 channels-last"
    assert choice.not_chosen == {"bf16": "no native bf16 on this CPU"}
    # One scouting step of bf16 (channels-last), none of its other layout: it cannot win here.
    assert steps.calls.count("bf16 channels-last") == 1 and "bf16 contiguous" not in steps.calls
    assert choice.images_per_second["bf16 channels-last"] == pytest.approx(1 / 0.035)
    assert choice.to_dict()["chosen"] == "fp32 channels-last" and choice.to_dict()["native_bf16"] is False


def test_bf16_disabled_simulates_an_avx2_cpu_even_where_bf16_is_fast(monkeypatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert cpu_bf16_native() is False
    steps = FakeSteps(AVX512_BF16)
    choice = choose_kernels(steps, "auto", native_bf16=cpu_bf16_native(), clock=steps.clock)
    assert choice.precision == "fp32" and not any(c.startswith("bf16") for c in steps.calls)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_bf16_native() is True
    monkeypatch.setenv(CPU_BF16_ENV, "maybe")
    with pytest.raises(CifarbenchError, match=CPU_BF16_ENV):
        cpu_bf16_native()


def test_detection_without_onednn_bf16_is_no_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_bf16_native() is False


def test_forced_precision_chooses_the_layout_only_and_measures_the_slowdown() -> None:
    steps = FakeSteps(AVX2)
    forced = choose_kernels(steps, "bf16", native_bf16=False, clock=steps.clock)
    assert forced.precision == "bf16" and forced.name == "bf16 contiguous"  # the faster bf16 layout
    assert forced.slowdown() == pytest.approx(0.033 / 0.0025, rel=0.01) and forced.not_chosen["fp32"]
    steps = FakeSteps(AVX512_BF16)
    fp32 = choose_kernels(steps, "fp32", native_bf16=True, clock=steps.clock)
    assert fp32.name == "fp32 channels-last" and fp32.not_chosen == {"bf16": "fp32 was asked for"}
    deterministic = choose_kernels(FakeSteps(AVX512_BF16), "auto", native_bf16=True, deterministic=True)
    assert deterministic.precision == "fp32"


def test_a_hopeless_candidate_is_abandoned_after_one_step_and_the_probe_keeps_its_time_limit() -> None:
    slow = {**AVX512_BF16, "fp32 contiguous": AVX512_BF16["fp32 channels-last"] * (ABANDON + 1)}
    steps = FakeSteps(slow)
    choose_kernels(steps, "auto", native_bf16=True, clock=steps.clock)
    assert steps.calls.count("fp32 contiguous") == 1 and steps.calls.count("fp32 channels-last") > 1
    steps = FakeSteps(AVX2)
    limited = choose_kernels(steps, "auto", native_bf16=True, limit_seconds=0.2, clock=steps.clock)
    assert limited.precision == "fp32" and "not timed" in limited.not_chosen["bf16 channels-last"]


def test_a_passing_load_does_not_decide_the_layout() -> None:
    # channels-last's first steps run 3x slower (something else ran then); its alternated later steps do not.
    steps = FakeSteps(AVX2, loaded=3, slower=3.0)
    choice = choose_kernels(steps, "fp32", native_bf16=False, clock=steps.clock)
    assert choice.name == "fp32 channels-last"
    assert choice.images_per_second["fp32 channels-last"] == pytest.approx(1 / 0.0025)


def test_a_layout_the_model_cannot_take_is_not_chosen() -> None:
    steps = FakeSteps(AVX2, fail="fp32 channels-last")
    choice = choose_kernels(steps, "fp32", native_bf16=False, clock=steps.clock)
    assert choice.name == "fp32 contiguous" and choice.not_chosen["fp32 channels-last"] == "failed: RuntimeError"


def _fake_probe(monkeypatch, running) -> None:
    """`running.budget_start`'s probe replaced by fake timings of an AVX2 CPU (no native bf16)."""
    def probe(**kwargs) -> Throughput:
        steps = FakeSteps(AVX2)
        kernels = choose_kernels(steps, kwargs["requested"], native_bf16=False, clock=steps.clock)
        return Throughput(images_per_second=800.0, threads=2, tried={}, seconds=1.5, kernels=kernels, most_threads=2)

    monkeypatch.setattr(running, "probe_throughput", probe)


def test_budget_start_trains_and_records_what_the_probe_chose(monkeypatch, capsys) -> None:
    from cifarbench import running

    _fake_probe(monkeypatch, running)
    config = make_config("speedrun", "fast", budget_seconds=60, device="cpu")
    assert config.precision == "auto"
    chosen, _, recorded_probe, _, precision = running.budget_start(config)
    assert (chosen.precision, chosen.channels_last) == ("fp32", True)
    assert precision["chosen"] == "fp32 channels-last" and precision["requested"] == "auto"
    assert "kernels" not in recorded_probe and capsys.readouterr().err == ""
    forced, *_ = running.budget_start(replace(config, precision="bf16"))
    assert forced.precision == "bf16"
    (line,) = capsys.readouterr().err.splitlines()  # from Python: the keywords
    assert line.startswith("note: precision='bf16' on a CPU without native bf16: its steps measured 13.")
    assert line.endswith("; precision='auto' would train in fp32")
    running.budget_start(replace(config, precision="bf16"), spelling=as_flag)  # the CLI's: its flags
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("note: --precision bf16 on a CPU without native bf16: its steps measured 13.")
    assert line.endswith("; --precision auto would train in fp32")


@pytest.mark.slow
def test_budgeted_run_without_native_bf16_trains_in_fp32_and_records_the_choice(tiny_py: Path, monkeypatch,
                                                                               tmp_path: Path, capsys) -> None:
    from cifarbench.running import train_run
    from cifarbench.runs.catalog import stored_runs

    monkeypatch.setenv(CPU_BF16_ENV, "0")
    config = make_config("speedrun", data_dir=str(tiny_py), verify=False, device="cpu", budget_seconds=4)
    record = train_run(replace(config, batch_size=16), runs_dir=tmp_path / "runs", progress=False)
    b = record.budget
    assert record.config["precision"] == "fp32" and b.precision["requested"] == "auto"
    assert b.precision["precision"] == "fp32" and b.precision["native_bf16"] is False
    assert record.config["channels_last"] == b.precision["channels_last"]
    assert all(name.startswith("fp32") for name in b.precision["images_per_second"])
    (stored,) = stored_runs([record.run_id], runs_dir=tmp_path / "runs")
    assert stored.budget.precision == b.precision  # what `runs show` and the report read
    from cifarbench.cli import main

    capsys.readouterr()
    assert main(["runs", "show", record.run_id, "--runs-dir", str(tmp_path / "runs")]) == 0
    shown = capsys.readouterr().out
    assert f"precision {b.precision['chosen']} (asked: auto, no native bf16; measured images/s" in shown


def _watch(readings: list[int], threads: list[int], busy: int, most: int = 2) -> ThreadWatch:
    values = iter(readings)
    watch = ThreadWatch(most, read=lambda: next(values), set_threads=lambda n: threads.__setitem__(0, n),
                        current=lambda: threads[0])
    watch.busy = busy  # what the probe saw when it chose the count
    return watch


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def test_thread_watch_compares_both_counts_beside_the_same_competition_and_remembers(two_cores) -> None:
    threads = [1]
    watch = _watch([1, 1, 1, 0, 0, 1, 1], threads, busy=1)  # one competing thread; the probe chose one thread
    assert watch.check(10, 0.5) and threads == [2]  # the other count gets one stretch of real steps
    assert watch.check(20, 0.6) and threads == [1]  # not faster: back
    assert not watch.check(30, 0.5) and threads == [1]  # compared at this competition: not again
    assert watch.check(40, 0.5) and threads == [2]  # the competitor ended: both cores
    assert not watch.check(50, 0.3) and threads == [2]  # nothing to try when the others leave both cores
    assert watch.check(60, 0.3) and threads == [1]  # the competitor is back: the count measured faster beside it
    assert not watch.check(70, 0.6) and threads == [1]
    assert len(watch.changes) == 4 and "trying it: 1 thread of other processes running" in watch.changes[0]
    assert watch.changes[1].startswith("step 20: threads back to 1")
    assert watch.changes[-1] == "step 60: threads 2 -> 1 (1 thread of other processes running: faster here before)"


def test_thread_watch_keeps_the_count_it_tried_when_its_real_steps_are_faster(two_cores) -> None:
    """Beside a 2-thread training the probe's small steps chose one thread; two threads train the real steps
    faster, and the try keeps them."""
    threads = [1]
    watch = _watch([2, 2, 2], threads, busy=2)
    assert watch.check(10, 0.5) and threads == [2]
    assert not watch.check(20, 0.4) and threads == [2]  # faster: kept
    assert not watch.check(30, 0.4) and threads == [2] and len(watch.changes) == 1


def test_a_competition_reading_that_flickers_costs_one_try_per_level(two_cores) -> None:
    threads = [2]
    watch = _watch([3, 3, 3, 2, 3, 2], threads, busy=2)
    watch._best[2] = 2  # two threads already measured faster beside two competing threads
    assert watch.check(10, 1.1) and threads == [1]  # three: the cores they leave
    assert watch.check(20, 1.4) and threads == [2]  # then all of them, beside the same three
    assert not watch.check(30, 1.2) and threads == [2]  # faster: kept, and remembered for three
    assert not any(watch.check(step, 1.2) for step in (40, 50, 60)) and threads == [2]
    assert len(watch.changes) == 2


def test_a_try_is_not_judged_when_the_competition_changed_during_it(two_cores) -> None:
    threads = [1]
    watch = _watch([2, 3], threads, busy=2)
    assert watch.check(10, 0.5) and threads == [2]  # trying two threads beside two others
    assert watch.check(20, 0.4) and threads == [1]  # a third arrived: no verdict, the cores they leave
    assert watch._best == {}


def test_no_try_without_room_to_judge_it_or_where_the_others_leave_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    threads = [1]
    assert not _watch([2], threads, busy=2).check(10, 0.5, can_try=False) and threads == [1]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    threads = [16]
    assert not _watch([1], threads, busy=1, most=16).check(10, 0.5) and threads == [16]  # 15 cores left


def test_kernel_choice_round_trips_through_the_budget_report() -> None:
    from cifarbench.training.budget import BudgetReport

    choice = KernelChoice(precision="fp32", channels_last=True, requested="auto", native_bf16=False,
                          images_per_second={"fp32 channels-last": 400.0}, not_chosen={"bf16": "x"}, seconds=0.9)
    report = BudgetReport(budget_seconds=60.0, precision=choice.to_dict(), thread_changes=["step 9: threads 2 -> 1"])
    assert BudgetReport.from_dict(report.to_dict()) == report


def test_budget_start_counts_from_an_earlier_start(monkeypatch) -> None:
    from cifarbench import running

    _fake_probe(monkeypatch, running)
    config = make_config("speedrun", "fast", budget_seconds=60, device="cpu")
    _, started, *_ = running.budget_start(config, started=123.0)
    assert started == 123.0  # the CLI's process start: imports and data loading are in the budget
    _, started, *_ = running.budget_start(config)
    assert started > 123.0


@pytest.mark.slow
def test_process_started_is_when_the_interpreter_started() -> None:
    import subprocess
    import sys

    code = ("import time; time.sleep(1.0); from cifarbench import runtime; t = runtime.process_started(); "
            "print(time.perf_counter() - t)")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert age >= 0.95  # the sleep before the call is counted (clock ticks are 10 ms)
