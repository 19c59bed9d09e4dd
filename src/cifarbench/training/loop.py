"""One short training loop: setup, then per epoch: shuffle, step over batches, evaluate; then a final evaluation.

Everything a recipe switches (augmentation, schedule, lookahead, whitening, label smoothing, precision, budget)
is read from the `TrainConfig`; with all of them off this is exactly the notebook's loop. What surrounds the
loop sits behind named calls: the step plan (`budget.make_plan`), the ranks (`distributed`, a no-op in one
process), the checkpoint schema (`state`) and the per-step rules below.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.data.augment import Augmenter
from cifarbench.data.dataset import ImageDataset, Split
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast, autocast_dtype, keep_cpu_memory, kernel_choice, synchronize
from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.evaluation.metrics import EvalResult, evaluate, sum_dtype
from cifarbench.models import build_model as create
from cifarbench.models.reference import label
from cifarbench.progress import bar, say, step_lines, tta_views
from cifarbench.training import budget
from cifarbench.training import distributed as ddp
from cifarbench.training.lookahead import Lookahead
from cifarbench.training.optim import make_optimizer
from cifarbench.training.schedules import lr_factor
from cifarbench.training.shape import ThreadWatch
from cifarbench.training.state import EpochMetrics, LoopPosition, TrainingState, rng_states, set_rng_states

__all__ = ["EpochMetrics", "LoopPosition", "TrainResult", "autocast_dtype", "check_settings", "train"]


@dataclass(kw_only=True)
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[EpochMetrics] = field(default_factory=list)
    final: EvalResult | None = None
    position: LoopPosition = field(default_factory=LoopPosition)
    lookahead: Lookahead | None = None
    wall_seconds: float = 0.0
    """Everything from model creation (or `train`'s `started`) to the end of the final evaluation (what a budget
    limits)."""
    budget: budget.BudgetReport | None = None
    """A budgeted run's plan against what it used, and what it gave up."""
    final_tta: tuple[int, float] = (0, 0.0)
    """The final evaluation's test-time augmentation level and selective-TTA threshold (a budget may cut them)."""

    @property
    def steps(self) -> int:
        return self.position.step

    @property
    def train_seconds(self) -> float:
        return self.history[-1].seconds if self.history else 0.0

    def state(self) -> TrainingState:
        """Everything a resume needs beyond the weights (see `state.RunCheckpoint`)."""
        return TrainingState(self.optimizer.state_dict(), self.lookahead.average if self.lookahead else None,
                             self.position, list(self.history), rng_states())

    def restore(self, saved: TrainingState, config: TrainConfig) -> None:
        """Continue from `saved` (the weights are loaded by the caller)."""
        self.optimizer.load_state_dict(saved.optimizer)
        for g in self.optimizer.param_groups:  # base rates are the config's, not the schedule's last value
            g["lr"] = g["base_lr"]
        if saved.lookahead is not None:
            self.lookahead = Lookahead(self.model, config.lookahead)
            for name, avg in saved.lookahead.items():
                self.lookahead.average[name].copy_(avg)
        self.position = LoopPosition(**vars(saved.position))
        self.history = list(saved.history)
        set_rng_states(saved.rng)


class _StopAtStepBoundary:
    """While training, Ctrl-C asks the loop to stop after the current step (so the saved state is consistent);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopAtStepBoundary:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _close(shown: object) -> None:
    close = getattr(shown, "close", None)
    if close:
        close()


def check_settings(config: TrainConfig, device: torch.device) -> None:
    """Refuse a combination `device` cannot honour (callers check before they write anything)."""
    if config.deterministic and device.type == "cpu" and autocast_dtype(config, device) is not None:
        # bf16 convolutions have no thread-count-independent kernel (docs/distributed.md).
        raise CifarbenchError("{deterministic} on a CPU needs {precision} (bf16 convolutions have no "
                              "thread-independent kernel)", deterministic=Keyword("deterministic", True),
                              precision=Keyword("precision", "fp32"))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_validation(train: Split, size: int) -> tuple[Split, Split | None]:
    """Hold out `size` training examples, chosen by a fixed shuffle (the same for every seed, so runs of a
    sweep are compared on one validation set)."""
    if size <= 0:
        return train, None
    if size >= len(train):
        raise CifarbenchError("{option} {size} leaves no training data ({n} examples)", option=Keyword("val_split"),
                              size=size, n=len(train))
    order = np.random.default_rng(0).permutation(len(train))
    keep, held = np.sort(order[:-size]), np.sort(order[-size:])
    return Split(train.images[keep], train.labels[keep]), Split(train.images[held], train.labels[held])


def build_model(config: TrainConfig, dataset: ImageDataset, device: torch.device,
                whiten_images: torch.Tensor | None = None) -> nn.Module:
    """Create the model, initialise its whitening layer from training images if asked, set its layout."""
    model = create(config.model, num_classes=len(dataset.classes), in_shape=dataset.image_shape,
                   kwargs=config.model_kwargs, code_sha256=config.model_sha256).to(device)
    if config.whiten and hasattr(model, "init_whitening") and whiten_images is not None:
        model.init_whitening(whiten_images)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def steps_in_epoch(train_images: int, config: TrainConfig) -> int:
    """Optimiser steps per epoch: the last short batch dropped (`drop_last`) or kept."""
    if config.drop_last and train_images >= config.batch_size:
        return train_images // config.batch_size
    return math.ceil(train_images / config.batch_size)


# --- per-step rules: each a small function of the training progress (fraction of planned steps done) ---------


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, progress: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(config.schedule, progress)


def freeze_whitening_bias(model: nn.Module, config: TrainConfig, progress: float) -> None:
    """The whitening layer's bias trains for the first `whiten_bias_fraction` of the run, then stays."""
    bias = getattr(getattr(model, "whiten", None), "bias", None)
    if bias is not None:
        bias.requires_grad_(progress < config.whiten_bias_fraction)


