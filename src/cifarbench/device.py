"""Device choice in one place: every function takes the device as a parameter, CPU always works."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from cifarbench.errors import CifarbenchError, Keyword

if TYPE_CHECKING:
    from cifarbench.config import TrainConfig


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
        raise CifarbenchError("device 'cuda' was requested but no CUDA GPU is available; use {cpu} or auto",
                              cpu=Keyword("device", "cpu"))
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CifarbenchError("device 'mps' was requested but MPS is not available; use {cpu} or auto",
                              cpu=Keyword("device", "cpu"))
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


CPU_BF16_ENV = "CIFARBENCH_CPU_BF16"
"""Set to 0 to treat this CPU as one without native bf16 (simulates an AVX2-only laptop on a machine with AVX-512
bf16 or AMX), or 1 to treat it as one with; read whenever asked, never at import."""


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 kernels worth using (oneDNN's bf16 needs AVX-512 or AMX; on AVX2 alone a bf16
    convolution runs many times slower than fp32: docs/cpu-performance.md#bf16-and-channels-last), unless
    CIFARBENCH_CPU_BF16 says otherwise."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise CifarbenchError(f"{CPU_BF16_ENV} must be 0 or 1 (got {override!r})")
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the config's precision asks for on `device`, or None for plain fp32. `auto` is bf16 on
    CUDA, and on a CPU only where bf16 is native and the run need not be deterministic (a budgeted CPU run
    measures instead and records its choice in the config: training.shape.choose_kernels)."""
    if config.precision == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_bf16_native() and not config.deterministic else None
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if config.precision == "bf16" else None


def synchronize(device: torch.device) -> None:
    """Wait for queued work: wall-clock timing of an asynchronous device (CUDA) is only honest after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` on `device`, or a no-op for None (plain fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextlib.contextmanager
def kernel_choice(deterministic: bool) -> Iterator[None]:
    """Within it, `deterministic` selects thread-count-independent kernels (see TrainConfig.deterministic);
    otherwise the fastest ones are left alone. The choice is undone on exit."""
    if not deterministic:
        yield
        return
    saved = torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    # ATen's own convolution: per-image im2col and MKL products (thread-independent under MKL_CBWR strict,
    # see cifarbench.runtime), images in parallel, weight gradients summed over the batch in order.
    torch.backends.mkldnn.enabled = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


_allocator_tuned = False


def keep_cpu_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default every tensor over 128 KiB is its own mmap, and the kernel zero-fills its pages again on each
    step; keeping them makes CPU training steps faster, mostly in the first epoch (docs/cpu-performance.md#allocator).
    The cost is that the process keeps its peak memory. Process-wide and done once; True if it took effect
    (glibc only, a no-op elsewhere).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # Both are needed (either alone did not help): together they keep step-sized buffers in the heap (32 MiB is
    # the mmap threshold's maximum) and the heap from shrinking.
    _allocator_tuned = bool(mallopt(m_mmap_threshold, ctypes.c_int(32 << 20))
                            and mallopt(m_trim_threshold, ctypes.c_int(1 << 30)))
    return _allocator_tuned
