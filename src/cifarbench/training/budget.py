"""Fitting a run into a wall-clock budget: measure the step time, then size the schedule to what fits."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast, synchronize
from cifarbench.evaluation.metrics import TTA_VIEWS, confidence, predict_logits
from cifarbench.training import distributed as ddp
from cifarbench.training.shape import ThreadWatch
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
    `eval_share`, asked again at every re-plan, gives the share of the evaluation's timed cost it is expected to
    need by now (selective TTA: fewer images need the extra views as the model grows confident), with the
    seconds its plain pass takes at the machine's speed now (a pair; a share alone leaves that unmeasured): the
    final evaluation is priced like the steps, and when it grows dearer the plan trains fewer steps (`eval_cut`),
    since a run always ends with its plain evaluation. `threads` re-checks the thread count at every re-plan (a
    CPU run beside other processes).

    The plan re-measures the step time and re-plans every `1/REPLANS` of the schedule, counting only the time
    the loop spends in steps (`pause` / `resume` around anything else, such as evaluations between epochs).
    Re-planning by steps, not at epoch ends, matters for short budgets: a run of one or two epochs must re-plan
    late enough to see how few images will need the extra TTA views (docs/cpu-performance.md#budget-planner).
    """

    CALIBRATION_STEPS = 3  # the first step pays for allocations and kernel selection; time the next ones
    SAFETY = 0.03  # fraction of the budget kept back for the noise of a shared machine
    REPLANS = 12  # re-plans over a run; each asks `eval_share`, which costs one forward pass of a batch
    EVAL_CAP = 0.15
    """The most of the budget the plan reserves for test-time augmentation's extra views: beyond it, training
    steps are worth more than the views, so the final evaluation will use fewer (see `choose_final_evaluation`)."""

    def __init__(self, total_steps: int, budget: float | None = None, started: float | None = None,
                 eval_seconds: Callable[[], float] | None = None, sync: Callable[[], None] = lambda: None,
                 guard_every_step: bool = False, agree: Callable[[int], int] = lambda steps: steps,
                 low_fraction: float = 0.0, low_cost: float = 1.0,
                 eval_share: Callable[[], float | tuple[float, float | None]] | None = None, eval_views: int = 1,
                 threads: ThreadWatch | None = None):
        self.budget = budget
        # Of the evaluation's forward passes per image, the first (plain) one is always paid; the other
        # `eval_views - 1` (TTA) are what the final evaluation gives up first when time is short.
        self.eval_views = eval_views
        self.started = time.perf_counter() if started is None else started
        self.eval_seconds = eval_seconds or (lambda: 0.0)
        self.eval_share = eval_share or (lambda: 1.0)
        self.threads = threads
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
        self._plain_now: float | None = None  # the plain pass's seconds as measured (None: priced by slowdown)
        self._plain_last: float | None = None  # the last reading
        self._eval_timed_at: tuple[bool, float] | None = None  # (small-image?, step seconds) when it was timed
        self._stretch = _Stretch()
        self._last_seen: float | None = None  # when the last calibration step ended
        self.trace: list[list[float]] = []
        """Per re-plan: step, seconds elapsed, planned steps, step seconds, plain evaluation and reserve."""
        self.stopped: int | None = None
        """The step at which the per-step guard stopped training because the time ran out (None if it never did)."""
        self.eval_cut: tuple[int, float, float] | None = None
        """(steps, plain seconds as first timed, as priced now) when the last re-plan gave up steps because the
        final evaluation's plain pass had grown dearer than first timed."""

    @property
    def calibrated(self) -> bool:
        return self._full_seconds is not None or self._low_seconds is not None

    def is_low(self, step: int) -> bool:
        """Whether step `step` (0-based) trains on the small images."""
        return self.progress(step) < self.low_fraction

    def _stretch_steps(self) -> int:
        """Steps between re-plans at the current plan."""
        return max(self.CALIBRATION_STEPS, self.total_steps // self.REPLANS)

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
            due = stretch.steps >= self._stretch_steps()
            if due and step < self.total_steps:
                self.pause()
                replanning = time.perf_counter()
                self.replan(step, stretch.seconds, stretch.steps, stretch.low_steps)
                # A try needs its own stretch and one more to be judged before the final evaluation.
                can_try = self.total_steps - step >= 2 * self._stretch_steps()
                if self.threads is not None and self.threads.check(step, stretch.seconds / stretch.steps, can_try):
                    self.replan(step)  # the next stretch measures the new count; until then, the old rate
                # The next stretch's clock includes this re-plan (its evaluation check), so that the step time
                # the plan extrapolates carries the cost of the re-plans still to come.
                self._stretch = _Stretch(since=replanning)
            elif self.guard_every_step and self._time_left() < self._next_step(step) / 2:
                # The next step would overrun into the final evaluation by more than half a step.
                self.total_steps = self.stopped = step
            return
        now = time.perf_counter()
        last, self._last_seen = (now - self._last_seen if self._last_seen is not None else 0.0), now
        # So slow a machine that calibrating uses the budget up: stop where the next step (as long as the last
        # one) would overrun the plain evaluation's time by more than half a step.
        if (self.guard_every_step and step > 1
                and self._elapsed() + last / 2 + self._plain_evaluation() > self.budget * (1 - self.SAFETY)):
            self.total_steps = self.stopped = step
            return
        if step == 1:
            # The final evaluation is timed before the steps are, so that even the calibration steps leave
            # room for its plain pass (a run on a slow machine once spent its budget there, then evaluated).
            self._eval_estimate = self.eval_seconds()
            self.sync()
            self._timed_from = (step, time.perf_counter())
            self._last_seen = self._timed_from[1]
        elif step == 1 + self.CALIBRATION_STEPS:
            self.sync()
            first, t0 = self._timed_from
            self.calibrate(step, (time.perf_counter() - t0) / (step - first), low=self.low_fraction > 0)

    def calibrate(self, step: int, step_seconds: float, low: bool = False) -> None:
        """Record the measured step time (of a small-image step if `low`) and the final evaluation's
        estimated cost (timed now unless it was at the first step), then plan."""
        self._record(step_seconds, low)
        if self._eval_estimate <= 0:
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
            checked = self.eval_share()
            share, plain = checked if isinstance(checked, tuple) else (checked, None)
            self._eval_share = min(1.0, max(0.0, share))
            if plain is not None:  # the faster of the last two readings: one batch is a noisy clock
                self._plain_now = plain if self._plain_last is None else min(plain, self._plain_last)
                self._plain_last = plain
            if low_steps in (0, steps):
                self._record(seconds / steps, low=low_steps > 0)
            else:  # a mixed stretch: split it with the current ratio of the two step times
                full, low = self._step_seconds()
                self._full_seconds = seconds / (low_steps * low / full + steps - low_steps)
                self._low_seconds = self._full_seconds * low / full
        total = self._fit(step, self._time_left())
        # What the evaluation's growth since it was first timed cost in steps: the plan priced at that price.
        # Only growth counts: a plain pass that got cheaper leaves room for views, which is not a cut.
        first = self._time_left() + self.reserved_evaluation() - self.reserved_evaluation(first_price=True)
        cut = self._fit(step, first) - total if self._plain_evaluation() > self._first_plain() else 0
        self.eval_cut = (cut, self._first_plain(), self._plain_evaluation()) if cut > 0 else None
        self.total_steps = self.agree(total)
        self.trace.append([step, round(self._elapsed(), 2), self.total_steps, round(self._step_seconds()[0], 4),
                           round(self._plain_evaluation(), 2), round(self.reserved_evaluation(), 2)])

    def _fit(self, step: int, left: float) -> int:
        """The longest schedule whose remaining steps fit in `left` seconds (the cost grows with the length)."""
        lo, hi = step, max(step, self.max_steps)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._seconds_to_finish(step, mid) <= left else (lo, mid - 1)
        return lo

    def _next_step(self, step: int) -> float:
        """The expected seconds of step `step` + 1 (small-image or full), as last measured."""
        full, low = self._step_seconds()
        return low if self.is_low(step) else full

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

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _first_plain(self) -> float:
        """Seconds of the final evaluation's plain pass as first timed (at the share expected now)."""
        return min(self._eval_estimate * self._eval_share, self._eval_estimate / self.eval_views)

    def _plain_evaluation(self) -> float:
        """Seconds of the final evaluation's plain pass at the machine's speed now: as last measured, else as
        first timed and slowed down as much as the steps have been."""
        if self._plain_now is not None:
            return self._plain_now
        return self._first_plain() * self._slowdown()

    def reserved_evaluation(self, first_price: bool = False) -> float:
        """Seconds the plan keeps for the final evaluation: the plain pass at the current speed (at the price
        first timed, with `first_price`), plus the TTA views at the speed they were timed at, within `EVAL_CAP`
        of the budget."""
        # If the (shared) machine has slowed down since the evaluation was first timed, as its re-measured plain
        # pass (or the step times) show, the plain pass must be paid with steps. The extra views are not re-priced
        # upwards: when time is short the final evaluation drops views rather than training drop steps
        # (`choose_final_evaluation` re-measures and decides at the end).
        expected = self._eval_estimate * self._eval_share
        plain = self._first_plain()
        plain_now = plain if first_price else self._plain_evaluation()
        extra = min(expected - plain, max(0.0, self.EVAL_CAP * self.budget - plain_now))
        # Time that cannot buy even one extra view for the images expected to need it is given to steps: an
        # unsure model (a short run on a slow CPU) would otherwise keep seconds it then evaluates without.
        views = self.eval_views
        one_view = plain * (self._eval_share * views - 1) / (views - 1) if views > 1 else 0.0
        return plain_now + (extra if extra >= one_view - 1e-9 else 0.0)

    def _time_left(self) -> float:
        """Seconds left for training steps: the budget less the margin, time spent, and the final evaluation."""
        return self.budget * (1 - self.SAFETY) - self._elapsed() - self.reserved_evaluation()

    def step_seconds(self) -> float | None:
        """The latest measured seconds of a full-size step (None until calibrated)."""
        return self._step_seconds()[0] if self.calibrated else None

    def seconds_left(self) -> float:
        """Seconds of the budget not yet spent (inf without a budget)."""
        return math.inf if self.budget is None else self.budget - self._elapsed()

    def progress(self, step: int) -> float:
        return min(step / self.total_steps, 1.0)


def make_plan(config: TrainConfig, *, steps_per_epoch: int, started: float, device: torch.device,
              world: ddp.DistEnv, evaluation_seconds: Callable[[], float], evaluation_share: Callable[[], float],
              low_res: int, side: int, resume: LoopPosition | None = None,
              threads: ThreadWatch | None = None) -> StepPlan:
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
                    eval_share=evaluation_share, eval_views=TTA_VIEWS[config.tta],
                    threads=threads if device.type == "cpu" and not world.enabled else None)


