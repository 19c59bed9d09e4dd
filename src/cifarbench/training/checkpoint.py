"""Checkpoints: plain tensors and values only, written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cifarbench.errors import CifarbenchError

FORMAT = "cifarbench-checkpoint-v1"


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CifarbenchError(f"cannot write checkpoint {path}: {exc.strerror or exc}; "
                                  "the previous checkpoint, if any, is unchanged") from None
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing anything from it (weights_only=True, no extra allow-list)."""
    path = Path(path)
    if not path.is_file():
        raise CifarbenchError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle refusals, truncation and zip errors all land here
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        # torch's refusal is a long essay; the line naming the refused global is the one that matters.
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise CifarbenchError(f"{path}: not a loadable cifarbench checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CifarbenchError(f"{path}: not a cifarbench checkpoint")
    return payload
