"""What a CPU budget buys on this machine now: a short timed probe of training steps picks the thread count and
gives the throughput from which a budgeted speedrun's shape is chosen (docs/cpu-performance.md#shape-by-compute).

The probe runs at the start of a budgeted run, before its model is built, and its seconds count in the budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cifarbench.device import keep_cpu_memory
from cifarbench.errors import CifarbenchError

PROBE_BATCH = 128
"""Small, so the probe costs a fraction of a second on an idle machine; images/s at the run's batch is higher by
a roughly constant factor, which `recipes.PROBE_TO_LOOP` carries."""
PROBE_STEPS = 3
"""Timed steps of PROBE_BATCH images after one untimed one (allocations, kernel selection); the fastest counts."""
CHECK_BATCH = 32
"""The thread count is chosen on steps of this many images (cheap even when the multi-thread step is slow)."""
CHECK_ROUNDS = 3
"""Rounds of the thread check, each timing one step per thread count, alternated; the fastest step per count
counts, so a single step slowed by a passing process does not decide (it once made an idle machine's 120 s run
take one thread and half the steps)."""
THROUGHPUT_FACTOR_ENV = "CIFARBENCH_THROUGHPUT_FACTOR"
"""Multiplies the measured throughput: emulates a slower (0.5) or faster (2) processor for tests and what-ifs."""


@dataclass
class Throughput:
    """The probe's measurement: training images/s of the reference net at the chosen thread count."""

    images_per_second: float
    threads: int
    tried: dict[str, float]
    """images/s per thread count tried, on steps of CHECK_BATCH images."""
    seconds: float
    factor: float = 1.0
    """The emulation factor applied to `images_per_second` (1 = as measured)."""
    others_running: int | None = None
    """Threads of other processes ready to run when the probe started (Linux), which caps the thread count."""

    def to_dict(self) -> dict:
        return asdict(self)


def _reference_steps() -> Callable[[int], None]:
    """Training steps of the reference net (speedrun 32-64-256, SiLU, bf16, channels-last) on random batches of
    a given size."""
    from cifarbench.models import build_model

    model = build_model("speedrun", num_classes=10, in_shape=(3, 32, 32),
                        kwargs={"widths": [32, 64, 256], "act": "silu"}).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(batch: int) -> None:
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _seconds(step: Callable[[int], None], batch: int, repeat: int) -> float:
    """The fastest of `repeat` timed steps, after one untimed one."""
    step(batch)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        step(batch)
        best = min(best, time.perf_counter() - t)
    return best


def check_threads(step: Callable[[int], None], threads: int, rounds: int = CHECK_ROUNDS) -> dict[str, float]:
    """images/s of CHECK_BATCH steps with one thread and with `threads`: one untimed step each, then `rounds`
    alternated rounds, keeping each count's fastest step."""
    best = {1: math.inf, threads: math.inf}
    for n in best:
        torch.set_num_threads(n)
        step(CHECK_BATCH)  # untimed: the thread pool and kernels for this count
    for _ in range(rounds):
        for n in best:
            torch.set_num_threads(n)
            t = time.perf_counter()
            step(CHECK_BATCH)
            best[n] = min(best[n], time.perf_counter() - t)
    return {str(n): CHECK_BATCH / seconds for n, seconds in best.items()}


def throughput_factor() -> float:
    """The emulation factor from CIFARBENCH_THROUGHPUT_FACTOR (1 when unset)."""
    text = os.environ.get(THROUGHPUT_FACTOR_ENV, "").strip()
    try:
        factor = float(text) if text else 1.0
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise CifarbenchError(f"{THROUGHPUT_FACTOR_ENV} must be a positive number (got {text!r})")
    return factor


def others_running(samples: int = 20, interval: float = 0.01) -> int | None:
    """How many threads of other processes were ready to run, the median of `samples` readings of Linux's
    /proc/stat (None elsewhere). Counted before any multi-thread step: on a machine where another process holds
    a core, one multi-thread step can take seconds (each parallel region waits for the descheduled thread)."""
    counts = []
    try:
        for _ in range(samples):
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
            counts.append(int(line.split()[1]) - 1)  # less this process's own running thread
            time.sleep(interval)
    except (OSError, StopIteration, ValueError):
        return None
    return sorted(counts)[len(counts) // 2]


def probe_throughput(threads: int | None = None) -> Throughput:
    """Pick the thread count (one, or `threads`, default torch's) whose small steps are faster, set it
    (torch.set_num_threads), and measure the reference net's training images/s with it. On a machine where
    another process holds a core, the multi-thread steps are many times slower, and one thread wins."""
    start = time.perf_counter()
    factor = throughput_factor()
    keep_cpu_memory()
    threads = threads or torch.get_num_threads()
    busy = others_running()
    if busy is not None:  # leave the cores that other work is using
        threads = max(1, min(threads, (os.cpu_count() or 1) - busy))
    # Even building the net's parameters runs parallel kernels: one thread until the check has chosen.
    torch.set_num_threads(1)
    with torch.random.fork_rng():  # the run's seeded random stream stays as it would be without the probe
        torch.manual_seed(0)
        step = _reference_steps()
        tried, best = {}, 1
        if threads > 1:
            tried = check_threads(step, threads)
            best = threads if tried[str(threads)] > tried["1"] else 1
        torch.set_num_threads(best)
        rate = PROBE_BATCH / _seconds(step, PROBE_BATCH, PROBE_STEPS)
    return Throughput(rate * factor, best, tried, time.perf_counter() - start, factor, busy)