def shrink(x: torch.Tensor, low_res: int, low: bool) -> torch.Tensor:
    """Progressive resizing: a small-image step sees the batch scaled down to `low_res` pixels."""
    return F.interpolate(x, size=(low_res, low_res), mode="bilinear", antialias=True) if low else x


def average_weights(result: TrainResult, config: TrainConfig, progress: float, step: int,
                    plan: budget.StepPlan) -> None:
    """Lookahead: every `every` steps after `start`, pull the weights to (and replace them by) their average."""
    la = config.lookahead
    if la.enabled and progress >= la.start and step % la.every == 0:
        if result.lookahead is None:
            result.lookahead = Lookahead(result.model, la)
        else:
            result.lookahead.update(result.model, result.lookahead.decay(plan.progress(step)))


def low_res_side(config: TrainConfig, side: int) -> int:
    """The small-image side progressive resizing trains at, or 0 when it is off."""
    return config.low_res if 0 < config.low_res < side and config.low_res_fraction > 0 else 0


@dataclass(kw_only=True)
class _Setup:
    """Everything the loop works with, built once: data on the device, the model (and what the steps call),
    augmentation, the step plan, and the result that collects the state as training goes."""

    config: TrainConfig
    device: torch.device
    world: ddp.DistEnv
    amp: torch.dtype | None
    train_data: DeviceSplit
    test_data: DeviceSplit
    val_data: DeviceSplit | None
    model: nn.Module
    forward: nn.Module
    augment: Augmenter
    plan: budget.StepPlan
    result: TrainResult
    steps_per_epoch: int
    low_res: int
    classes: int
    started: float
    """When the budget's clock started."""

    @classmethod
    def build(cls, config: TrainConfig, dataset: ImageDataset, device: torch.device, world: ddp.DistEnv,
              resume: TrainingState | None, resume_weights: dict[str, torch.Tensor] | None,
              started: float, threads: ThreadWatch | None = None) -> _Setup:
        amp = autocast_dtype(config, device)
        if device.type == "cpu":
            keep_cpu_memory()
        torch.manual_seed(config.seed)
        train_split, val_split = split_validation(dataset.train, config.val_split)
        splits = [train_split, ddp.part(dataset.test, world), ddp.part(val_split, world)]
        train_data, test_data, val_data = (DeviceSplit(s, device, config.data.mean, config.data.std,
                                                       config.channels_last) if s is not None else None
                                           for s in splits)
        whiten_images = train_data.normalise(train_data.images[:5000]) if config.whiten else None
        model = build_model(config, dataset, device, whiten_images)
        forward = ddp.wrap(model, world, device, config.sync_bn)
        forward = torch.compile(forward) if config.compile else forward
        result = TrainResult(model=model, optimizer=make_optimizer(model, config))
        if resume is not None:
            model.load_state_dict(resume_weights)
            result.restore(resume, config)
        n = len(train_data)
        steps_per_epoch = steps_in_epoch(n, config)
        side = min(dataset.image_shape[1:])
        low_res = low_res_side(config, side)
        seconds, share = budget.evaluation_seconds, budget.evaluation_share  # measured as the plan needs them
        plan = budget.make_plan(config, steps_per_epoch=steps_per_epoch, started=started, device=device, world=world,
                                evaluation_seconds=lambda: seconds(model, test_data, config, device, amp),
                                evaluation_share=lambda: share(model, train_data, len(test_data), config, device, amp),
                                low_res=low_res, side=side, resume=result.position if resume is not None else None,
                                threads=threads)
        result.position.total_steps = plan.total_steps
        return cls(config=config, device=device, world=world, amp=amp, train_data=train_data, test_data=test_data,
                   val_data=val_data, model=model, forward=forward,
                   augment=Augmenter(config.augment, n, config.seed, device), plan=plan, result=result,
                   steps_per_epoch=steps_per_epoch, low_res=low_res, classes=len(dataset.classes), started=started)

    def batch(self, idx: torch.Tensor, low: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a global batch, normalised, augmented and (progressive resizing) shrunk."""
        idx = ddp.shard(idx, self.world, len(self.train_data))
        x = self.train_data.normalise(self.train_data.images[idx])
        x = self.augment(x, idx) if self.augment.active else x
        return shrink(x, self.low_res, low), self.train_data.labels[idx]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step; the loss, detached."""
        with autocast(self.device, self.amp):
            loss = F.cross_entropy(self.forward(x), y, label_smoothing=self.config.label_smoothing)
        optimizer = self.result.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def evaluate(self, data: DeviceSplit | None, tta: int = 0, threshold: float | None = None,
                 keep_predictions: bool = False) -> EvalResult | None:
        """A whole split, every rank's share counted once (the plain model: no gradient sync needed)."""
        if data is None:
            return None
        ev = evaluate(self.model, data, num_classes=self.classes, batch_size=self.config.eval_batch_size,
                      autocast_dtype=self.amp, tta=tta,
                      tta_threshold=self.config.tta_threshold if threshold is None else threshold,
                      keep_predictions=keep_predictions)
        return ddp.merge(ev, self.world, self.device)

    def final_evaluation(self) -> EvalResult:
        """The test set at the end: with a budget, what it can afford now (re-measured), giving up TTA views
        rather than steps; the choice and what it cut are recorded (and a cut is said in one line)."""
        c, plan, result = self.config, self.plan, self.result
        if plan.budget is None:
            result.final_tta = (c.tta, c.tta_threshold if c.tta else 0.0)
            return self.evaluate(self.test_data, c.tta, keep_predictions=True)
        seconds, confident = budget.measure_evaluation_batch(self.model, self.train_data, c, self.device, self.amp)
        batches = math.ceil(len(self.test_data) / c.eval_batch_size)
        index, choice = budget.choose_final_evaluation(c.tta, c.tta_threshold, plan.seconds_left(), seconds, batches,
                                                       confident, margin=budget.TTA_MARGIN)
        index = ddp.broadcast_int(index, self.world, self.device)  # every rank evaluates its slice the same way
        choice.tta, choice.threshold = budget.evaluation_options(c.tta, c.tta_threshold)[index]
        t = time.perf_counter()
        ev = self.evaluate(self.test_data, choice.tta, choice.threshold, keep_predictions=True)
        result.final_tta = (choice.tta, choice.threshold if choice.tta else 0.0)
        result.budget = budget.report(plan, c, result.position, choice, time.perf_counter() - t,
                                      time.perf_counter() - self.started)
        if result.budget.cuts and self.world.is_main:
            budget.note(f"budget {c.budget_seconds:g} s: {'; '.join(result.budget.cuts)}")
        return ev

    def end_epoch(self, loss_sum: torch.Tensor, last: bool, seconds: float, announce: bool,
                  score_test: bool = True) -> EpochMetrics:
        """Settle the epoch's sums over ranks, evaluate (validation every epoch; the test set at the end with the
        configured TTA, plain after other epochs when the config asks for learning curves and holds out no
        validation split: with one, the curves are validation's and the test set is scored once; never without
        `score_test`) and record it."""
        pos, c = self.result.position, self.config
        pos.elapsed += seconds
        pos.in_epoch, pos.loss_sum = False, float(ddp.all_sum(loss_sum, self.world))
        pos.seen = int(ddp.all_sum(torch.tensor([pos.seen], dtype=torch.int64, device=self.device), self.world).item())
        eval_start = time.perf_counter()
        val = self.evaluate(self.val_data)
        if last and c.tta and score_test:
            unsure = " (the images the model is unsure of)" if c.tta_threshold > 0 else ""
            say(f"evaluating the test set ({tta_views(c.tta)} TTA views{unsure})...", enabled=announce)
        curve = c.eval_every_epoch and self.val_data is None
        test = None
        if score_test:
            test = self.final_evaluation() if last else self.evaluate(self.test_data) if curve else None
        metrics = EpochMetrics(epoch=pos.epoch, train_loss=pos.loss_sum / max(pos.seen, 1),
                               test_loss=test.loss if test else None, test_accuracy=test.accuracy if test else None,
                               seconds=pos.elapsed, eval_seconds=time.perf_counter() - eval_start,
                               val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None)
        self.result.history.append(metrics)
        self.result.final = test or self.result.final
        return metrics


def train(config: TrainConfig, dataset: ImageDataset, device: torch.device, *,
          on_epoch: Callable[[EpochMetrics, TrainResult], None] | None = None,
          on_interrupt: Callable[[TrainResult], None] | None = None,
          progress: bool | None = None, resume: TrainingState | None = None,
          resume_weights: dict[str, torch.Tensor] | None = None, world: ddp.DistEnv = ddp.SINGLE,
          started: float | None = None, threads: ThreadWatch | None = None, score_test: bool = True) -> TrainResult:
    """Train `config.model` on the training set; evaluate after every epoch (if configured) and at the end.

    `resume` (with `resume_weights`) is a state saved earlier: training continues from that exact point. On
    Ctrl-C the loop stops after the current step, calls `on_interrupt` (to save the state) and raises
    KeyboardInterrupt. Under torchrun (`world`), each rank trains on its slice of every global batch and
    evaluates its slice of the test set; the sums are combined so every example counts exactly once.
    `started` (a time.perf_counter() value) is when the budget's clock started, if before this call.
    `threads` re-checks a budgeted CPU run's thread count at every re-plan (see `shape.ThreadWatch`).
    Without `score_test` the test set is never evaluated (a tuning trial: it is scored on validation alone).
    """
    started = time.perf_counter() if started is None else started
    check_settings(config, device)
    run = _Setup.build(config, dataset, device, world, resume, resume_weights, started, threads)
    result, plan, pos = run.result, run.plan, run.result.position
    lines = step_lines(label(config.model), pos.step, enabled=world.is_main and progress is not False)
    with kernel_choice(config.deterministic), _StopAtStepBoundary() as stop:
        while pos.step < plan.total_steps:
            if not pos.in_epoch:
                pos.epoch, pos.batch, pos.in_epoch, pos.loss_sum, pos.seen = pos.epoch + 1, 0, True, 0.0, 0
            run.model.train()
            run.augment.start_epoch(pos.epoch)
            synchronize(device)
            epoch_start = time.perf_counter()
            plan.resume()
            loss_sum = torch.tensor(pos.loss_sum, dtype=sum_dtype(device), device=device)
            order = run.train_data.batch_indices(config.batch_size, drop_last=config.drop_last,
                                                 generator=epoch_generator(config.seed, pos.epoch))
            shown = bar(order, total=run.steps_per_epoch, initial=pos.batch, enabled=world.is_main and progress
                        is not False, desc=f"{label(config.model)} epoch {pos.epoch}")
            for i, idx in enumerate(shown):
                if i < pos.batch:
                    continue  # done before the interruption this run resumes from
                if pos.step >= plan.total_steps:
                    break
                progress_now, low = plan.progress(pos.step), plan.is_low(pos.step)
                set_learning_rate(result.optimizer, config, progress_now)
                freeze_whitening_bias(run.model, config, progress_now)
                x, y = run.batch(idx, low)
                loss_sum += run.step(x, y).to(loss_sum.dtype) * len(y)
                pos.step, pos.batch, pos.seen = pos.step + 1, i + 1, pos.seen + len(y)
                pos.images, pos.low_images = pos.images + len(idx), pos.low_images + (len(idx) if low else 0)
                average_weights(result, config, progress_now, pos.step, plan)
                plan.after_step(pos.step, low)
                pos.total_steps = plan.total_steps
                lines(pos.step, plan.total_steps, len(idx))
                if stop.requested:
                    _close(shown)
                    pos.loss_sum, pos.elapsed = float(loss_sum), pos.elapsed + time.perf_counter() - epoch_start
                    if on_interrupt:
                        on_interrupt(result)
                    raise KeyboardInterrupt
            _close(shown)
            if result.lookahead is not None:
                result.lookahead.update(run.model, 1.0)  # every epoch ends on the averaged weights
            plan.pause()  # what follows (evaluations) is not step time
            synchronize(device)
            metrics = run.end_epoch(loss_sum, pos.step >= plan.total_steps, time.perf_counter() - epoch_start,
                                    announce=world.is_main and progress is not False, score_test=score_test)
            result.wall_seconds = time.perf_counter() - started
            if on_epoch:
                on_epoch(metrics, result)
    return result
