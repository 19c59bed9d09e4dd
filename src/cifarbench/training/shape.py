"""What a CPU budget buys on this machine now: a short timed probe of training steps picks the precision and memory
layout, then the thread count, and gives the throughput from which a budgeted speedrun's shape is chosen
(docs/cpu-performance.md#shape-by-compute, #precision-by-measurement).

The probe runs at the start of a budgeted run, before its model is built, and its seconds count in the budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.device import CPU_BF16_ENV, keep_cpu_memory
from cifarbench.errors import CifarbenchError

PROBE_BATCH = 128
"""Small, so the probe costs a fraction of a second on an idle machine; images/s at the run's batch is higher by
a roughly constant factor, which `recipes.PROBE_TO_LOOP` carries."""
PROBE_STEPS = 2
"""Timed steps of PROBE_BATCH images, the fastest counting: the first also builds the kernels for this batch (the
kernel choice has built the rest); more cost seconds of a short budget on a loaded machine."""
CHECK_BATCH = 32
"""The thread count is chosen on steps of this many images (cheap even when the multi-thread step is slow)."""
CHECK_ROUNDS = 3
"""Rounds of the thread check, each timing one step per thread count, alternated; the fastest step per count
counts, so a single step slowed by a passing process does not decide (it once made an idle machine's 120 s run
take one thread and half the steps)."""
THROUGHPUT_FACTOR_ENV = "CIFARBENCH_THROUGHPUT_FACTOR"
"""Multiplies the measured throughput: emulates a slower (0.5) or faster (2) processor for tests and what-ifs."""
KERNEL_STEPS = 3
"""Timed CHECK_BATCH steps per precision and layout that can be chosen, after an untimed one (its kernels for
that batch): the first right after it, the others in rounds alternated over the candidates."""
SCOUT_BATCH = 8
"""Each precision and layout first takes one step of this many images (its kernels built included)."""
ABANDON = 8.0
"""A candidate whose scouting step costs this many times more per image than the fastest step so far is not
timed further: bf16 on an AVX2-only CPU is 14x slower than fp32 (a 32-image step costs a second there)."""
KERNEL_SHARE = 0.04
"""The most of the budget that timing precisions and layouts may take (at least KERNEL_MIN_SECONDS); what the
limit leaves untimed is not chosen."""
KERNEL_MIN_SECONDS = 1.0

Step = Callable[[int, "torch.dtype | None", bool], None]
"""One training step of `batch` random images, in autocast `dtype` (None: fp32), channels-last or not."""


def candidate(precision: str, channels_last: bool) -> str:
    """A precision and layout by name, as the run records them: "fp32 channels-last", "bf16 contiguous"."""
    return f"{precision} {'channels-last' if channels_last else 'contiguous'}"


@dataclass(kw_only=True)
class KernelChoice:
    """The precision and memory layout a budgeted CPU run trains with, chosen by timing its step here."""

    precision: str
    """"fp32" or "bf16"."""
    channels_last: bool
    requested: str
    """The config's precision: "auto" chooses by measurement, "fp32" or "bf16" forced chooses the layout only."""
    native_bf16: bool
    """Whether this CPU reports native bf16 kernels (device.cpu_bf16_native, CIFARBENCH_CPU_BF16 included)."""
    images_per_second: dict[str, float] = field(default_factory=dict)
    """Per candidate timed: images/s of its fastest step of CHECK_BATCH images on one thread (of its scouting step
    of SCOUT_BATCH images, kernels built included, for one that could not win: a lower bound of its rate)."""
    not_chosen: dict[str, str] = field(default_factory=dict)
    """Why a candidate was not timed or not allowed."""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return candidate(self.precision, self.channels_last)

    def slowdown(self) -> float | None:
        """How many times slower the chosen bf16 step is than the fastest fp32 one (None when not both timed)."""
        fp32 = [r for k, r in self.images_per_second.items() if k.startswith("fp32")]
        chosen = self.images_per_second.get(self.name)
        return max(fp32) / chosen if self.precision == "bf16" and fp32 and chosen else None

    def to_dict(self) -> dict:
        return {**asdict(self), "chosen": self.name}


