"""Process-wide settings, applied by the entry points (the CLI, the top-level Python API and the first use of
`cb.<name>`), never at import.

- MKL's strict reproducibility mode (`MKL_CBWR=AUTO,STRICT`): matrix products give the same bits whatever the
  thread count, so a seed trained in a one-thread `compare --jobs` worker matches the same seed trained with
  every core (measured: no slower; docs/distributed.md). MKL reads it at its first call, so it must be set
  before any work; a user's own setting wins.
- libgomp's spin at a barrier (`GOMP_SPINCOUNT=10000`, down from its 300,000 rounds): beside another process's
  threads, torch's waiting threads spun on the cores the others needed (measured alone and beside a training:
  docs/cpu-performance.md#libgomps-spin). libgomp reads it when torch loads, so it counts only where torch is
  not loaded yet (the CLI, and the API's first use when torch was not imported before); a user's own
  `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` wins.
"""

from __future__ import annotations

import os
import time

SPIN_COUNT = "10000"


def process_started() -> float | None:
    """When this process started, as a `time.perf_counter()` value (None where /proc cannot say): a command's
    budget counts its interpreter start, imports and data loading too, so `train --budget 60` ends 60 s after
    it was typed, not 60 s after its training began."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.perf_counter() - age if 0 <= age < 3600 else None


def configure() -> None:
    """Apply the process-wide settings (idempotent)."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
