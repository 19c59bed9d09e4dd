"""The Python API in one place: everything the CLI does, as functions that return typed records.

`import cifarbench as cb` reaches the same names lazily (`cb.train_run`, ...). Every result carries its
provenance: config, seed, dataset fingerprint, code version, device, processor and torch version.
"""

from __future__ import annotations

from cifarbench.comparing import compare, compare_runs
from cifarbench.inference import (
                                  Evaluation,
                                  TrainedModel,
                                  evaluate_checkpoint,
                                  load_trained_model,
                                  predict_images,
                                  predict_test_set,
)
from cifarbench.reporting.report import build_report, report_runs
from cifarbench.running import train_run
from cifarbench.runs.catalog import delete_run, stored_runs
from cifarbench.runs.records import Comparison, ModelSummary, RunRecord
from cifarbench.training.recipes import make_config

__all__ = ["Comparison", "Evaluation", "ModelSummary", "RunRecord", "TrainedModel", "build_report", "compare",
           "compare_runs", "delete_run", "evaluate_checkpoint", "load_trained_model", "make_config",
           "predict_images", "predict_test_set", "report_runs", "stored_runs", "train_run"]
