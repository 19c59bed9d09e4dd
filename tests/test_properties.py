"""Property tests (Hypothesis): any config value and any `train` argument is either accepted as a valid config or
refused with one line naming what was wrong; nothing else escapes, and nothing is written outside the runs folder.

Examples are derandomised (the same ones every run, so CI is reproducible) and capped to keep the file fast.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import cifarbench.running
from cifarbench.cli import main
from cifarbench.config import TrainConfig
from cifarbench.errors import CifarbenchError
from cifarbench.models import create_model
from cifarbench.runs.records import RunRecord
from conftest import write_python_layout

PROPERTY = settings(derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def dotted_fields(config: Any, prefix: str = "") -> list[str]:
    """Every field of a config, nested ones by dotted name (optimizer.lr)."""
    names = []
    for f in fields(config):
        value = getattr(config, f.name)
        names += dotted_fields(value, f"{prefix}{f.name}.") if is_dataclass(value) else [prefix + f.name]
    return names


FIELDS = [*dotted_fields(TrainConfig(model="cnn")), "model_kwargs.widths", "model_kwargs.act"]

AWKWARD_STRINGS = ["", "../x", "../../x", "/etc/passwd", "a\0b", "a\nb", "é", "\u2028", "nan", "NaN", "1e999",
                   "cuda:0", "cuda:", "muon", "adam", "triangle", "bf16", "mnist", "speedrun", "x" * 5000]
SCALARS = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 8, 9, 2**31 - 1, 2**31, 2**53 + 1, 2**63, 10**40]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.5, 1.0, 1e-300, 1e300]),
    st.booleans(), st.none(), st.text(max_size=20), st.sampled_from(AWKWARD_STRINGS))
PLAUSIBLE = st.one_of(st.integers(0, 10), st.floats(0, 2), st.sampled_from(["cpu", "cuda:1", "sgd", "adamw", "triangle",
                                                                           "silu", "cifar10", "bf16", "cnn"]))
VALUES = PLAUSIBLE | st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)


def assert_plain_and_typed(config: TrainConfig) -> None:
    """What every accepted config must be, checked apart from the validation code: JSON without NaN, and each
    field of its default's type (no bool for an int, no float for an epoch count), numbers finite."""
    json.dumps(config.to_dict(), allow_nan=False)
    default = TrainConfig(model="cnn")
    for name in dotted_fields(default):
        value, expected = field_value(config, name), field_value(default, name)
        optional = {"budget_seconds": 1.0, "data.data_dir": "", "data.permute_pixels": 0}  # fields that default to None
        if name in optional:
            expected = optional[name]
            if value is None:
                continue
        assert type(value) is type(expected), (name, value)
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
        if isinstance(value, int) and not isinstance(value, bool):
            assert value >= 0, (name, value)  # no int field of a config is negative


def field_value(config: TrainConfig, dotted: str) -> Any:
    if dotted.startswith("model_kwargs."):
        return config.model_kwargs[dotted.partition(".")[2]]
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


@settings(PROPERTY, max_examples=400)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_of_any_field_is_accepted_valid_or_refused_naming_the_field(field: str, value: Any) -> None:
    try:
        config = TrainConfig(model="cnn").with_changes({field: value})
    except CifarbenchError as exc:
        assert field in str(exc) and "\n" not in str(exc), str(exc)
        event("refused")
        return
    event("accepted")
    # Accepted: the config is plain JSON (no NaN) and every field passes its check again when reloaded.
    assert_plain_and_typed(config)
    stored = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert TrainConfig.from_dict(stored) == config
    if isinstance(value, (bool, int, float, str)) or value is None:
        assert field_value(config, field) == value


def snapshot(root: Path, skip: set[Path]) -> dict[str, int]:
    """Every path under `root` (outside `skip`) with its size: what must not change while a command runs."""
    seen = {}
    for path in root.rglob("*"):
        if not any(path == s or s in path.parents for s in skip):
            seen[str(path.relative_to(root))] = path.stat().st_size if path.is_file() else -1
    return seen


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse refuses a flag by exiting
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean_outcome(status: int, err: str, *, parser_refusal_ok: bool = True) -> None:
    """Status 0, or 1 with exactly one error line on stderr and no traceback."""
    assert status in (0, 1), (status, err)
    assert "Traceback" not in err
    if status == 1:
        assert err.count("\n") == 1 and err.endswith("\n"), err
        # argparse's own refusals come from the subcommand's parser, "cifarbench train: error: ..."
        prefixes = ("cifarbench: error: ",)
        assert err.startswith(prefixes), err


def flag_texts(*good: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*good, *AWKWARD_STRINGS, "0", "-1", "1.5", "inf", "-inf", "1e400", "9" * 30,
                                      "4097", "8,8", "0,8", "8,,8", "1," * 9 + "1"]),
                     st.text(max_size=12), st.integers(min_value=-(2**65), max_value=2**65).map(str),
                     st.floats().map(repr))


