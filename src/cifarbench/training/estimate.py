"""What a run will cost, said before it starts: parameters, FLOPs per image, images/s measured from a few training
steps of a copy of the model, and the time per epoch and for the whole run (evaluations included).

The steps train a copy (its own optimiser, the random streams forked), so the run trains exactly as it would
without them. A budgeted CPU run has measured already (`shape.probe_throughput`): its rate is reused.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.device import autocast, autocast_dtype, synchronize
from cifarbench.errors import Keyword, Spelling, as_keyword
from cifarbench.evaluation.metrics import TTA_VIEWS
from cifarbench.progress import duration
from cifarbench.training.optim import make_optimizer
from cifarbench.training.shape import candidate

LONG_RUN_SECONDS = 600.0
"""An estimate above this says how to cut the run (epochs or a budget)."""
PROBE_BATCH_MAX = 256
"""The probe's steps take the run's batch up to this many images (a large batch of a large model costs seconds)."""
PROBE_STEPS = 3
"""Timed training steps, after an untimed one that builds the kernels (fewer when they pass PROBE_SECONDS)."""
PROBE_SECONDS = 2.0
SHORTEST_RUN_IMAGES = 20 * PROBE_BATCH_MAX
"""A run that trains fewer images than this (tiny data, a test) is over about as soon as it could be measured: it
gets no estimate."""


def _finite(value: int | float) -> bool:
    """A finite number that a float can hold (a JSON integer of 400 digits is neither)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(kw_only=True)
