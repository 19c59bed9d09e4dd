"""Progress for every kind of user: one line per epoch (terminals, notebooks and log files alike) and, where a
terminal or a notebook widget can show one, a bar within the epoch."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the data loaders import `say` without pulling in torch
    from cifarbench.config import TrainConfig
    from cifarbench.training.state import EpochMetrics


def epoch_line(config: TrainConfig, m: EpochMetrics) -> str:
    """'cnn seed 0 epoch   3/10  train loss 1.2345  val acc ...  test loss ...  test acc ...  12.3 s'."""
    from cifarbench.models.reference import label

    total = "" if config.budget_seconds else f"/{config.epochs}"
    parts = [f"{label(config.model)} seed {config.seed} epoch {m.epoch:>3}{total}", f"train loss {m.train_loss:.4f}"]
    if m.val_accuracy is not None:
        parts += [f"val loss {m.val_loss:.4f}", f"val acc {100 * m.val_accuracy:6.2f}%"]
    if m.test_accuracy is not None:
        parts += [f"test loss {m.test_loss:.4f}", f"test acc {100 * m.test_accuracy:6.2f}%"]
    parts.append(f"{m.seconds:7.1f} s")
    return "  ".join(parts)


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (where stderr shows on a pink error background)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and "ipykernel" in sys.modules else None
    return getattr(shell, "kernel", None) is not None


def progress_stream() -> IO[str]:
    """Where progress lines go: stdout in a notebook, stderr elsewhere (a script's stdout stays its own)."""
    return sys.stdout if in_kernel() else sys.stderr


class EpochPrinter:
    """Prints `epoch_line` for every finished epoch to `stream` (default: `progress_stream()`), flushed at once so
    the lines appear live."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def __call__(self, config: TrainConfig, metrics: EpochMetrics) -> None:
        print(epoch_line(config, metrics), file=self.stream or progress_stream(), flush=True)


def _widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return "ipykernel" in sys.modules


def bar(iterable: Iterable[Any], *, total: int, desc: str, initial: int = 0,
        enabled: bool | None = None) -> Iterator[Any]:
    """A within-epoch progress bar: a notebook widget when ipywidgets is there, a terminal bar on a terminal,
    nothing otherwise (a log file or a notebook without widgets gets the epoch lines alone, and no warning)."""
    if enabled is False:
        return iter(iterable)
    if _widgets():
        from tqdm.notebook import tqdm
    elif sys.stderr.isatty():
        from tqdm import tqdm
    else:
        return iter(iterable)
    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=False, unit="batch")


def say(message: str, *, enabled: bool | None = None) -> None:
    """One line saying what a long phase is doing ('building the report...'), so that a notebook, a terminal or a
    log never sits silent (on `progress_stream()`); `enabled=False` (the callers' `progress=False`) keeps it quiet."""
    if enabled is not False:
        print(message, file=progress_stream(), flush=True)


def tta_views(tta: int) -> int:
    """How many views of each image test-time augmentation level `tta` looks at (plain, flipped, translated)."""
    return {0: 1, 1: 2}.get(tta, 6)