FLAGS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--epochs", "--batch-size", "--seed", "--low-res", "--val-split"]),
              flag_texts("1", "2")),
    st.tuples(st.sampled_from(["--lr", "--budget"]), flag_texts("0.05", "5")),
    st.tuples(st.just("--widths"), flag_texts("8,8", "8,16,16")),
    st.tuples(st.just("--set"), st.tuples(st.sampled_from(FIELDS), flag_texts("1", "true", "[8, 8]")).map("=".join)),
), max_size=3).map(lambda pairs: [f"{flag}={text}" for flag, text in pairs])


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_python_layout(tmp_path / "data")


@settings(PROPERTY, max_examples=150)
@given(model=st.sampled_from(["cnn", "fnn", "speedrun"]), flags=FLAGS)
@example(model="cnn", flags=['--set=seed="../../x"'])  # the attacks this file was written against
@example(model="cnn", flags=["--seed=99999999999999999999"])
@example(model="cnn", flags=["--lr=nan"])
@example(model="speedrun", flags=["--budget=nan"])
@example(model="cnn", flags=["--set=lookahead.every=0"])
@example(model="cnn", flags=["--set=epochs=1.5"])
@example(model="cnn", flags=["--set=augment.translate=1000"])
@example(model="speedrun", flags=["--widths=0,8"])
@example(model="speedrun", flags=["--set=model_kwargs.widths=[8, true]"])
def test_train_arguments_end_in_a_run_or_one_error_line(model: str, flags: list[str], tiny_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path up to the training call; the call itself records the config (with the model built on the meta
    device, so an argument the model refuses is refused as in a real run) instead of training."""
    recorded: list[TrainConfig] = []

    def record(config: TrainConfig, **_: Any) -> dict[str, Any]:
        with torch.device("meta"):
            create_model(config.model, **config.model_kwargs)
        recorded.append(config)
        return RunRecord(run_id="recorded", model=config.model, recipe=config.recipe, seed=config.seed,
                         epochs=config.epochs, test_accuracy=0.0, test_loss=0.0, train_seconds=0.0, train_flops=0)

    monkeypatch.setattr(cifarbench.running, "train_run", record)
    monkeypatch.chdir(tmp_path)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    runs = work / "a" / "b" / "runs"
    runs.parent.mkdir(parents=True)
    skip = {runs, tmp_path / "cache"}
    before = snapshot(tmp_path, skip)
    status, _, err = run_cli(["train", model, "--data-dir", str(tiny_data), "--no-download", "--no-verify",
                              "--device", "cpu", "--runs-dir", str(runs), "--json", *flags], capsys)
    assert_clean_outcome(status, err)
    event(f"status {status}")
    assert snapshot(tmp_path, skip) == before
    if status == 0:
        (config,) = recorded
        assert_plain_and_typed(config)
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False))) == config


SMALL_FLAGS = st.lists(st.one_of(
    st.tuples(st.just("--epochs"), st.sampled_from(["1", "2", "0", "1.5", "-1", "nan", "", "x", "99999"])),
    st.tuples(st.just("--seed"), st.sampled_from(["0", "7", "../../x", "-1", "9" * 30, "2147483648"])),
    st.tuples(st.just("--lr"), st.sampled_from(["0.05", "nan", "inf", "-1", "0", "1e400"])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["10", "50", "0", "-5", "1e3"])),
    st.tuples(st.just("--set"), st.sampled_from(["seed=\"../../x\"", "seed=3", "optimizer.momentum=0.9",
                                                 "optimizer.momentum=1", "lookahead.every=0", "augment.translate=2",
                                                 "augment.translate=99", "label_smoothing=0.1", "epochs=1.5",
                                                 "epochs=true", "optimizer.lr=NaN", "budget_seconds=Infinity",
                                                 "tta=1", "tta=3", "optimizer.nesterov=true"])),
), max_size=3).map(lambda pairs: [f"{flag}={text}" for flag, text in pairs])


@settings(PROPERTY, max_examples=25)
@given(flags=SMALL_FLAGS)
def test_refused_runs_leave_no_run_folder_and_valid_ones_train(flags: list[str], tiny_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real CLI, training included: a refused config leaves the runs folder with no run in it."""
    monkeypatch.chdir(tmp_path)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    runs = work / "a" / "b" / "runs"
    runs.parent.mkdir(parents=True)
    skip = {runs, tmp_path / "cache"}
    before = snapshot(tmp_path, skip)
    # Few epochs unless the example asks for more (99999 epochs is refused by nothing; it is never trained here).
    argv = ["train", "fnn", "--data-dir", str(tiny_data), "--no-download", "--no-verify", "--device", "cpu",
            "--runs-dir", str(runs), "--json", "--epochs=1", "--batch-size=50",
            *(f for f in flags if f != "--epochs=99999")]
    status, out, err = run_cli(argv, capsys)
    assert_clean_outcome(status, err)
    event("trained" if status == 0 else "refused")
    assert snapshot(tmp_path, skip) == before
    leftovers = {p.name for p in runs.iterdir()} - {"cifarbench.db", "cifarbench.db-wal", "cifarbench.db-shm"} \
        if runs.exists() else set()
    if status == 1:
        assert leftovers == set(), leftovers
        if (runs / "cifarbench.db").exists():
            assert main(["runs", "--runs-dir", str(runs), "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["runs"] == []
    else:
        result = json.loads(out)
        assert leftovers == {result["run_id"]} and (runs / result["run_id"] / "config.json").is_file()
        assert math.isfinite(result["test_loss"])
