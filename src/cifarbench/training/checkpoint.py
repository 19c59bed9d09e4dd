"""Checkpoints: written atomically, read with weights_only=True through a bounded path (`checkpoint_file`), and
what a checkpoint holds checked against the schema (`state.validate_payload`) before anyone reads it."""

from __future__ import annotations

import os
from typing import Any

import torch

from cifarbench.training.checkpoint_file import (
    FORMAT,
    MAX_BYTES,
    MAX_INFLATED,
    MAX_MEMBERS,
    read_checkpoint,
    remove_stale_temps,
    save_checkpoint,
)
from cifarbench.training.state import validate_payload

__all__ = ["FORMAT", "MAX_BYTES", "MAX_INFLATED", "MAX_MEMBERS", "load_checkpoint", "remove_stale_temps",
           "save_checkpoint", "validate_checkpoint"]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint without executing anything from it (weights_only=True, no extra
    allow-list), refusing before inflating anything a file that is not a bounded zip archive."""
    return validate_checkpoint(read_checkpoint(path, map_location), path)


def validate_checkpoint(payload: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`payload` if it holds what a run checkpoint must (the schema is `training.state`'s); else one line."""
    return validate_payload(payload, path)
