"""Learning-rate schedules as a factor of the base rate, a function of training progress in [0, 1]."""

from __future__ import annotations

from cifarbench.config import ScheduleConfig


def lr_factor(schedule: ScheduleConfig, progress: float) -> float:
    """Multiplier of the base learning rate at `progress` (fraction of the planned steps done)."""
    if schedule.kind == "constant":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    if p < schedule.peak:
        return schedule.start + (1.0 - schedule.start) * p / schedule.peak
    return 1.0 + (schedule.end - 1.0) * (p - schedule.peak) / max(1.0 - schedule.peak, 1e-12)