def choose_kernels(step: Step, requested: str = "auto", *, native_bf16: bool, deterministic: bool = False,
                   limit_seconds: float = math.inf, clock: Callable[[], float] = time.perf_counter) -> KernelChoice:
    """Time `step` in each precision and layout and keep the fastest that is allowed: `requested` fp32 or bf16 is
    the only precision allowed, auto allows bf16 where this CPU has it natively and the run need not be
    deterministic; both layouts are always allowed. Precisions not allowed are timed too (one step, for the
    record and the forced-bf16 note), unless the CPU's bf16 is switched off (CIFARBENCH_CPU_BF16=0)."""
    start = clock()
    allowed = {"fp32": requested in ("auto", "fp32"),
               "bf16": requested == "bf16" or (requested == "auto" and native_bf16 and not deterministic)}
    choice = KernelChoice(precision="fp32" if allowed["fp32"] else "bf16", channels_last=True, requested=requested,
                          native_bf16=native_bf16)
    if not allowed["bf16"]:
        choice.not_chosen["bf16"] = ("deterministic runs train in fp32" if deterministic and requested == "auto"
                                     else "no native bf16 on this CPU" if requested == "auto" else "fp32 was asked for")
    if not allowed["fp32"]:
        choice.not_chosen["fp32"] = "bf16 was asked for"
    # Where bf16 was forced off to simulate a CPU without it, the simulation must not pay for its slow steps.
    skip_bf16 = os.environ.get(CPU_BF16_ENV, "").strip() == "0" and not allowed["bf16"]
    per_image: dict[str, float] = {}  # the fastest step per image of each candidate that can be chosen
    best: tuple[float, str] | None = None  # (seconds per image of the fastest allowed step, its candidate)
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and skip_bf16:
            continue
        for channels_last in (True, False):
            name = candidate(precision, channels_last)
            if clock() - start > limit_seconds:
                choice.not_chosen[name] = f"not timed: the probe's {limit_seconds:.1f} s for kernels were spent"
                continue
            dtype = torch.bfloat16 if precision == "bf16" else None
            try:
                t = clock()
                step(SCOUT_BATCH, dtype, channels_last)  # builds its kernels: timed only to abandon a slow one
                seconds = (clock() - t) / SCOUT_BATCH  # per image, from here on
                slow = best is not None and seconds > ABANDON * best[0]
                if allowed[precision] and not slow:
                    step(CHECK_BATCH, dtype, channels_last)  # untimed: the kernels for this batch
                    t = clock()
                    step(CHECK_BATCH, dtype, channels_last)
                    seconds = per_image[name] = min(seconds, (clock() - t) / CHECK_BATCH)
            except Exception as error:  # noqa: BLE001 - e.g. a model that cannot take channels-last
                choice.not_chosen[name] = f"failed: {type(error).__name__}"
                continue
            choice.images_per_second[name] = 1 / max(seconds, 1e-12)
            if allowed[precision] and (best is None or seconds < best[0]):
                best = (seconds, name)
            if not allowed[precision] or slow:
                break  # one step of a precision that cannot win says enough: its other layout is not timed
    # The finalists take their other steps in alternated rounds, so that a machine whose load changes while it
    # is measured does not favour whichever was timed in the quiet moment (beside a busy training, it did).
    for _ in range(KERNEL_STEPS - 1):
        for name in per_image:
            if clock() - start > limit_seconds:
                break
            precision, layout = name.split()
            t = clock()
            step(CHECK_BATCH, torch.bfloat16 if precision == "bf16" else None, layout == "channels-last")
            per_image[name] = min(per_image[name], (clock() - t) / CHECK_BATCH)
            choice.images_per_second[name] = 1 / max(per_image[name], 1e-12)
    if per_image:
        fastest = min(per_image, key=per_image.get)
        best = (per_image[fastest], fastest)
    if best is not None:
        choice.precision, layout = best[1].split()
        choice.channels_last = layout == "channels-last"
    choice.seconds = clock() - start
    return choice