def evaluation_seconds(model: nn.Module, test: DeviceSplit, config: TrainConfig, device: torch.device,
                       amp: torch.dtype | None) -> float:
    """Seconds the final evaluation will take with full TTA: the faster of two timed batches, scaled to the test
    set (on a shared machine one batch alone was seen to price the evaluation at twice what it took)."""
    x = test.normalise(test.images[:config.eval_batch_size])
    model.eval()  # the plain model: no DDP collectives in a measurement
    best = math.inf
    with torch.no_grad(), autocast(device, amp):
        predict_logits(model, x, 0)  # the first call at a new shape also builds its kernels: not timed
        for _ in range(2):
            synchronize(device)
            t = time.perf_counter()
            predict_logits(model, x, 0)
            synchronize(device)
            best = min(best, time.perf_counter() - t)
    model.train()
    return best * math.ceil(len(test) / len(x)) * TTA_VIEWS[config.tta]


def evaluation_share(model: nn.Module, train: DeviceSplit, test_size: int, config: TrainConfig,
                     device: torch.device, amp: torch.dtype | None) -> tuple[float, float]:
    """Measured on one batch of un-augmented training images (never the test set): the share of a full TTA
    evaluation's cost the final one should need now, and the seconds its plain pass over `test_size` images takes
    at the machine's speed now. The share is the plain pass, plus, with selective TTA, the extra views for the
    share of images the model is unsure of; the model is less often unsure of images it trained on than of new
    ones, hence the margin of 1.5x (docs/cpu-performance.md)."""
    views = TTA_VIEWS[config.tta]
    x = train.normalise(train.images[:config.eval_batch_size])
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        synchronize(device)
        t = time.perf_counter()
        top = confidence(model(x))
        synchronize(device)
        plain = (time.perf_counter() - t) * math.ceil(test_size / len(x))
    model.train()
    if views == 1 or config.tta_threshold <= 0:
        return 1.0, plain
    unsure = min(1.0, 1.5 * float((top < config.tta_threshold).float().mean()))
    return (1 + unsure * (views - 1)) / views, plain


