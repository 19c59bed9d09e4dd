"""Fitting a run into a wall-clock budget: measure the step time, then size the schedule to what fits."""

from __future__ import annotations

import math
import time
from typing import Callable


class StepPlan:
    """How many optimiser steps the run takes. Fixed without a budget; with one, re-planned from measured
    step times so that training plus the final evaluation end inside the budget."""

    CALIBRATION_STEPS = 3  # the first step pays for allocations and kernel selection; time the next ones
    SAFETY = 0.03  # fraction of the budget kept back for the noise of a shared machine

    def __init__(self, total_steps: int, budget: float | None = None, started: float | None = None,
                 eval_seconds: Callable[[], float] | None = None, sync: Callable[[], None] = lambda: None,
                 guard_every_step: bool = False, agree: Callable[[int], int] = lambda steps: steps):
        self.budget = budget
        self.started = time.perf_counter() if started is None else started
        self.eval_seconds = eval_seconds or (lambda: 0.0)
        self.sync = sync
        # On a synchronous device (CPU) the clock is exact after every step, so the run can also stop on the
        # spot when time runs out (a slow shared machine); on a GPU that would cost a sync per step.
        self.guard_every_step = guard_every_step
        self.agree = agree  # under torchrun: every rank adopts rank 0's step count
        self.max_steps = total_steps
        # Until calibrated a budgeted run plans "very long", so the schedule stays at its starting value.
        self.total_steps = total_steps if budget is None else 10**9
        self._timed_from: tuple[int, float] | None = None
        self._step_seconds: float | None = None
        self._eval_estimate = 0.0

    @property
    def calibrated(self) -> bool:
        return self._step_seconds is not None

    def after_step(self, step: int) -> None:
        """Call after each optimiser step (`step` = steps done)."""
        if self.budget is None:
            return
        if self.calibrated:
            if self.guard_every_step and self._time_left() < 0:
                self.total_steps = step
            return
        if step == 1:
            self.sync()
            self._timed_from = (step, time.perf_counter())
        elif step == 1 + self.CALIBRATION_STEPS:
            self.sync()
            first, t0 = self._timed_from
            self.calibrate(step, (time.perf_counter() - t0) / (step - first))

    def calibrate(self, step: int, step_seconds: float) -> None:
        """Record the measured step time and the final evaluation's estimated cost, then plan."""
        self._step_seconds = step_seconds
        self._eval_estimate = self.eval_seconds()
        self.replan(step)

    def replan(self, step: int, step_seconds: float | None = None) -> None:
        """Set the total so the remaining steps and the final evaluation fit the time left."""
        if self.budget is None or not self.calibrated:
            return
        if step_seconds:
            self._step_seconds = step_seconds
        fits = max(0, math.floor(self._time_left() / self._step_seconds))
        self.total_steps = self.agree(min(self.max_steps, step + fits))

    def _time_left(self) -> float:
        """Seconds left for training steps: the budget less the margin, time spent, and the final evaluation."""
        return self.budget * (1 - self.SAFETY) - (time.perf_counter() - self.started) - self._eval_estimate

    def progress(self, step: int) -> float:
        return min(step / self.total_steps, 1.0)