@dataclass(kw_only=True)
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
    """Threads of other processes ready to run when the probe started (Linux): the thread count timed against one
    thread is the cores they leave, or all of them where they leave one."""
    load_average: float | None = None
    """The 1-minute load average when the probe started (a competitor that has run for a while)."""
    kernels: KernelChoice | None = None
    """The precision and layout chosen, with the rates measured."""
    most_threads: int = 1
    """The most threads the run may use (torch's count when the probe started)."""

    def to_dict(self) -> dict:
        return asdict(self)


def reference_model() -> nn.Module:
    """The reference net: speedrun 32-64-256, SiLU (what the CPU_SPEEDRUN rows are keyed by)."""
    from cifarbench.models import build_model

    return build_model("speedrun", num_classes=10, in_shape=(3, 32, 32),
                       kwargs={"widths": [32, 64, 256], "act": "silu"})


def training_steps(model: nn.Module, in_shape: tuple[int, ...] = (3, 32, 32), classes: int = 10) -> Step:
    """Plain SGD training steps of `model` on random batches, in a given autocast dtype and layout."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    layout = {"channels_last": None}

    def step(batch: int, dtype: torch.dtype | None = torch.bfloat16, channels_last: bool = True) -> None:
        memory = torch.channels_last if channels_last else torch.contiguous_format
        if layout["channels_last"] != channels_last:
            model.to(memory_format=memory)
            layout["channels_last"] = channels_last
        x = torch.randn(batch, *in_shape).contiguous(memory_format=memory)
        y = torch.randint(0, classes, (batch,))
        with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _seconds(step: Callable[[int], None], batch: int, repeat: int) -> float:
    """The fastest of `repeat` timed steps."""
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


def _runnable(path: str) -> int:
    """Threads of the process at /proc/PID `path` that are running or ready to run now."""
    count = 0
    for task in os.listdir(f"{path}/task"):
        try:
            with open(f"{path}/task/{task}/stat") as f:
                count += f.read().rpartition(")")[2].split()[0] == "R"
        except (OSError, IndexError):  # the thread ended meanwhile
            pass
    return count


def others_running(samples: int = 20, interval: float = 0.01) -> int | None:
    """How many threads of other processes were ready to run, the median of `samples` readings of Linux's
    /proc/stat less this process's own runnable threads (None elsewhere). Counted before any multi-thread step,
    which would count its own spinning workers. The load average is recorded, not used: over its minute it still
    counts a run that has just ended."""
    counts = []
    try:
        for _ in range(samples):
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
            # Our own thread-pool workers may still spin after a parallel region: they are not competitors.
            counts.append(max(0, int(line.split()[1]) - max(1, _runnable("/proc/self"))))
            time.sleep(interval)
    except (OSError, StopIteration, ValueError):
        return None
    return sorted(counts)[len(counts) // 2]


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def thread_limit(threads: int, busy: int | None) -> int:
    """The cores `busy` threads of other processes leave, at most `threads` (at least one): the count first tried
    beside them; the measured steps decide between it and the others (probe_throughput, ThreadWatch)."""
    return threads if busy is None else max(1, min(threads, (os.cpu_count() or 1) - busy))


def _threads_running(busy: int) -> str:
    return f"{busy} thread{'' if busy == 1 else 's'} of other processes running"


class ThreadWatch:
    """Re-checks the thread count during a run (at each re-plan). When the threads of other processes change, the
    count becomes the one measured faster beside that competition earlier in the run, else the cores they leave.
    Where they leave a single core, one thread and all of them are then compared on stretches of the run's real
    steps beside the same competition, once per level: the probe times small steps, and beside a 2-thread
    training one thread won those while two threads trained 512-image steps faster
    (docs/cpu-performance.md#threads-on-a-shared-machine). A reading that flickers (2, 3, 2 threads) costs no
    second try."""

    def __init__(self, most: int, read: Callable[[], int | None] | None = None,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 current: Callable[[], int] = torch.get_num_threads):
        self.most = most
        self.read = read or (lambda: others_running(samples=5, interval=0.002))
        self.set_threads, self.current = set_threads, current
        self.busy: int | None = None  # the reading the current count was chosen for
        self._trial: tuple[int, float, int] | None = None  # (count before a try, its step seconds, the reading)
        self._best: dict[int, int] = {}  # per reading compared: the count whose real steps were faster
        self.changes: list[str] = []
        """What changed, in words (recorded in the run's budget report)."""

    def check(self, step: int, step_seconds: float, can_try: bool = True) -> bool:
        """After a stretch of steps that took `step_seconds` each: judge a try, follow a change of competition,
        or (with `can_try`: stretches enough left to judge one) try the other count beside unchanged
        competition. True if the count changed."""
        now = self.current()
        busy = self.read()
        if self._trial is not None:
            before, seconds, level = self._trial
            self._trial = None
            if busy == level:  # only steps timed beside the same competition are compared
                self._best[level] = before if step_seconds > seconds else now
                if self._best[level] != now:
                    self._set(before, step, f"back to {before} (with {now}: {step_seconds:.3f} s a step "
                                            f"against {seconds:.3f} s)")
                    return True
        if busy is None:
            return False
        if busy != self.busy:
            self.busy = busy
            target = self._best.get(busy, thread_limit(self.most, busy))
            if target == now:
                return False
            why = "faster here before" if busy in self._best else "the cores they leave"
            self._set(target, step, f"{now} -> {target} ({_threads_running(busy)}: {why})")
            return True
        if not can_try or self.most == 1 or busy in self._best or thread_limit(self.most, busy) > 1:
            return False
        other = 1 if now > 1 else self.most
        self._trial = (now, step_seconds, busy)
        self._set(other, step, f"{now} -> {other} (trying it: {_threads_running(busy)})")
        return True

    def _set(self, threads: int, step: int, why: str) -> None:
        self.set_threads(threads)
        self.changes.append(f"step {step}: threads {why}")


def probe_throughput(threads: int | None = None, *, requested: str = "auto", deterministic: bool = False,
                     model: Callable[[], nn.Module] | None = None, in_shape: tuple[int, ...] = (3, 32, 32),
                     classes: int = 10, budget: float | None = None) -> Throughput:
    """Choose the precision and layout (`choose_kernels`, on one thread), then the thread count (one, or
    `threads`, default torch's, whichever's small steps are faster; set with torch.set_num_threads), and
    measure training images/s with them. The net timed is `model()` (the reference net by default, what the
    shape rows are keyed by). Beside another process's threads, multi-thread steps can be many times slower
    (libgomp's default spin at each barrier), and then one thread wins."""
    from cifarbench.device import cpu_bf16_native

    start = time.perf_counter()
    factor = throughput_factor()
    native = cpu_bf16_native()
    keep_cpu_memory()
    most = threads or torch.get_num_threads()
    load = load_average()
    busy = others_running()
    # Timed against one thread: the cores the others leave, or all of them where they leave one (with libgomp's
    # short spin, runtime.py, all threads can win there).
    left = thread_limit(most, busy)
    candidate = left if left > 1 else most
    # Even building the net's parameters runs parallel kernels: one thread until the check has chosen.
    torch.set_num_threads(1)
    with torch.random.fork_rng():  # the run's seeded random stream stays as it would be without the probe
        torch.manual_seed(0)
        steps = training_steps((model or reference_model)(), in_shape, classes)
        limit = max(KERNEL_MIN_SECONDS, KERNEL_SHARE * budget) if budget else math.inf
        kernels = choose_kernels(steps, requested, native_bf16=native, deterministic=deterministic,
                                 limit_seconds=limit)
        dtype = torch.bfloat16 if kernels.precision == "bf16" else None

        def step(batch: int) -> None:
            steps(batch, dtype, kernels.channels_last)

        tried, best = {}, 1
        if candidate > 1:
            tried = check_threads(step, candidate)
            best = candidate if tried[str(candidate)] > tried["1"] else 1
        torch.set_num_threads(best)
        rate = PROBE_BATCH / _seconds(step, PROBE_BATCH, PROBE_STEPS)
    return Throughput(images_per_second=rate * factor, threads=best, tried=tried, seconds=time.perf_counter() - start,
                      factor=factor, others_running=busy, load_average=load, kernels=kernels, most_threads=most)