@dataclass(kw_only=True)
class FinalEvaluation:
    """How a budgeted run's final evaluation is done: the TTA level and selective-TTA threshold it can afford
    in the time left, next to the configured ones."""

    tta: int
    threshold: float
    planned_tta: int
    planned_threshold: float
    estimate_seconds: float
    """Expected seconds of the chosen evaluation, from one batch timed just before it."""
    left_seconds: float
    """Seconds of the budget left when it was chosen."""

    @property
    def cut(self) -> str | None:
        """What was given up, in words, or None."""
        if (self.tta, self.threshold) == (self.planned_tta, self.planned_threshold):
            return None
        return f"TTA {_level(self.planned_tta, self.planned_threshold)} -> {_level(self.tta, self.threshold)}"


def _level(tta: int, threshold: float) -> str:
    return "off" if tta == 0 else f"level {tta}" + (f" (threshold {threshold:g})" if threshold > 0 else "")


def evaluation_options(tta: int, threshold: float) -> list[tuple[int, float]]:
    """(TTA level, threshold) from the configured one down to plain evaluation, in the order a short budget gives
    them up: with selective TTA first a lower threshold (fewer images get the extra views), then fewer views."""
    options = []
    for level in range(tta, -1, -1):
        if level == 0:
            options.append((0, 0.0))
        elif threshold > 0:
            options += [(level, t) for t in (threshold, round(threshold - 0.1, 2), round(threshold - 0.2, 2)) if t > 0]
        else:
            options.append((level, 0.0))
    return options


