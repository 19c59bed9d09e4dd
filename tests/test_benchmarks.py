"""Smoke versions of the benchmark scripts: tiny budgets on tiny synthetic data, checking that each runs end to
end and prints the JSON it promises (the real figures come from running them on the q75 copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a fresh interpreter


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CIFARBENCH_DATA"}
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_tune_budget_scores_on_the_validation_split_with_set_changes(tiny_py: Path) -> None:
    # 30 held out: a validation accuracy is a count out of 30, which the 20 test images' 1/20 steps rarely are.
    done = run_benchmark("tune_budget.py", "--budget", "4", "--val-split", "30", "--variant", "recipe",
                         "w32-64-128 b512", "--set", "tta=0", "--set", "label_smoothing=0.1",
                         "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["set"] == {"tta": 0, "label_smoothing": 0.1} and out["val_split"] == 30 and out["budget_seconds"] == 4
    assert [r["variant"] for r in out["results"]] == ["recipe", "w32-64-128 b512"]
    for r in out["results"]:
        assert r["recorded"] == {"tta": 0, "label_smoothing": 0.1}  # as the run recorded its config
        correct = r["val_accuracy"] * 30
        assert correct == pytest.approx(round(correct), abs=1e-9) and r["steps"] >= 1


@pytest.mark.parametrize("args, message", [(["--set", "optimizer.lrr=2"], "unknown config field 'optimizer.lrr'"),
                                           (["--set", "tta"], "expected FIELD=VALUE"),
                                           (["--variant", "nope"], "invalid choice: 'nope'")])
def test_tune_budget_refuses_typos_before_training(args: list[str], message: str, tmp_path: Path) -> None:
    done = run_benchmark("tune_budget.py", *args, "--data-dir", str(tmp_path / "no-data-here"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_ablation_reports_each_change_against_the_full_recipe(tiny_py: Path) -> None:
    done = run_benchmark("ablation.py", "--budget", "3", "--only", "no TTA", "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    full, no_tta = out["results"]
    assert (full["ablation"], no_tta["changes"]) == ("full recipe", {"tta": 0})
    assert no_tta["delta_vs_full"] == pytest.approx(no_tta["test_accuracy_mean"] - full["test_accuracy_mean"])


def test_tta_threshold_scores_plain_full_and_selective_tta_on_the_validation_split(tiny_py: Path) -> None:
    # 0.05 is below any top-class probability over 10 classes (at least 1/10): no image is unsure there.
    done = run_benchmark("tta_threshold.py", "--budget", "3", "--seeds", "1", "--val-split", "20",
                         "--thresholds", "0.05", "0.3", "0.99", "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["results"]
    plain, full, none, low, high = row["evaluations"]
    assert ([e["tta"] for e in row["evaluations"]], [e["threshold"] for e in row["evaluations"]]) == (
        [0, 2, 2, 2, 2], [0.0, 0.0, 0.05, 0.3, 0.99])
    for e in row["evaluations"]:  # counts out of the 20 held-out images, each evaluation timed
        correct = e["val_accuracy"] * 20
        assert correct == pytest.approx(round(correct), abs=1e-9) and e["seconds"] > 0
    # Selective TTA with no image unsure is the plain evaluation.
    assert (none["unsure_val"], none["unsure_train"], none["val_accuracy"]) == (0.0, 0.0, plain["val_accuracy"])
    # A higher threshold leaves at least as many images unsure.
    assert low["unsure_val"] <= high["unsure_val"] and low["unsure_train"] <= high["unsure_train"]


def test_cpu_budget_reports_accuracy_seconds_and_compute_over_seeds(tiny_py: Path) -> None:
    done = run_benchmark("cpu_budget.py", "--budgets", "3", "--seeds", "2", "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert f"{os.cpu_count()} logical CPUs" in out["cpu"]
    (row,) = out["results"]
    runs = row["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and row["budget_seconds"] == 3
    assert row["test_accuracy_mean"] == pytest.approx(sum(r["test_accuracy"] for r in runs) / 2)
    assert all(r["train_pflops"] > 0 and r["steps"] >= 1 for r in runs)
    assert row["train_pflops_mean"] == pytest.approx(sum(r["train_pflops"] for r in runs) / 2)


def test_throughput_reports_images_and_flops_per_second() -> None:
    done = run_benchmark("throughput.py", "--models", "fnn", "--steps", "1", "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    (row,) = out["results"]
    assert row["flops_per_image"] == 2 * (3072 * 128 + 128 * 10)
    flops = row["flops_per_image"]
    assert row["train_tflops_per_second"] == pytest.approx(3 * flops * row["train_images_per_second"] / 1e12)
    assert row["inference_tflops_per_second"] == pytest.approx(flops * row["inference_images_per_second"] / 1e12)


def test_weight_grad_alternates_both_kernels_on_the_last_block() -> None:
    done = run_benchmark("weight_grad.py", "--widths", "8,16,32", "--batch-size", "8", "--rounds", "2", "--steps", "1")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["switched_convs"] == 2 and len(out["per_round_ratio"]) == 2
    assert out["ratio"] == pytest.approx(out["matmul_step_ms"] / out["onednn_step_ms"])


def test_same_budget_compares_three_recipes_and_writes_the_docs_table(tiny_py: Path, tmp_path: Path) -> None:
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\n<!-- same-budget:start -->\nold table\n<!-- same-budget:end -->\n\nafter\n")
    done = run_benchmark("same_budget.py", "--budgets", "3", "--data-dir", str(tiny_py), "--docs", str(docs))
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["results"]
    acc = {r["recipe"]: r["test_accuracy_mean"] for r in row["recipes"]}
    assert list(acc) == ["fast", "airbench94", "seed"]
    assert row["fast_minus_airbench94"] == pytest.approx(acc["fast"] - acc["airbench94"])
    assert row["fast_minus_cnn"] == pytest.approx(acc["fast"] - acc["seed"])
    airbench = row["recipes"][1]["runs"][0]
    assert airbench["widths"] == [64, 256, 256] and airbench["batch"] == 1024
    text = docs.read_text()
    assert "old table" not in text and "| 3 s |" in text and text.endswith("after\n")


def test_under_load_runs_alone_beside_a_busy_loop_and_beside_a_cnn_training(tiny_py: Path, tmp_path: Path) -> None:
    docs = tmp_path / "results.md"
    done = run_benchmark("under_load.py", "--budgets", "3", "--beside", "busy", "cnn", "--settle", "3",
                         "--competitor-env", "GOMP_SPINCOUNT=300000", "--data-dir", str(tiny_py), "--docs", str(docs))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    busy, cnn = out["results"]
    assert cnn["competitor_env"] == {"GOMP_SPINCOUNT": "300000"}
    assert (busy["beside"], cnn["beside"], out["beside"]) == ("busy", "cnn", ["busy", "cnn"])
    assert busy["idle"] == cnn["idle"]  # one idle run per budget, compared with each competitor
    assert cnn["loaded"]["competitor_ran_throughout"] is True
    ratio = cnn["loaded"]["steps"] / cnn["idle"]["steps"]
    assert cnn["steps_ratio"] == pytest.approx(ratio)
    assert cnn["bar"] == (ratio >= 0.4 and cnn["within"])
    assert cnn["loaded"]["precision"] in ("fp32 channels-last", "fp32 contiguous", "bf16 channels-last",
                                          "bf16 contiguous")
    assert busy["steps_ratio"] == pytest.approx(busy["loaded"]["steps"] / busy["idle"]["steps"])
    assert busy["wall_over_budget"] == pytest.approx(busy["loaded"]["used_seconds"] / 3)
    assert busy["loaded"]["probe"]["images_per_second"] > 0 and busy["idle"]["steps"] >= 1
    text = docs.read_text()
    assert "<!-- under-load-beside-cnn:start -->" in text and "| 3 s | cnn |" in text


def test_openmp_spin_times_each_spin_and_thread_count_alone_and_beside_a_cnn_training(tiny_py: Path) -> None:
    done = run_benchmark("openmp_spin.py", "--spins", "10000", "300000", "--competitor-spins", "300000",
                         "--threads", "1", "--batch", "8", "--seconds", "0.2", "--rounds", "1", "--settle", "2",
                         "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr
    rates = json.loads(done.stdout)["images_per_second"]
    assert list(rates) == ["alone", "beside cnn (its spin 300000)"]
    for phase in rates.values():
        assert set(phase) == {"10000", "300000"}
        assert all(len(r["1"]) == 1 and r["1"][0] > 0 for r in phase.values())


def test_grade_isolation_times_the_same_inbox_in_process_and_boxed(tiny_py: Path) -> None:
    done = run_benchmark("grade_isolation.py", "--bundles", "2", "--trainings", "1", "--model", "fnn",
                         "--batch-size", "50", "--data-dir", str(tiny_py), "--no-verify")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    grading = out["grading"]
    assert out["bundles"] == 2 and grading["in-process"]["graded"] == 2 and grading["process"]["graded"] == 2
    assert "overhead_per_bundle_s" in grading["process"]
    assert "seconds" in grading["bubblewrap"] or "bubblewrap" in grading["bubblewrap"]["error"]


def test_own_model_speed_sets_the_notebook_cnn_as_a_file_model_beside_the_registered_one() -> None:
    done = run_benchmark("own_model_speed.py", "--steps", "1", "--rounds", "1", "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["benchmark"] == "own_model_speed" and out["cpu"] and out["capability"]
    own, builtin = out["results"]
    assert own["model"].endswith("notebook_models.py:CNNModel") and builtin["model"] == "cnn"
    assert own["params"] == builtin["params"] and own["flops_per_image"] == builtin["flops_per_image"]
    # The notebook's `.view` cannot take channels-last: before and after, it trains in the standard layout.
    assert own["before"]["trains_in"] == "fp32 contiguous" and own["after"]["trains_in"].endswith("contiguous")
    assert builtin["before"]["trains_in"] == "fp32 channels-last"
    for r in (own, builtin):
        assert r["after"]["trains_in"] == r["choice"]["chosen"]
        assert r["speedup"] == pytest.approx(r["after"]["images_per_second"] / r["before"]["images_per_second"],
                                             rel=0.01)


def test_ray_overhead_times_both_executors_in_one_process(tiny_py: Path) -> None:
    pytest.importorskip("ray")
    done = run_benchmark("ray_overhead.py", "--seeds", "2", "--data-dir", str(tiny_py))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["same_per_seed_accuracy"] is True and len(out["local_wall_seconds"]) == 2
    assert out["ray_over_local"] == pytest.approx(out["ray_wall_seconds"] / (sum(out["local_wall_seconds"]) / 2))
