"""One short training loop: setup, then per epoch: shuffle, step over batches, evaluate on the test set."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.data.dataset import ImageDataset
from cifarbench.data.loader import DeviceSplit
from cifarbench.evaluation.metrics import EvalResult, evaluate
from cifarbench.models import create_model


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    """Mean training loss over the epoch's examples."""
    test_loss: float
    test_accuracy: float
    seconds: float
    """Cumulative training seconds at the end of this epoch (evaluation excluded), for time-to-accuracy."""
    eval_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[EpochMetrics] = field(default_factory=list)
    final: EvalResult | None = None

    @property
    def train_seconds(self) -> float:
        return self.history[-1].seconds if self.history else 0.0


def autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The autocast dtype the config asks for, or None for plain fp32."""
    return torch.bfloat16 if config.precision == "bf16" else None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optimizer
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _sync(device: torch.device) -> None:
    # Wall-clock timing of asynchronous devices is only honest after a sync.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(config: TrainConfig, dataset: ImageDataset, device: torch.device, *,
          on_epoch: Callable[[EpochMetrics, TrainResult], None] | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train `config.model` on `dataset.train`, evaluating on the whole `dataset.test` after every epoch."""
    from tqdm.auto import tqdm  # imported here: a library import should not pay for the progress bar

    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=len(dataset.classes), in_shape=dataset.image_shape).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    mean, std = config.data.mean, config.data.std
    train_data = DeviceSplit(dataset.train, device, mean, std, config.channels_last)
    test_data = DeviceSplit(dataset.test, device, mean, std, config.channels_last)
    amp = autocast_dtype(config)
    result = TrainResult(model, optimizer)
    steps = -(-len(train_data) // config.batch_size)
    elapsed = 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        _sync(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        batches = train_data.batches(config.batch_size, generator=epoch_generator(config.seed, epoch))
        bar = tqdm(batches, total=steps, desc=f"{config.model} epoch {epoch}/{config.epochs}", leave=False,
                   disable=None if progress is None else not progress, unit="batch")
        for x, y in bar:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(y)
        bar.close()
        _sync(device)
        elapsed += time.perf_counter() - start
        eval_start = time.perf_counter()
        ev = evaluate(model, test_data, num_classes=len(dataset.classes), batch_size=config.eval_batch_size,
                      autocast_dtype=amp)
        metrics = EpochMetrics(epoch, float(loss_sum) / len(train_data), ev.loss, ev.accuracy, elapsed,
                               time.perf_counter() - eval_start)
        result.history.append(metrics)
        result.final = ev
        if on_epoch:
            on_epoch(metrics, result)
    return result
