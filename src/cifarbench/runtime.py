"""Process-wide settings, applied by the entry points (the CLI, the top-level Python API), never at import.

- MKL's strict reproducibility mode (`MKL_CBWR=AUTO,STRICT`): matrix products give the same bits whatever the
  thread count, so a seed trained in a one-thread `compare --jobs` worker matches the same seed trained with
  every core (measured: no slower; docs/distributed.md). MKL reads it at its first call, so it must be set
  before any work; a user's own setting wins.
"""

from __future__ import annotations

import os


def configure() -> None:
    """Apply the process-wide settings (idempotent)."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
