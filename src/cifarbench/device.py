"""Device choice in one place: every function takes the device as a parameter, CPU always works."""

from __future__ import annotations

import torch

from cifarbench.errors import CifarbenchError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise CifarbenchError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CifarbenchError("device 'mps' was requested but MPS is not available; use --device cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise CifarbenchError(f"unknown device {name!r}; choose one of: auto, cpu, cuda, mps")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CifarbenchError(f"invalid device {name!r}") from None


def describe_device(device: torch.device) -> str:
    """A human name for provenance: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{torch.get_num_threads()} threads"
    return device.type
