"""What produced a result: code version, library versions, host. Computed on demand, never at import."""

from __future__ import annotations

import functools
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


def environment() -> dict[str, str]:
    """Versions that change results: code, torch, python, platform."""
    return {"code_version": code_version(), "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
            "python": platform.python_version(), "platform": platform.platform()}
