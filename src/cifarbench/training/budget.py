"""Fitting a run into a wall-clock budget: measure the step time, then size the schedule to what fits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast, synchronize
from cifarbench.evaluation.metrics import TTA_VIEWS, confidence, predict_logits
from cifarbench.training import distributed as ddp
from cifarbench.training.state import LoopPosition

if TYPE_CHECKING:
    from cifarbench.config import TrainConfig


@dataclass
class _Stretch:
    """The steps since the last re-plan and the seconds they took (the clock runs from `since` until paused)."""

    steps: int = 0
    low_steps: int = 0
    seconds: float = 0.0
    since: float | None = None


class StepPlan:
    """How many optimiser steps the run takes. Fixed without a budget; with one, re-planned from measured
    step times so that training plus the final evaluation end inside the budget.

    With progressive resizing the first `low_fraction` of the steps are cheaper (smaller images): the plan
    keeps one step time for each phase, so it knows that a longer schedule also means more cheap steps.
    `low_cost` is the guess of a small step's cost relative to a full one until both have been measured.
    `eval_share`, asked again at every re-plan, is the share of the evaluation's timed cost it is expected to
    need by now (selective TTA: fewer images need the extra views as the model grows confident).

    The plan re-measures the step time and re-plans every `1/REPLANS` of the schedule, counting only the time
    the loop spends in steps (`pause` / `resume` around anything else, such as evaluations between epochs).
    Re-planning by steps, not at epoch ends, matters for short budgets: a run of one or two epochs must re-plan
    late enough to see how few images will need the extra TTA views (docs/cpu-performance.md#budget-planner).
    """

    CALIBRATION_STEPS = 3  # the first step pays for allocations and kernel selection; time the next ones
    SAFETY = 0.03  # fraction of the budget kept back for the noise of a shared machine
    REPLANS = 12  # re-plans over a run; each asks `eval_share`, which costs one forward pass of a batch

    def __init__(self, total_steps: int, budget: float | None = None, started: float | None = None,
                 eval_seconds: Callable[[], float] | None = None, sync: Callable[[], None] = lambda: None,
                 guard_every_step: bool = False, agree: Callable[[int], int] = lambda steps: steps,
                 low_fraction: float = 0.0, low_cost: float = 1.0, eval_share: Callable[[], float] | None = None):
        self.budget = budget
        self.started = time.perf_counter() if started is None else started
        self.eval_seconds = eval_seconds or (lambda: 0.0)
        self.eval_share = eval_share or (lambda: 1.0)
        self.sync = sync
        # On a synchronous device (CPU) the clock is exact after every step, so the run can also stop on the
        # spot when time runs out (a slow shared machine); on a GPU that would cost a sync per step.
        self.guard_every_step = guard_every_step
        self.agree = agree  # under torchrun: every rank adopts rank 0's step count
        self.max_steps = total_steps
        self.low_fraction, self.low_cost = low_fraction, low_cost
        # Until calibrated a budgeted run plans "very long", so the schedule stays at its starting value.
        self.total_steps = total_steps if budget is None else 10**9
        self._timed_from: tuple[int, float] | None = None
        self._full_seconds: float | None = None  # measured seconds of one full-size step
        self._low_seconds: float | None = None  # and of one small-image step
        self._eval_estimate = 0.0
        self._eval_share = 1.0
        self._eval_timed_at: tuple[bool, float] | None = None  # (small-image?, step seconds) when it was timed
        self._stretch = _Stretch()

    @property
    def calibrated(self) -> bool:
        return self._full_seconds is not None or self._low_seconds is not None

    def is_low(self, step: int) -> bool:
        """Whether step `step` (0-based) trains on the small images."""
        return self.progress(step) < self.low_fraction

    def pause(self) -> None:
        """Stop counting time as step time (the loop is about to do something else, e.g. evaluate)."""
        if self._stretch.since is not None:
            self.sync()
            self._stretch.seconds += time.perf_counter() - self._stretch.since
            self._stretch.since = None

    def resume(self) -> None:
        """Count time as step time again."""
        if self.calibrated and self._stretch.since is None:
            self.sync()
            self._stretch.since = time.perf_counter()

    def after_step(self, step: int, low: bool = False) -> None:
        """Call after each optimiser step (`step` = steps done; `low`: it trained on small images)."""
        if self.budget is None:
            return
        if self.calibrated:
            stretch = self._stretch
            stretch.steps += 1
            stretch.low_steps += low
            due = stretch.steps >= max(self.CALIBRATION_STEPS, self.total_steps // self.REPLANS)
            if due and step < self.total_steps:
                self.pause()
                self.replan(step, stretch.seconds, stretch.steps, stretch.low_steps)
                self._stretch = _Stretch()
                self.resume()
            elif self.guard_every_step and self._time_left() < 0:
                self.total_steps = step
            return
        if step == 1:
            self.sync()
            self._timed_from = (step, time.perf_counter())
        elif step == 1 + self.CALIBRATION_STEPS:
            self.sync()
            first, t0 = self._timed_from
            self.calibrate(step, (time.perf_counter() - t0) / (step - first), low=self.low_fraction > 0)

    def calibrate(self, step: int, step_seconds: float, low: bool = False) -> None:
        """Record the measured step time (of a small-image step if `low`) and the final evaluation's
        estimated cost, then plan."""
        self._record(step_seconds, low)
        self._eval_estimate = self.eval_seconds()
        self._eval_timed_at = (low, step_seconds)
        self.replan(step)
        self._stretch = _Stretch()
        self.resume()

    def replan(self, step: int, seconds: float | None = None, steps: int = 0, low_steps: int = 0) -> None:
        """Set the total so the remaining steps and the final evaluation fit the time left; `seconds` is the
        measured time of the last `steps` steps, `low_steps` of which were small-image steps."""
        if self.budget is None or not self.calibrated:
            return
        if seconds and steps:
            self._eval_share = min(1.0, max(0.0, self.eval_share()))
            if low_steps in (0, steps):
                self._record(seconds / steps, low=low_steps > 0)
            else:  # a mixed stretch: split it with the current ratio of the two step times
                full, low = self._step_seconds()
                self._full_seconds = seconds / (low_steps * low / full + steps - low_steps)
                self._low_seconds = self._full_seconds * low / full
        lo, hi, left = step, max(step, self.max_steps), self._time_left()
        while lo < hi:  # the longest schedule whose remaining steps fit (the cost grows with the length)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._seconds_to_finish(step, mid) <= left else (lo, mid - 1)
        self.total_steps = self.agree(lo)

    def _record(self, step_seconds: float, low: bool) -> None:
        if low:
            self._low_seconds = step_seconds
        else:
            self._full_seconds = step_seconds

    def _step_seconds(self) -> tuple[float, float]:
        """(full, small-image) step seconds: measured, or one derived from the other with `low_cost`."""
        full = self._full_seconds if self._full_seconds is not None else self._low_seconds / self.low_cost
        low = self._low_seconds if self._low_seconds is not None else full * self.low_cost
        return full, low

    def _seconds_to_finish(self, step: int, total: int) -> float:
        """Seconds that steps step..total-1 of a `total`-step schedule take."""
        full, low = self._step_seconds()
        boundary = math.ceil(self.low_fraction * total)  # steps before it have progress < low_fraction
        small = max(0, boundary - step)
        return small * low + (total - max(step, boundary)) * full

    def _slowdown(self) -> float:
        """How many times slower steps run now than when the final evaluation was timed (at least 1)."""
        if self._eval_timed_at is None:
            return 1.0
        low, then = self._eval_timed_at
        # Both were recorded by `calibrate` (and only re-measured since), so neither is None here.
        return max(1.0, (self._low_seconds if low else self._full_seconds) / then)

    def _time_left(self) -> float:
        """Seconds left for training steps: the budget less the margin, time spent, and the final evaluation."""
        # The evaluation was timed once, at the start; if the (shared) machine has slowed down since, as the
        # re-measured step times show, it will take longer by as much, and the run would overrun its budget.
        evaluation = self._eval_estimate * self._eval_share * self._slowdown()
        return self.budget * (1 - self.SAFETY) - (time.perf_counter() - self.started) - evaluation

    def progress(self, step: int) -> float:
        return min(step / self.total_steps, 1.0)


def make_plan(config: TrainConfig, *, steps_per_epoch: int, started: float, device: torch.device,
              world: ddp.DistEnv, evaluation_seconds: Callable[[], float], evaluation_share: Callable[[], float],
              low_res: int, side: int, resume: LoopPosition | None = None) -> StepPlan:
    """The run's step plan: a fixed schedule of `epochs`, or one fitted to `budget_seconds` (a resumed run keeps
    the schedule it had planned, and with it where the small images end)."""
    low_fraction = config.low_res_fraction if low_res else 0.0
    if resume is not None:
        return StepPlan(resume.total_steps, low_fraction=low_fraction)

    return StepPlan(10**9 if config.budget_seconds else config.epochs * steps_per_epoch, config.budget_seconds,
                    started, evaluation_seconds, lambda: synchronize(device),
                    # Ranks must agree on the step count: rank 0's plan rules, and no rank stops on its own.
                    guard_every_step=device.type == "cpu" and not world.enabled,
                    agree=lambda steps: ddp.broadcast_int(steps, world, device),
                    # A first guess at a small step's cost (its share of pixels plus a fixed part), replaced by
                    # measured times as the run goes; see docs/cpu-performance.md.
                    low_fraction=low_fraction, low_cost=0.1 + 0.9 * (low_res / side) ** 2,
                    eval_share=evaluation_share)


def evaluation_seconds(model: nn.Module, test: DeviceSplit, config: TrainConfig, device: torch.device,
                       amp: torch.dtype | None) -> float:
    """Seconds the final evaluation will take with full TTA: one timed batch, scaled to the test set."""
    x = test.normalise(test.images[:config.eval_batch_size])
    model.eval()  # the plain model: no DDP collectives in a measurement
    with torch.no_grad(), autocast(device, amp):
        predict_logits(model, x, 0)  # the first call at a new shape also builds its kernels: not timed
        synchronize(device)
        t = time.perf_counter()
        predict_logits(model, x, 0)
        synchronize(device)
    model.train()
    return (time.perf_counter() - t) * math.ceil(len(test) / len(x)) * TTA_VIEWS[config.tta]


def evaluation_share(model: nn.Module, train: DeviceSplit, config: TrainConfig, device: torch.device,
                     amp: torch.dtype | None) -> float:
    """With selective TTA, the share of a full TTA evaluation's cost the final one should need now: the plain
    pass, plus the extra views for the share of images the model is unsure of. That share is measured on
    un-augmented training images (never the test set); the model is less often unsure of images it trained on
    than of new ones, hence the margin of 1.5x (docs/cpu-performance.md)."""
    views = TTA_VIEWS[config.tta]
    if views == 1 or config.tta_threshold <= 0:
        return 1.0
    x = train.normalise(train.images[:config.eval_batch_size])
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        top = confidence(model(x))
    model.train()
    unsure = min(1.0, 1.5 * float((top < config.tta_threshold).float().mean()))
    return (1 + unsure * (views - 1)) / views