TTA_MARGIN = 1.25
"""Extra views are taken only when their evaluation's expected cost times this fits in the time left: on a shared
machine a 60 s run chose full TTA with 1 s to spare, the load rose, and it took 8 s longer than timed."""


def choose_final_evaluation(tta: int, threshold: float, left: float, batch_seconds: float, batches: int,
                            confidences: torch.Tensor, margin: float = 1.0) -> tuple[int, FinalEvaluation]:
    """The first of `evaluation_options` whose expected cost (times `margin`, for options with extra views)
    fits in `left` seconds (plain evaluation if none does: a run always ends with its result), and its index in
    that list. `batch_seconds` is one plain
    evaluation batch timed now; `confidences` the model's top-class probabilities on training images, from which
    the share of test images that selective TTA will give the extra views is estimated (with a margin of 1.5x,
    as in `evaluation_share`)."""
    options = evaluation_options(tta, threshold)
    plain = batch_seconds * batches
    for index, (level, t) in enumerate(options):
        views = TTA_VIEWS[level]
        unsure = 1.0 if t <= 0 else min(1.0, 1.5 * float((confidences < t).float().mean()))
        cost = plain * (1 + unsure * (views - 1))
        if cost * margin <= left or level == 0:
            return index, FinalEvaluation(tta=level, threshold=t, planned_tta=tta, planned_threshold=threshold,
                                          estimate_seconds=cost, left_seconds=left)
    raise AssertionError("evaluation_options always ends with plain evaluation")


