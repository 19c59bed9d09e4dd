"""Progress for every kind of user: one line per epoch (terminals, notebooks and log files alike) and, where a
terminal or a notebook widget can show one, a bar within the epoch."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
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


def draws_bar() -> bool:
    """Whether `bar` can draw here: a notebook with ipywidgets, or a terminal."""
    return _widgets() or sys.stderr.isatty()


LINE_EVERY = 30.0
"""Seconds between step lines where no bar is drawn (a log file, a notebook without ipywidgets)."""


def duration(seconds: float) -> str:
    """'4.2 s', '42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class StepLines:
    """Where no bar can be drawn, one line at least every `every` seconds of training: steps done of the total,
    images/s and the training time left, both at the rate since the last line. Call it after every step."""

    UNKNOWN = 10**8
    """A total at least this large is a budgeted run's not yet planned one: not shown."""

    def __init__(self, desc: str, step: int = 0, every: float = LINE_EVERY, stream: IO[str] | None = None,
                 clock: Callable[[], float] | None = None):
        self.desc, self.every, self.stream, self.clock = desc, every, stream, clock or time.monotonic
        self.since, self.step, self.images = self.clock(), step, 0

    def __call__(self, step: int, total: int, images: int) -> None:
        self.images += images
        now = self.clock()
        seconds = now - self.since
        if seconds < self.every:
            return
        per_step = seconds / max(step - self.step, 1)
        known = total < self.UNKNOWN
        text = f"{self.desc}: step {step}" + (f"/{total}" if known else "") + f", {self.images / seconds:,.0f} images/s"
        if known:
            text += f", about {duration(per_step * (total - step))} of training left"
        print(text, file=self.stream or progress_stream(), flush=True)
        self.since, self.step, self.images = now, step, 0


def step_lines(desc: str, step: int = 0, *, enabled: bool | None = None) -> Callable[[int, int, int], None]:
    """`StepLines` where no bar is drawn, else (or disabled) a call that does nothing."""
    if enabled is False or draws_bar():
        return lambda step, total, images: None
    return StepLines(desc, step)


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
