"""Config values are checked where they are declared, before anything is written: representative refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cifarbench.config import DataConfig, LookaheadConfig, OptimizerConfig, ScheduleConfig, TrainConfig, parse_changes
from cifarbench.errors import CifarbenchError
from cifarbench.models import create_model, list_models
from cifarbench.training.recipes import list_recipes, make_config

BASE = TrainConfig(model="cnn")


def refusal(changes: dict) -> str:
    with pytest.raises(CifarbenchError) as info:
        BASE.with_changes(changes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_nan_learning_rate_is_refused_naming_the_field() -> None:
    assert refusal({"optimizer.lr": math.nan}) == "optimizer.lr must be a finite number in (0, 10000] (got nan)"
    assert "optimizer.lr" in refusal({"optimizer.lr": math.inf})
    assert "optimizer.muon_lr" in refusal({"optimizer.muon_lr": -math.inf})
    assert "budget_seconds" in refusal({"budget_seconds": math.nan})
    with pytest.raises(CifarbenchError, match="optimizer.lr must be a finite number"):
        make_config("cnn").with_changes({"optimizer.lr": float("nan")})  # what --lr nan passes
    with pytest.raises(CifarbenchError, match="budget_seconds"):
        make_config("speedrun", budget_seconds=math.nan)  # refused before the recipe picks a CPU row with it


def test_float_and_bool_epochs_are_refused() -> None:
    assert refusal({"epochs": 1.5}) == "epochs must be an integer in [1, 10000] (got 1.5)"
    assert "epochs" in refusal({"epochs": 3.0})  # integral floats too: an epoch count is written as an int
    assert "epochs" in refusal({"epochs": True})
    assert "augment.translate" in refusal({"augment.translate": False})
    assert BASE.with_changes({"epochs": 3}).epochs == 3


def test_seed_with_path_separators_is_refused() -> None:
    assert refusal({"seed": "../../x"}) == "seed must be an integer in [0, 2147483647] (got '../../x')"
    # The model and recipe names go into the run id as well.
    assert "model" in refusal({"model": "../x"})
    assert "recipe" in refusal({"recipe": "a/b"})


def test_huge_seed_is_refused() -> None:
    assert "seed" in refusal({"seed": 2**63})
    assert "seed" in refusal({"seed": -1})
    assert "an integer of" in refusal({"seed": 10**5000})  # too long for repr: the message still says what it was
    assert BASE.with_changes({"seed": 2**31 - 1}).seed == 2**31 - 1
    with pytest.raises(CifarbenchError, match="seed"):
        make_config("cnn", seed=10**20)  # what --seed passes


def test_lookahead_every_zero_is_refused() -> None:
    assert refusal({"lookahead.every": 0}) == "lookahead.every must be an integer in [1, 10000] (got 0)"
    with pytest.raises(CifarbenchError, match="lookahead.decay_base"):
        LookaheadConfig(decay_base=1.5)


def test_translate_has_an_upper_bound() -> None:
    assert refusal({"augment.translate": 9}) == "augment.translate must be an integer in [0, 8] (got 9)"
    assert BASE.with_changes({"augment.translate": 8}).augment.translate == 8


def test_choices_and_cross_field_rules_name_their_fields() -> None:
    assert "unknown optimizer.name 'lion'" in refusal({"optimizer.name": "lion"})
    for name in ("sgd", "muon", "adam", "adamw"):  # adam and adamw are valid names for the training code
        assert OptimizerConfig(name=name).name == name
    assert "unknown data.dataset" in refusal({"data.dataset": "imagenet"})
    assert "unknown device 'cuda:x'" in refusal({"device": "cuda:x"})
    assert BASE.with_changes({"device": "cuda:1"}).device == "cuda:1"
    assert "optimizer.nesterov needs optimizer.momentum > 0" in refusal({"optimizer.nesterov": True})
    with pytest.raises(CifarbenchError, match="data.mean .* data.std"):
        DataConfig(mean=(0.5,), std=(0.5, 0.5))
    with pytest.raises(CifarbenchError, match="data.std"):
        DataConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(CifarbenchError, match="schedule.peak"):
        ScheduleConfig(peak=1.5)
    assert "data.data_dir" in refusal({"data.data_dir": "a\0b"})
    assert "model_kwargs.w" in refusal({"model_kwargs.w": [math.nan]})
    assert "model_kwargs" in refusal({"model_kwargs": {1: 2}})


def test_values_are_normalised_to_plain_types() -> None:
    np = pytest.importorskip("numpy")
    c = BASE.with_changes({"seed": np.int64(3), "optimizer.lr": 1, "data.mean": [0, 0, 0],
                           "model_kwargs": {"widths": (8, 8)}})
    assert type(c.seed) is int and type(c.optimizer.lr) is float and c.data.mean == (0.0, 0.0, 0.0)
    assert c.model_kwargs == {"widths": [8, 8]}
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_speedrun_widths_are_checked() -> None:
    for widths in ([], [0, 8], [8] * 9, [4097], [8, 8.0], [True, 8], "64", 64, [[8]], None):
        with pytest.raises(CifarbenchError, match=r"model_kwargs\.widths must be a list of 1 to 8 integers"):
            create_model("speedrun", widths=widths)
    with pytest.raises(CifarbenchError, match=r"model_kwargs\.act must be one of: gelu, silu, relu"):
        create_model("speedrun", widths=[8], act=["gelu"])
    with pytest.raises(CifarbenchError, match=r"model_kwargs\.cpu_matmul_weight_grad must be true or false"):
        create_model("speedrun", widths=[8], cpu_matmul_weight_grad="no")
    assert sum(p.numel() for p in create_model("speedrun", widths=(8,)).parameters()) > 0


def test_nan_literal_in_set_is_refused() -> None:
    for text in ("NaN", "Infinity", "-Infinity", "[1, NaN]", '{"widths": [Infinity]}'):
        with pytest.raises(CifarbenchError, match="^--set optimizer.lr=.* is not a finite number$"):
            parse_changes([f"optimizer.lr={text}"])
    with pytest.raises(CifarbenchError, match="model_kwargs: the value is nested too deeply"):
        parse_changes(["model_kwargs=" + "[" * 100_000])
    assert parse_changes(["optimizer.lr=nan"]) == {"optimizer.lr": "nan"}  # not JSON: a string, refused by the field
    assert "optimizer.lr" in refusal(parse_changes(["optimizer.lr=nan"]))


def test_stored_configs_of_every_recipe_still_load() -> None:
    for model in list_models():
        for recipe in list_recipes():
            for overrides in ({}, {"budget_seconds": 30.0}, {"budget_seconds": 600.0}, {"epochs": 2},
                              {"device": "cpu", "dataset": "mnist"}):
                try:
                    config = make_config(model, recipe, **overrides)
                except CifarbenchError:  # airbench94's recipe is for its own net only
                    assert (recipe, model != "speedrun") == ("airbench94", True)
                    continue
                stored = json.loads(json.dumps(config.to_dict(), allow_nan=False))
                assert TrainConfig.from_dict(stored) == config


def test_an_older_stored_config_still_loads() -> None:
    # Written before several fields existed, with lists where tuples are now, and an int learning rate.
    old = {"model": "cnn", "recipe": "seed", "epochs": 10, "batch_size": 100, "seed": 0, "device": "auto",
           "precision": "fp32", "data": {"dataset": "cifar10", "data_dir": None, "verify": True, "mean": [0.5] * 3,
                                         "std": [0.5] * 3, "retired_key": 1},
           "optimizer": {"name": "sgd", "lr": 1, "momentum": 0}, "retired_field": "x"}
    config = TrainConfig.from_dict(old)
    assert config.optimizer.lr == 1.0 and config.data.mean == (0.5, 0.5, 0.5) and config.low_res == 0


def test_a_tampered_stored_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    stored = make_config("cnn").to_dict()
    with pytest.raises(CifarbenchError, match="lookahead.every"):
        TrainConfig.from_dict({**stored, "lookahead": {**stored["lookahead"], "every": 0}})
    with pytest.raises(CifarbenchError, match="optimizer must be an object"):
        TrainConfig.from_dict({**stored, "optimizer": [1]})
    with pytest.raises(CifarbenchError, match="names no model"):
        TrainConfig.from_dict({"seed": 1})


def test_one_sections_changes_are_checked_together() -> None:
    # A 1-channel normalisation needs mean and std changed at once; each alone would be refused.
    c = BASE.with_changes(parse_changes(["data.mean=[0.5]", "data.std=[0.25]"]))
    assert (c.data.mean, c.data.std) == ((0.5,), (0.25,))
    both = parse_changes(['model_kwargs={"widths": [8]}', "model_kwargs.act=silu"])
    assert BASE.with_changes(both).model_kwargs == {"widths": [8], "act": "silu"}


# Refusals that need the CLI or the training API (owned by the lead): they fail today and say what must change.

def _train(tiny_py: Path, tmp_path: Path, *flags: str) -> tuple[int, str, Path]:
    import contextlib
    import io

    from cifarbench.cli import main

    runs = tmp_path / "runs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(["train", "fnn", "--data-dir", str(tiny_py), "--no-download", "--no-verify", "--device",
                           "cpu", "--epochs", "1", "--runs-dir", str(runs), *flags])
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue(), runs


def _run_folders(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def test_argparse_refusals_start_like_every_other_error(tiny_py: Path, tmp_path: Path) -> None:
    status, err, _ = _train(tiny_py, tmp_path, "--epochs", "1.5")
    assert status == 1 and err.startswith("cifarbench: error: ") and err.count("\n") == 1


def test_a_val_split_without_training_data_is_refused_before_the_run_is_recorded(tiny_py: Path,
                                                                                  tmp_path: Path) -> None:
    status, err, runs = _train(tiny_py, tmp_path, "--val-split", "100")  # the tiny set has 100 training images
    assert status == 1 and "--val-split" in err
    assert _run_folders(runs) == []


def test_low_res_on_a_fixed_size_model_is_refused_before_the_run_is_recorded(tiny_py: Path, tmp_path: Path) -> None:
    status, err, runs = _train(tiny_py, tmp_path, "--set", "low_res=16")
    assert status == 1 and "low_res" in err
    assert _run_folders(runs) == []


def test_run_config_takes_every_switch_the_train_flags_have() -> None:
    import cifarbench as cb

    config = cb.run_config("cnn", deterministic=True, compile=False, sync_bn=False, low_res=0)
    assert (config.deterministic, config.compile, config.sync_bn, config.low_res) == (True, False, False, 0)
    assert cb.run_config("cnn", low_res=16).low_res == 16
    with pytest.raises(CifarbenchError, match="low_res"):
        cb.run_config("cnn", low_res=-1)