def measure_evaluation_batch(model: nn.Module, train: DeviceSplit, config: TrainConfig, device: torch.device,
                             amp: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """Seconds of one plain evaluation batch at the machine's speed now, and the model's confidence on it
    (un-augmented training images: the test set is never looked at to decide how to evaluate it)."""
    x = train.normalise(train.images[:config.eval_batch_size])
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        synchronize(device)
        t = time.perf_counter()
        top = confidence(model(x))
        synchronize(device)
        seconds = time.perf_counter() - t
    model.train()
    return seconds * config.eval_batch_size / len(x), top


def note(message: str) -> None:
    """One line on stderr about the run's budget (not an error)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


@dataclass(kw_only=True)
class BudgetReport:
    """What a budgeted run planned, measured and gave up: recorded in its metrics.json and `--json`."""

    budget_seconds: float
    used_seconds: float = 0.0
    """From the start of the run's timing (the throughput probe, when there is one) to the final result."""
    steps: int = 0
    steps_per_second: float = 0.0
    images_per_second: float = 0.0
    """Training throughput measured over the run's steps."""
    step_seconds: float | None = None
    """The plan's last measurement of a step's seconds."""
    eval_reserved_seconds: float = 0.0
    """What the plan kept for the final evaluation at its last re-plan."""
    eval_estimate_seconds: float = 0.0
    """The chosen final evaluation's expected seconds, from a batch timed just before it."""
    eval_seconds: float = 0.0
    tta_planned: int = 0
    tta_threshold_planned: float = 0.0
    tta_used: int = 0
    tta_threshold_used: float = 0.0
    cuts: list[str] = field(default_factory=list)
    """What the run gave up to keep its budget (empty when nothing)."""
    threads: int | None = None
    """Threads at the end of the run."""
    probe: dict | None = None
    """The throughput probe at the start: images/s per thread count tried, the seconds it took."""
    shape: dict | None = None
    """How the net's shape was chosen: by compute (the expected training PFLOP and the row) or fixed."""
    precision: dict | None = None
    """The precision and layout the probe chose, the config's request and the images/s measured for each."""
    thread_changes: list[str] = field(default_factory=list)
    """When and why the thread count changed during the run (re-checked at every re-plan)."""
    replans: list[list[float]] = field(default_factory=list)
    """Per re-plan: [step, seconds elapsed, planned steps, step seconds, plain evaluation seconds, reserved]."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> BudgetReport | None:
        if not isinstance(d, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def report(plan: StepPlan, config: TrainConfig, position: LoopPosition, final: FinalEvaluation,
           eval_seconds: float, used_seconds: float) -> BudgetReport:
    """The budget report of a run that just finished its final evaluation."""
    cuts = [final.cut] if final.cut else []
    if plan.eval_cut is not None:
        steps, first, now = plan.eval_cut
        cuts.insert(0, f"{steps} training step{'s' if steps > 1 else ''}, for a final evaluation dearer than first "
                       f"timed (plain pass {first:.1f} s -> {now:.1f} s)")
    if plan.stopped is not None:
        cuts.insert(0, f"training stopped at step {plan.stopped} as the time ran out")
    seconds = max(position.elapsed, 1e-9)
    return BudgetReport(budget_seconds=config.budget_seconds, used_seconds=used_seconds, steps=position.step,
                        steps_per_second=position.step / seconds, images_per_second=position.images / seconds,
                        step_seconds=plan.step_seconds(), eval_reserved_seconds=plan.reserved_evaluation(),
                        eval_estimate_seconds=final.estimate_seconds, eval_seconds=eval_seconds,
                        tta_planned=final.planned_tta, tta_threshold_planned=final.planned_threshold,
                        tta_used=final.tta, tta_threshold_used=final.threshold, cuts=cuts,
                        threads=torch.get_num_threads(),
                        thread_changes=list(plan.threads.changes) if plan.threads is not None else [],
                        replans=list(plan.trace))