class RunEstimate:
    """A run's cost as estimated before it started (recorded, so the real time can be compared with it)."""

    params: int
    flops_per_image: int
    """Forward-pass FLOPs of one image: two per multiply-accumulate of its Conv2d and Linear layers."""
    images_per_second: float
    """Training images/s measured on the probe's steps (or the budget's probe)."""
    eval_images_per_second: float | None
    """Evaluation (forward only) images/s on the same batch; None where the budget's probe gave the rate."""
    source: str
    """"probe": steps timed for this estimate; "budget probe": the budgeted run's own measurement."""
    steps: int
    """Training steps timed."""
    batch: int
    steps_per_epoch: int
    epochs: int
    epoch_seconds: float
    """One epoch's training steps."""
    eval_seconds: float
    """Every evaluation of the run together (validation each epoch, the test set as the config scores it)."""
    total_seconds: float
    """The whole run: training and evaluation (for a budgeted run, its budget)."""
    budget_seconds: float | None = None
    seconds: float = 0.0
    """What measuring took."""
    trains_in: str = ""
    """The precision and memory layout the run trains in ("fp32 channels-last"), as measured and chosen by a
    budgeted CPU run's probe (`shape.choose_kernels`) or as the config gives them."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> RunEstimate | None:
        if not isinstance(d, dict):
            return None
        values = {f.name: d.get(f.name) for f in fields(cls) if f.name in d}
        # A record from elsewhere (an imported run) is data: shown only when every field has its type.
        for f in fields(cls):
            v = values.get(f.name)
            text = f.type == "str"
            if (v is not None or f.name in ("params", "images_per_second", "total_seconds")) and (
                    not isinstance(v, str) if text else
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v)):
                return None
        try:
            return cls(**values)
        except TypeError:  # an older record without every field: not an error, just not shown
            return None

    def line(self, name: str, spelling: Spelling = as_keyword) -> str:
        """The one line said before training; beyond LONG_RUN_SECONDS, how to cut the run, in the caller's
        spelling (`--epochs` on the command line, `epochs=...` in Python)."""
        rate = f"{self.images_per_second:,.0f} images/s" + (" (the budget's probe)" if self.source != "probe" else
                                                             f" (measured on {self.steps} steps of {self.batch})")
        head = (f"cost: {name}: {self.params:,} parameters, {self.flops_per_image / 1e6:,.2f} MFLOPs per image "
                f"(forward; 2 per multiply-add), {rate}" + (f" in {self.trains_in}" if self.trains_in else ""))
        if self.budget_seconds:
            return f"{head}; the run is planned to end within its {self.budget_seconds:g} s budget"
        text = (f"{head}; about {duration(self.epoch_seconds)} per epoch of {self.steps_per_epoch} steps, "
                f"{duration(self.total_seconds)} for {self.epochs} epoch{'s' if self.epochs != 1 else ''} "
                f"with evaluation")
        if self.total_seconds > LONG_RUN_SECONDS:
            cut = (f"{spelling(Keyword('epochs', ...))} trains fewer epochs, {spelling(Keyword('budget', ...))} fits "
                   "the run into a time")
            text += f" (over {duration(LONG_RUN_SECONDS)}: {cut})"
        return text


def worth_estimating(config: TrainConfig, train_images: int) -> bool:
    """Whether the run is long enough for its estimate to be worth the steps it measures (a budget always is)."""
    return bool(config.budget_seconds) or train_images * config.epochs >= SHORTEST_RUN_IMAGES


def evaluated_images(config: TrainConfig, test_images: int, val_images: int) -> int:
    """Forward passes the run's evaluations make: validation every epoch; the test set at the end with every TTA
    view (selective TTA needs fewer: an upper bound), and plain after each earlier epoch when it draws a test
    curve (no validation split: see `loop._Setup.end_epoch`)."""
    curve = config.eval_every_epoch and not val_images
    return (val_images * config.epochs + test_images * TTA_VIEWS[config.tta]
            + (test_images * (config.epochs - 1) if curve else 0))


def measure(model: nn.Module, config: TrainConfig, device: torch.device, in_shape: tuple[int, ...], classes: int,
            clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, int, int, float]:
    """Training and evaluation images/s of `model` as the run trains it (its precision, layout and optimiser), on
    random batches: timed on a copy, with the random streams forked, so neither the model nor the run's random
    numbers change. Returns (training images/s, evaluation images/s, steps timed, batch, seconds taken)."""
    start = clock()
    batch = max(1, min(config.batch_size, PROBE_BATCH_MAX))
    amp = autocast_dtype(config, device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        twin = copy.deepcopy(model).to(device)
        twin = twin.to(memory_format=layout) if config.channels_last else twin
        optimizer = make_optimizer(twin, config)
        x = torch.randn(batch, *in_shape, device=device).contiguous(memory_format=layout)
        y = torch.randint(0, classes, (batch,), device=device)

        def step() -> None:
            with autocast(device, amp):
                loss = F.cross_entropy(twin(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        twin.train()
        step()  # untimed: builds the kernels for this batch
        synchronize(device)
        timed, spent = 0, 0.0
        while timed < PROBE_STEPS and (timed == 0 or spent < PROBE_SECONDS):
            t = clock()
            step()
            synchronize(device)
            spent += clock() - t
            timed += 1
        twin.eval()
        with torch.no_grad(), autocast(device, amp):
            twin(x)  # untimed: the inference kernels
            synchronize(device)
            t = clock()
            twin(x)
            synchronize(device)
            forward = clock() - t
    return (batch * timed / max(spent, 1e-9), batch / max(forward, 1e-9), timed, batch, clock() - start)


def estimate(model: nn.Module, config: TrainConfig, device: torch.device, *, in_shape: tuple[int, ...],
             classes: int, params: int, flops_per_image: int, train_images: int, test_images: int,
             steps_per_epoch: int, probe: dict | None = None) -> RunEstimate:
    """The run's estimate: from the budget's probe when there was one (`probe`, its images/s), else measured
    here (`measure`). `train_images` is what an epoch trains on (after the validation split)."""
    val_images = config.val_split
    trains_in = candidate("bf16" if autocast_dtype(config, device) else "fp32", config.channels_last)
    evaluations = evaluated_images(config, test_images, val_images)
    if probe is not None:
        rate = float(probe["images_per_second"])
        epoch = train_images / rate
        # Without a measured forward pass, one evaluation image is priced at a third of a training one.
        return RunEstimate(params=params, flops_per_image=flops_per_image, images_per_second=rate,
                           eval_images_per_second=None, source="budget probe", steps=0, batch=config.batch_size,
                           steps_per_epoch=steps_per_epoch, epochs=config.epochs, epoch_seconds=epoch,
                           eval_seconds=evaluations / (3 * rate), total_seconds=float(config.budget_seconds or 0),
                           budget_seconds=config.budget_seconds, trains_in=trains_in)
    rate, eval_rate, steps, batch, seconds = measure(model, config, device, in_shape, classes)
    epoch = min(steps_per_epoch * config.batch_size, train_images) / rate
    evaluation = evaluations / eval_rate
    total = config.budget_seconds if config.budget_seconds else epoch * config.epochs + evaluation
    return RunEstimate(params=params, flops_per_image=flops_per_image, images_per_second=rate,
                       eval_images_per_second=eval_rate, source="probe", steps=steps, batch=batch,
                       steps_per_epoch=steps_per_epoch, epochs=config.epochs, epoch_seconds=epoch,
                       eval_seconds=evaluation, total_seconds=float(total), budget_seconds=config.budget_seconds,
                       seconds=seconds, trains_in=trains_in)

