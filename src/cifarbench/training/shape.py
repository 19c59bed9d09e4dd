"""What a CPU budget buys on this machine now: a short timed probe of training steps picks the thread count and
gives the throughput from which a budgeted speedrun's shape is chosen (docs/cpu-performance.md#shape-by-compute).

The probe runs at the start of a budgeted run, before its model is built, and its seconds count in the budget.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cifarbench.device import keep_cpu_memory

PROBE_BATCH = 128
"""Small, so the probe costs a fraction of a second on an idle machine; images/s at the run's batch is higher by
a roughly constant factor, which `recipes.PROBE_TO_LOOP` carries."""
PROBE_STEPS = 2
"""Timed steps per thread count, after one untimed step (allocations, kernel selection)."""
CONTENDED = 4.0
"""A multi-threaded warm-up step this many times slower than a one-thread step means another process holds a
core: each parallel region then waits for the descheduled thread, and one thread is faster."""
THROUGHPUT_FACTOR_ENV = "CIFARBENCH_THROUGHPUT_FACTOR"
"""Multiplies the measured throughput: emulates a slower (0.5) or faster (2) processor for tests and what-ifs."""


@dataclass
class Throughput:
    """The probe's measurement: training images/s of the reference net at the chosen thread count."""

    images_per_second: float
    threads: int
    tried: dict[str, float]
    """images/s per thread count tried (0 where the warm-up step already showed contention)."""
    seconds: float
    factor: float = 1.0
    """The emulation factor applied to `images_per_second` (1 = as measured)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _reference_step(threads: int) -> Callable[[], None]:
    """One bf16 channels-last training step of the reference net (speedrun 32-64-256, SiLU) on random data."""
    from cifarbench.models import build_model

    torch.set_num_threads(threads)
    model = build_model("speedrun", num_classes=10, in_shape=(3, 32, 32),
                        kwargs={"widths": [32, 64, 256], "act": "silu"}).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(PROBE_BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (PROBE_BATCH,))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _timed(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def probe_throughput(threads: int | None = None) -> Throughput:
    """Time the reference net's training step with one thread and with `threads` (default: torch's count), keep
    the faster count set (torch.set_num_threads) and return its images/s. A busy machine shows in the multi-thread
    warm-up step, which then ends the probe early."""
    start = time.perf_counter()
    keep_cpu_memory()
    threads = threads or torch.get_num_threads()
    with torch.random.fork_rng():  # the run's seeded random stream stays as it would be without the probe
        torch.manual_seed(0)
        step = _reference_step(1)
        warm = _timed(step)
        one = min(_timed(step) for _ in range(PROBE_STEPS))
        tried = {"1": PROBE_BATCH / one}
        best = 1
        if threads > 1:
            step = _reference_step(threads)
            warm_many = _timed(step)
            if warm_many < CONTENDED * max(one, warm / 2):
                many = min(_timed(step) for _ in range(PROBE_STEPS))
                tried[str(threads)] = PROBE_BATCH / many
                best = threads if many < one else 1
            else:
                tried[str(threads)] = 0.0
    torch.set_num_threads(best)
    factor = float(os.environ.get(THROUGHPUT_FACTOR_ENV) or 1.0)
    return Throughput(tried[str(best)] * factor, best, tried, time.perf_counter() - start, factor)
