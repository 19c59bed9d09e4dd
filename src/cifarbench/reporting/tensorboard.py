"""Optional TensorBoard logging, as an on-epoch callback: the training loop knows nothing about it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cifarbench.errors import CifarbenchError, Keyword


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CifarbenchError("{option} needs the tensorboard package, which is not installed "
                              "(pip install tensorboard)", option=Keyword("tensorboard")) from None
    return SummaryWriter


class TensorBoardLogger:
    """Call with (config, epoch metrics) after every epoch; writes one TensorBoard run per model and seed
    under `log_dir/<start time>-<model>-s<seed>`. Fails at construction when tensorboard is missing."""

    def __init__(self, log_dir: str | os.PathLike):
        self._writer_class = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        self._writers: dict[tuple[str, int], Any] = {}

    def __call__(self, config: Any, metrics: Any) -> None:
        key = (config.model, config.seed)
        if key not in self._writers:
            name = f"{self._stamp}-{config.model}-s{config.seed}"
            self._writers[key] = self._writer_class(log_dir=str(self.log_dir / name))
        writer = self._writers[key]
        scalars = {"train/loss": metrics.train_loss, "test/loss": metrics.test_loss,
                   "test/accuracy": metrics.test_accuracy, "time/train_seconds": metrics.seconds,
                   "val/loss": getattr(metrics, "val_loss", None),
                   "val/accuracy": getattr(metrics, "val_accuracy", None)}
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, value, metrics.epoch)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
