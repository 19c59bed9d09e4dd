"""What produced a result: code version, library versions, host. Computed on demand, never at import."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

import cifarbench


@functools.cache
def code_version() -> str:
    """The git commit of the cifarbench source (with '-dirty' for local edits), else the package version."""
    src = Path(cifarbench.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=src,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return f"{cifarbench.__version__}+g{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return cifarbench.__version__


@functools.cache
def cpu_description() -> str:
    """The processor, its logical CPU count and the vector/matrix units torch's kernels can use: one CPU budget
    buys very different training on different processors (our machines have been AMD with AVX-512 bf16 and
    Intel with AMX), so a CPU result is only comparable with its processor named."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the platform's name is what there is
        pass
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} logical CPUs, torch {torch.backends.cpu.get_cpu_capability()}" + \
        (f", {' '.join(units)}" if units else "")


def environment() -> dict[str, str]:
    """Versions that change results: code, torch, python, platform, processor."""
    return {"code_version": code_version(), "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_description()}
