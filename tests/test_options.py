"""The one table of run options (cifarbench.options): flags, keywords, resume and docs come from it; errors name
options as parts that each front door spells its own way."""

from __future__ import annotations

import argparse
import ast
import inspect
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

import cifarbench as cb
from cifarbench.cli import _config, build_parser, main
from cifarbench.errors import CifarbenchError, Keyword, as_flag, as_keyword, flag_of, spelled
from cifarbench.options import markdown_table, resume_fixed, run_options

ROOT = Path(__file__).parents[1]
CLI_ONLY = {"-h", "--help", "--tensorboard", "--runs-dir", "--json", "--resume", "--trust-code"}
"""Flags of `train` with no run option behind them: where to store, how to print, what to resume."""


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def test_every_flag_has_a_keyword_and_every_keyword_a_flag() -> None:
    table = {o.flag: o for o in run_options()}
    assert len(table) == len(run_options()) > 15
    commands = _commands()
    train = _flags(commands["train"])
    assert set(train) - CLI_ONLY == set(table)  # train: every run option, and nothing else but CLI_ONLY
    compare = {f for f in _flags(commands["compare"]) if f in table}
    assert compare == {f for f, o in table.items() if not o.option.train_only}
    for flag, option in table.items():
        assert train[flag].dest == option.keyword, flag
        assert flag == flag_of(option.keyword, False if option.negated else ...)
    signatures = {name: inspect.signature(getattr(cb, name)).parameters for name in ("run_config", "train", "compare",
                                                                                      "permutation")}
    keywords = {o.keyword for o in run_options()}
    assert keywords == set(signatures["run_config"]) - {"model"}
    assert keywords <= set(signatures["train"])
    for name in ("compare", "permutation"):
        assert {k for k in keywords if k in signatures[name]} == keywords - {"seed"}, name
    docs = [" ".join(f.__doc__.split()) for f in (cb.run_config, cb.train)]
    for option in run_options():  # help() shows each keyword with its help
        assert all(f"{option.keyword}: " in doc and option.option.help in doc for doc in docs), option.keyword


def _sample(option: Any) -> Any:
    """A valid value for each option that differs from its config default, read from the table."""
    strings = {"recipe": "fast", "data_dir": "somewhere", "device": "cpu", "widths": [8, 16, 16],
               "set": {"optimizer.momentum": 0.5}}
    if option.keyword in strings:
        return strings[option.keyword]
    if option.check.choices:
        return option.check.choices[-1]
    if option.hint is bool:
        return not option.negated
    low = option.check.ge if option.check.ge is not None else option.check.gt or 0
    return option.hint(low + 1)


def _as_text(option: Any, value: Any) -> list[str]:
    if option.hint is bool:
        return [option.flag]
    if option.keyword == "widths":
        return [option.flag, ",".join(map(str, value))]
    if option.keyword == "set":
        return [a for k, v in value.items() for a in (option.flag, f"{k}={v}")]
    return [option.flag, str(value)]


def test_a_flag_and_its_keyword_set_the_same_field() -> None:
    values = {o.keyword: _sample(o) for o in run_options() if o.keyword != "seed"}
    argv = ["train", "cnn", *(a for o in run_options() if o.keyword in values for a in _as_text(o, values[o.keyword]))]
    from_flags = _config(build_parser().parse_args(argv), "cnn", 3)
    from_keywords = cb.run_config("cnn", seed=3, **values)
    assert from_flags == from_keywords
    plain = cb.run_config("cnn", seed=3)
    for option in run_options():
        if option.field is not None and option.keyword != "seed":  # each option set its own field
            section, _, name = option.field.rpartition(".")
            value = getattr(getattr(from_keywords, section) if section else from_keywords, name)
            assert value == values[option.keyword], option.keyword
            assert option.keyword == "device" or value != getattr(getattr(plain, section) if section else plain, name)
    assert from_keywords.model_kwargs["widths"] == [8, 16, 16] and from_keywords.optimizer.momentum == 0.5


def test_run_config_takes_the_train_flags_as_keywords() -> None:
    config = cb.run_config("cnn", deterministic=True, compile=False, sync_bn=False, low_res=0)
    assert config.deterministic and not config.compile and not config.sync_bn and config.low_res == 0
    with pytest.raises(CifarbenchError, match="run_config\\(\\) has no keyword 'no_verify'; pass verify=False"):
        cb.run_config("cnn", no_verify=True)


def test_resume_refuses_exactly_the_options_marked_fixed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert set(resume_fixed()) == {o.keyword for o in run_options()} - {"device", "data_dir", "verify", "download"}
    for option in run_options():
        if option.option.fixed_on_resume:
            value = _sample(option)
            argv = ["train", "--resume", "x", "--runs-dir", str(tmp_path), *_as_text(option, value)]
            assert main(argv) == 1
            assert f"{option.flag} cannot change it" in capsys.readouterr().err, option.keyword


