"""One short training loop: setup, then per epoch: shuffle, step over batches, evaluate; then a final evaluation.

Everything a recipe switches (augmentation, schedule, lookahead, whitening, label smoothing, precision, budget)
is read from the `TrainConfig`; with all of them off this is exactly the notebook's loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.data.augment import Augmenter
from cifarbench.data.dataset import ImageDataset, Split
from cifarbench.data.loader import DeviceSplit
from cifarbench.evaluation.metrics import TTA_VIEWS, EvalResult, evaluate, predict_logits
from cifarbench.models import create_model
from cifarbench.training.budget import StepPlan
from cifarbench.training.lookahead import Lookahead
from cifarbench.training.schedules import lr_factor


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    """Mean training loss over the epoch's examples."""
    test_loss: float | None
    test_accuracy: float | None
    """None for epochs that were not evaluated (budgeted runs evaluate only at the end)."""
    seconds: float
    """Cumulative training seconds at the end of this epoch (evaluation excluded), for time-to-accuracy."""
    eval_seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    """On the held-out validation split (`val_split`), when there is one."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[EpochMetrics] = field(default_factory=list)
    final: EvalResult | None = None
    steps: int = 0
    wall_seconds: float = 0.0
    """Everything from model creation to the end of the final evaluation (what a budget limits)."""

    @property
    def train_seconds(self) -> float:
        return self.history[-1].seconds if self.history else 0.0


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the config asks for on `device`, or None for plain fp32."""
    if config.precision == "auto":
        return torch.bfloat16 if device.type in ("cpu", "cuda") else None
    return torch.bfloat16 if config.precision == "bf16" else None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD; BatchNorm biases get `bias_lr_scale` x the learning rate and / that the decay (same net decay)."""
    o = config.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in trainable if id(p) in norm_ids]
    other = [p for p in trainable if id(p) not in norm_ids]
    groups = [{"params": other, "lr": o.lr, "weight_decay": o.weight_decay}]
    if norm:
        groups.append({"params": norm, "lr": o.lr * o.bias_lr_scale, "weight_decay": o.weight_decay / o.bias_lr_scale})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_validation(train: Split, size: int) -> tuple[Split, Split | None]:
    """Hold out `size` training examples, chosen by a fixed shuffle (the same for every seed, so runs of a
    sweep are compared on one validation set)."""
    if size <= 0:
        return train, None
    if size >= len(train):
        from cifarbench.errors import CifarbenchError
        raise CifarbenchError(f"--val-split {size} leaves no training data ({len(train)} examples)")
    order = np.random.default_rng(0).permutation(len(train))
    keep, held = np.sort(order[:-size]), np.sort(order[-size:])
    return Split(train.images[keep], train.labels[keep]), Split(train.images[held], train.labels[held])


def _sync(device: torch.device) -> None:
    # Wall-clock timing of asynchronous devices is only honest after a sync.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: TrainConfig, dataset: ImageDataset, device: torch.device,
                whiten_images: torch.Tensor | None = None) -> nn.Module:
    """Create the model, initialise its whitening layer from training images if asked, set its layout."""
    model = create_model(config.model, num_classes=len(dataset.classes), in_shape=dataset.image_shape,
                         **config.model_kwargs).to(device)
    if config.whiten and hasattr(model, "init_whitening") and whiten_images is not None:
        model.init_whitening(whiten_images)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train(config: TrainConfig, dataset: ImageDataset, device: torch.device, *,
          on_epoch: Callable[[EpochMetrics, TrainResult], None] | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train `config.model` on the training set; evaluate after every epoch (if configured) and at the end."""
    from tqdm.auto import tqdm  # imported here: a library import should not pay for the progress bar

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train_split, val_split = split_validation(dataset.train, config.val_split)
    mean, std, cl = config.data.mean, config.data.std, config.channels_last
    train_data = DeviceSplit(train_split, device, mean, std, cl)
    test_data = DeviceSplit(dataset.test, device, mean, std, cl)
    val_data = DeviceSplit(val_split, device, mean, std, cl) if val_split is not None else None
    whiten_images = train_data.normalise(train_data.images[:5000]) if config.whiten else None
    model = build_model(config, dataset, device, whiten_images)
    forward = torch.compile(model) if config.compile else model
    optimizer = make_optimizer(model, config)
    augment = Augmenter(config.augment, len(train_data), config.seed, device)
    amp = autocast_dtype(config, device)
    classes = len(dataset.classes)
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)

    def run_eval(data: DeviceSplit, tta: int = 0) -> EvalResult:
        return evaluate(forward, data, num_classes=classes, batch_size=config.eval_batch_size, autocast_dtype=amp,
                        tta=tta)

    def final_eval_estimate() -> float:
        """Seconds the final evaluation will take: one timed batch, scaled."""
        x = test_data.normalise(test_data.images[:config.eval_batch_size])
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            was = forward.training
            forward.eval()
            predict_logits(forward, x, 0)
            forward.train(was)
        _sync(device)
        return (time.perf_counter() - t) * math.ceil(len(test_data) / len(x)) * TTA_VIEWS[config.tta]

    steps_per_epoch = (len(train_data) // config.batch_size if config.drop_last and len(train_data) >= config.batch_size
                       else math.ceil(len(train_data) / config.batch_size))
    plan = StepPlan(10**9 if config.budget_seconds else config.epochs * steps_per_epoch, config.budget_seconds,
                    started, final_eval_estimate, lambda: _sync(device), guard_every_step=device.type == "cpu")
    result = TrainResult(model, optimizer)
    lookahead: Lookahead | None = None
    step, epoch, elapsed = 0, 0, 0.0
    while step < plan.total_steps:
        epoch += 1
        model.train()
        augment.start_epoch(epoch)
        _sync(device)
        epoch_start, epoch_first_step = time.perf_counter(), step
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        batches = train_data.batch_indices(config.batch_size, generator=epoch_generator(config.seed, epoch),
                                           drop_last=config.drop_last)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{config.model} epoch {epoch}", leave=False,
                   disable=None if progress is None else not progress, unit="batch")
        for idx in bar:
            if step >= plan.total_steps:
                break
            progress_now = plan.progress(step)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(config.schedule, progress_now)
            if whiten_bias is not None:
                whiten_bias.requires_grad_(progress_now < config.whiten_bias_fraction)
            x = augment(train_data.normalise(train_data.images[idx]), idx) if augment.active else \
                train_data.normalise(train_data.images[idx])
            y = train_data.labels[idx]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(forward(x), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if config.lookahead.enabled and progress_now >= config.lookahead.start and step % config.lookahead.every == 0:
                if lookahead is None:
                    lookahead = Lookahead(model, config.lookahead)
                else:
                    lookahead.update(model, lookahead.decay(plan.progress(step)))
            plan.after_step(step)
        bar.close()
        if lookahead is not None:
            lookahead.update(model, 1.0)  # end every epoch on the averaged weights
        _sync(device)
        epoch_seconds = time.perf_counter() - epoch_start
        elapsed += epoch_seconds
        if step < plan.total_steps and step > epoch_first_step:
            plan.replan(step, epoch_seconds / (step - epoch_first_step))  # the measured rate of a whole epoch
        last = step >= plan.total_steps
        eval_start = time.perf_counter()
        val = run_eval(val_data) if val_data is not None else None
        # The final evaluation uses the configured test-time augmentation; per-epoch ones are plain.
        test = run_eval(test_data, config.tta) if last else (run_eval(test_data) if config.eval_every_epoch else None)
        metrics = EpochMetrics(epoch, float(loss_sum) / max(seen, 1),
                               test.loss if test else None, test.accuracy if test else None,
                               elapsed, time.perf_counter() - eval_start,
                               val.loss if val else None, val.accuracy if val else None)
        result.history.append(metrics)
        result.steps = step
        if test is not None:
            result.final = test
        result.wall_seconds = time.perf_counter() - started
        if on_epoch:
            on_epoch(metrics, result)
    return result
