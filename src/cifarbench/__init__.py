"""cifarbench: train, compare and understand image classifiers on CIFAR-10.

Importing the package does no work: the public API (`cifarbench.api`) loads on first use, so
`import cifarbench as cb; cb.train(...)` works without importing torch up front.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# Light, and what a notebook catches: `except cb.DataError`.
from cifarbench.errors import CifarbenchError as CifarbenchError
from cifarbench.errors import DataError as DataError

__version__ = "0.1.0"


def __getattr__(name: str):
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # a submodule (`from cifarbench import runtime`): the import system loads it
    if "cifarbench.api" not in sys.modules:  # first use of the API: its settings, then torch, not before
        importlib.import_module("cifarbench.runtime").configure()
    api = importlib.import_module("cifarbench.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'cifarbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module("cifarbench.api").__all__])
