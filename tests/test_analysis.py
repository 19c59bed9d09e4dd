"""Evidence for a comparison: MAC counts, time to a target, mistakes, and the comparison table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cifarbench.config import DataConfig
from cifarbench.data import fit_normalisation
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.analysis import (
    confident_mistakes,
    count_macs,
    model_cost,
    summarise_time_to_target,
    time_to_target,
    training_flops,
)
from cifarbench.evaluation.metrics import EvalResult
from cifarbench.models import create_model
from cifarbench.reporting.tables import comparison_table, history_table, time_to_target_cell
from cifarbench.runs.records import ModelSummary


def test_macs_of_the_notebook_models_by_hand() -> None:
    # FNN: 3072*128 + 128*10. CNN: conv1 30*30*32 outputs of 3*3*3, conv2 13*13*64 of 32*3*3, fc 2304*128, 128*10.
    assert model_cost("fnn", (3, 32, 32)).macs_per_image == 3072 * 128 + 128 * 10
    cnn = model_cost("cnn", (3, 32, 32))
    assert cnn.macs_per_image == 30 * 30 * 32 * 27 + 13 * 13 * 64 * 288 + 2304 * 128 + 128 * 10 == 4_188_800
    assert cnn.flops_per_image == 2 * cnn.macs_per_image and cnn.params == 315_722
    # 1x28x28 (MNIST): 26*26*32*9 + 11*11*64*288 + (64*5*5)*128 + 1280
    assert model_cost("cnn", (1, 28, 28)).macs_per_image == 26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 128 + 1280


def test_macs_count_grouped_convolutions_and_leave_the_model_unhooked() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 5 * 5, 3))
    assert count_macs(model, (4, 5, 5)) == 5 * 5 * 8 * (2 * 9) + 200 * 3
    assert all(not m._forward_hooks for m in model.modules()) and model.training


def test_training_flops_are_three_forward_passes_per_image_at_each_images_size() -> None:
    assert training_flops(create_model("fnn"), (3, 32, 32), 100) == 3 * 2 * (3072 * 128 + 128 * 10) * 100
    # speedrun with widths 8-8-8 fed 20x20 images (progressive resizing), by hand: the 2x2 whitening conv
    # (3 -> 24) gives 19x19; each block: conv1 at the input size, pool, conv2 at the pooled size.
    low = (19 * 19 * 24 * 12 + 19 * 19 * 8 * 24 * 9 + 9 * 9 * 8 * 8 * 9  # whitening, block 1 (19 -> 9)
           + 9 * 9 * 8 * 8 * 9 + 4 * 4 * 8 * 8 * 9  # block 2 (9 -> 4)
           + 4 * 4 * 8 * 8 * 9 + 2 * 2 * 8 * 8 * 9  # block 3 (4 -> 2)
           + 8 * 10)  # head
    full = model_cost("speedrun", (3, 32, 32), model_kwargs={"widths": [8, 8, 8]}).macs_per_image
    both = training_flops(create_model("speedrun", widths=[8, 8, 8]), (3, 32, 32), 10, low_res=20, low_images=4)
    assert both == 3 * 2 * (6 * full + 4 * low)


HISTORY = [{"epoch": 1, "test_accuracy": 0.5, "seconds": 2.0}, {"epoch": 2, "test_accuracy": None, "seconds": 4.0},
           {"epoch": 3, "test_accuracy": 0.91, "seconds": 6.5}, {"epoch": 4, "test_accuracy": 0.89, "seconds": 8.0}]


def test_time_to_target_is_the_first_evaluated_epoch_at_or_over_it() -> None:
    assert time_to_target(HISTORY, 0.9) == {"epoch": 3, "seconds": 6.5}
    assert time_to_target(HISTORY, 0.5) == {"epoch": 1, "seconds": 2.0}  # reaching it exactly counts
    assert time_to_target(HISTORY, 0.95) is None
    assert time_to_target([], 0.1) is None


def test_time_to_target_over_seeds_averages_the_seeds_that_reached_it() -> None:
    faster = [{"epoch": 1, "test_accuracy": 0.6, "seconds": 1.0}, {"epoch": 2, "test_accuracy": 0.92, "seconds": 2.5}]
    never = [{"epoch": 1, "test_accuracy": 0.2, "seconds": 1.0}]
    runs = [{"seed": 0, "run_id": "a", "history": HISTORY}, {"seed": 1, "run_id": "b", "history": faster},
            {"seed": 2, "run_id": "c", "history": never}]
    s = summarise_time_to_target(runs, 0.9)
    assert (s["reached"], s["seeds"], s["epoch_mean"], s["seconds_mean"]) == (2, 3, 2.5, 4.5)
    assert [p["reached"] for p in s["per_seed"]] == [True, True, False] and s["per_seed"][2]["epoch"] is None
    assert time_to_target_cell(s) == "epoch 2.5, 4.5 s (2/3 seeds)"
    none = summarise_time_to_target(runs[2:], 0.9)
    assert none["epoch_mean"] is None and time_to_target_cell(none) == "not reached"


def test_confusion_per_class_and_confident_mistakes() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.99, 0.01]])
    labels = np.array([0, 0, 0, 1])
    counts = torch.bincount(torch.as_tensor(labels * 2 + probs.argmax(1)), minlength=4).view(2, 2)
    ev = EvalResult.from_counts(counts, loss_sum=4.0)
    assert ev.confusion == [[1, 2], [1, 0]] and ev.per_class_accuracy == [1 / 3, 0.0]
    assert ev.accuracy == 1 / 4 and ev.loss == 1.0
    wrong = confident_mistakes(probs, labels, k=2)
    assert [(m["index"], m["true"], m["predicted"]) for m in wrong] == [(3, 1, 0), (1, 0, 1)]
    assert wrong[0]["confidence"] == pytest.approx(0.99)


def result(model: str, time_to_target=None) -> ModelSummary:
    return ModelSummary(model=model, recipe="seed", seeds=[0, 1], test_accuracy_mean=0.5512, test_accuracy_std=0.0042,
                        train_seconds_mean=73.94, train_seconds_std=1.26, params=315_722, flops_per_image=8_377_600,
                        time_to_target=time_to_target, run_ids=[])


def test_comparison_table_is_markdown_with_time_to_target_only_when_asked() -> None:
    plain = comparison_table([result("cnn", time_to_target=None)]).splitlines()
    assert plain[0].startswith("| model") and "time to" not in plain[0] and set(plain[1]) <= {"|", "-"}
    assert "| cnn" in plain[2] and "55.12% ± 0.42" in plain[2] and "8.38 M" in plain[2] and "73.9 ± 1.3" in plain[2]
    ttt = {"target": 0.5, "reached": 1, "seeds": 2, "epoch_mean": 4, "seconds_mean": 30.25}
    lines = comparison_table([result("cnn", time_to_target=ttt), result("fnn", time_to_target={**ttt, "reached": 0})])
    header, _, cnn, fnn = lines.splitlines()
    assert "time to 50% (mean)" in header
    assert "epoch 4, 30.2 s (1/2 seeds)" in cnn and "not reached (0/2 seeds)" in fnn
    assert len({len(line) for line in lines.splitlines()}) == 1  # columns line up


def test_history_table_shows_unevaluated_epochs_as_dashes() -> None:
    table = history_table([{**h, "train_loss": 1.0, "test_loss": None if h["test_accuracy"] is None else 0.5,
                            "eval_seconds": 0.1} for h in HISTORY])
    assert "| 2 " in table and "| -  " in table and "91.00%" in table


def test_normalisation_carries_a_uniform_mean_to_any_channel_count() -> None:
    notebook = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dataset="mnist")
    assert fit_normalisation(notebook, 1).mean == (0.5,) and fit_normalisation(notebook, 1).std == (0.5,)
    assert fit_normalisation(notebook, 3) is notebook
    assert fit_normalisation(DataConfig(mean=(0.5,), std=(0.25,)), 3).std == (0.25,) * 3
    cifar_stats = DataConfig(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), dataset="mnist")
    with pytest.raises(CifarbenchError, match="mnist images have 1"):
        fit_normalisation(cifar_stats, 1)