def test_docs_list_every_option_as_the_table_gives_it() -> None:
    docs = (ROOT / "docs" / "options.md").read_text()
    start = "<!-- options:start -->\n"
    table = docs[docs.index(start) + len(start):docs.index("\n<!-- options:end -->")]
    assert table == markdown_table(), "regenerate: python -c 'from cifarbench.options import markdown_table as " \
                                      "t; print(t())' and paste it into docs/options.md"
    readme = (ROOT / "README.md").read_text()
    shared = readme[readme.index("Flags shared by `train` and `compare`"):readme.index("`cifarbench COMMAND --help`")]
    missing = [o.flag for o in run_options() if not o.option.train_only and f"`{o.flag}" not in shared]
    assert not missing, f"README's list of shared flags lacks {missing}"


# --- Errors name options as parts; each front door spells them -----------------------------------------------------

def test_a_keyword_is_spelled_by_each_front_door() -> None:
    cases = [(Keyword("verify", False), "--no-verify", "verify=False"),
             (Keyword("deterministic", True), "--deterministic", "deterministic=True"),
             (Keyword("precision", "fp32"), "--precision fp32", "precision='fp32'"),
             (Keyword("data_dir", ...), "--data-dir", "data_dir=..."),
             (Keyword("val_split"), "--val-split", "val_split"),
             (Keyword("limits.timeout"), "--timeout", "limits=Limits(timeout=...)"),
             (Keyword("bundle_limits.max_bytes"), "--max-bundle-mib", "bundle_limits=BundleLimits(max_bytes=...)")]
    for keyword, flag, python in cases:
        assert (as_flag(keyword), as_keyword(keyword)) == (flag, python)
    error = CifarbenchError("{a} on a CPU needs {b}; {path} stays {{as written}}", a=Keyword("deterministic", True),
                            b=Keyword("precision", "fp32"), path="/tmp/{x}")
    assert str(error) == "deterministic=True on a CPU needs precision='fp32'; /tmp/{x} stays {as written}"
    assert error.spelled(as_flag) == "--deterministic on a CPU needs --precision fp32; /tmp/{x} stays {as written}"
    assert CifarbenchError("a plain {message}").spelled(as_flag) == "a plain {message}"  # no parts: text as given


def test_an_error_keeps_its_parts_across_processes() -> None:
    # compare's workers send their errors back pickled: the caller spells them, not the worker.
    inner = cb.DataError("{path}: not official (pass {option})", path="x", option=Keyword("verify", False))
    outer = pickle.loads(pickle.dumps(CifarbenchError("{cause}; and more", cause=inner)))
    assert type(outer.parts["cause"]) is cb.DataError
    assert spelled(outer, as_flag) == "x: not official (pass --no-verify); and more"
    assert str(outer) == "x: not official (pass verify=False); and more"


def test_an_error_inside_experiment_names_keywords_not_flags(capsys: pytest.CaptureFixture) -> None:
    for name, kwargs, text in [("translation", {"shifts": 40}, "shifts 40: give a largest shift"),
                               ("corruption", {"kinds": ["rain"]}, "kinds: unknown corruption 'rain'"),
                               ("corruption", {"severities": [9]}, "severities must be levels from 1 to 5")]:
        with pytest.raises(CifarbenchError) as caught:
            cb.experiment(name, ["some-run"], **kwargs)
        assert str(caught.value).startswith(text) and "--" not in str(caught.value), str(caught.value)
    assert main(["experiment", "translation", "some-run", "--shifts", "40"]) == 1
    assert "error: --shifts 40: give a largest shift" in capsys.readouterr().err
    with pytest.raises(CifarbenchError) as caught:
        cb.permutation(["fnn"], seeds=0)
    assert str(caught.value) == "seeds must be at least 1"


@pytest.mark.slow
def test_an_error_in_a_compare_worker_is_spelled_by_the_caller(tiny_py: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from cifarbench.comparing import _run_parallel
    from cifarbench.training.recipes import make_config

    good = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=1, batch_size=10, device="cpu")
    bad = replace(good, val_split=10_000)  # more than the training set: refused inside the worker
    runs, failures = _run_parallel([bad], 2, tmp_path / "runs", on_run=None, spelling=as_flag)
    assert not runs and "--val-split 10000 leaves no training data" in failures[0]["error"], failures


_ERRORS = re.compile(r"\w*Error$")


def _flag_in_text(text: str) -> str | None:
    """A `--flag` in message text outside backticks (a `command` in backticks is something to run in a shell)."""
    outside = "".join(part for i, part in enumerate(text.split("`")) if i % 2 == 0)
    found = re.search(r"(?<![\w-])--[a-z][a-z-]*", outside)
    return found.group(0) if found else None


def test_no_error_message_spells_a_flag_as_text() -> None:
    """Only the CLI's own code writes flags; anywhere else an option in a message is a `Keyword` part."""
    offenders = []
    for path in sorted((ROOT / "src" / "cifarbench").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and _ERRORS.match(getattr(node.func, "id", "")
                                                                 or getattr(node.func, "attr", ""))):
                continue
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and _flag_in_text(part.value):
                    offenders.append(f"{path.relative_to(ROOT)}:{part.lineno}: {_flag_in_text(part.value)}")
    assert not offenders, offenders
