"""cifarbench: train, compare and understand image classifiers on CIFAR-10.

Importing the package does no work: the public API (`cifarbench.api`) loads on first use, so
`import cifarbench as cb; cb.train(...)` works without importing torch up front.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = ("Comparison", "Evaluation", "ExperimentReport", "Explanation", "ModelSummary", "PermutationReport",
        "RunRecord", "TrainedModel", "build_report", "compare", "compare_configs", "compare_runs", "config",
        "delete_run", "evaluate", "evaluate_checkpoint", "experiment", "explain", "explain_runs", "export_runs",
        "import_runs", "load", "load_trained_model", "make_config", "permutation", "permutation_experiment",
        "predict", "predict_images", "predict_test_set", "report", "report_runs", "run_experiment", "runs",
        "stored_runs", "train", "train_run")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("cifarbench.api"), name)
    raise AttributeError(f"module 'cifarbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
