"""The options of a run, as the front doors offer them: one table, built from the config fields' `Option`s.

`cifarbench train`/`compare` flags (cli.py), the keywords of `cb.run_config`/`train`/`compare` (api.py), the
fields `train --resume` keeps, and docs/options.md are all generated from `run_options()`; an option's flag is
`errors.flag_of(keyword)`, the rule every error message follows too. A new option is one `option=Option(...)`
on its config field (config.py); the two below, which set no single field, are the only ones written here.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import KW_ONLY, MISSING, dataclass, fields, is_dataclass
from typing import Any

from cifarbench.config import Check, Option, TrainConfig, _hints, _range, parse_changes
from cifarbench.errors import CifarbenchError, Keyword, flag_of


@dataclass(frozen=True)
class RunOption:
    """One option of a run: its keyword and flag, the config field it sets, what it accepts, and its help."""

    keyword: str
    _: KW_ONLY
    field: str | None
    """The dotted config field it sets (`optimizer.lr`); None where it sets several (widths, set)."""
    hint: Any
    """The Python type a keyword takes (without the None that leaves the recipe's choice)."""
    check: Check
    option: Option
    negated: bool = False
    """A switch that is on by default: the flag turns it off (`--no-verify`)."""
    parse: Callable[[Any], Any] | None = None
    """From the CLI's text to the keyword's value, where they differ (`--widths 64,256,256`)."""

    @property
    def flag(self) -> str:
        return flag_of(self.keyword, False) if self.negated else flag_of(self.keyword)

    @property
    def argument(self) -> str:
        """The name `recipes.config_for` takes it by: the field's own name for fields of a run and its data,
        else the keyword (optimizer, lr, widths, set)."""
        section, _, name = (self.field or "-.").rpartition(".")
        return name if section in ("", "data") else self.keyword

    @property
    def accepts(self) -> str:
        """What it accepts, in words: `one of: sgd, muon`, `an integer in [1, 10000]`, `true or false`."""
        if self.check.choices is not None:
            return "one of: " + ", ".join(self.check.choices)
        if self.hint is bool:
            return "true or false"
        if self.hint is int:
            return f"an integer{_range(self.check)}"
        if self.hint is float:
            return f"a number{_range(self.check)}"
        if self.field is None:
            return {"widths": "integers (CLI: comma-separated)", "set": "FIELD: value pairs"}[self.keyword]
        return self.check.shown or "a string"


def parse_widths(text: str) -> list[int]:
    """`--widths 64,256,256` as the list `widths=[64, 256, 256]` takes."""
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise CifarbenchError("{option} {text!r}: expected comma-separated integers such as 64,256,256",
                              option=Keyword("widths"), text=text) from None


_EXTRA = (
    RunOption("widths", field=None, hint=list[int], check=Check(), parse=parse_widths,
              option=Option("speedrun block widths, e.g. 64,256,256")),
    RunOption("set", field=None, hint=dict[str, Any], check=Check(), parse=parse_changes, option=Option(
        "set any config field by dotted name, e.g. --set optimizer.muon_lr=0.15 --set tta=0 --set "
        "model_kwargs.act=gelu (values are JSON; repeatable)", metavar="FIELD=VALUE")),
)


@functools.cache
def run_options() -> tuple[RunOption, ...]:
    """Every option of a run, in the config's field order, then widths and set."""
    found = []
    for top in fields(TrainConfig):
        section = typing.get_type_hints(TrainConfig)[top.name]
        pairs = [(f"{top.name}.{f.name}", f, section) for f in fields(section)] if is_dataclass(section) else \
            [(top.name, top, TrainConfig)]
        for dotted, f, owner in pairs:
            option = f.metadata.get("option")
            if option is None:
                continue
            hint = _hints(owner)[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            found.append(RunOption(option.keyword or f.name, field=dotted, hint=hint, check=f.metadata["check"],
                                   option=option, negated=hint is bool and f.default is True))
    found += _EXTRA
    keywords = [o.keyword for o in found]
    assert len(set(keywords)) == len(keywords), keywords  # a programming error: two fields offered as one keyword
    return tuple(found)


def resume_fixed() -> tuple[str, ...]:
    """The keywords `train --resume` refuses: changing them would no longer continue the same run."""
    return tuple(o.keyword for o in run_options() if o.option.fixed_on_resume)


def config_arguments(given: dict[str, Any]) -> dict[str, Any]:
    """Keyword values as `recipes.config_for` takes them (budget -> budget_seconds); None values left out."""
    by_keyword = {o.keyword: o for o in run_options()}
    return {by_keyword[k].argument: v for k, v in given.items() if v is not None}


def parameters(*, seed: bool = True) -> list[inspect.Parameter]:
    """The run options as keyword-only parameters, for a generated signature (tab completion, `help()`)."""
    return [inspect.Parameter(o.keyword, inspect.Parameter.KEYWORD_ONLY, default=o.option.default,
                              annotation=o.hint if o.option.default is not None else o.hint | None)
            for o in run_options() if seed or o.keyword != "seed"]


def keyword_docs(*, seed: bool = True) -> str:
    """One line per keyword for a docstring: its type in words, unit, and help."""
    lines = []
    for o in run_options():
        if seed or o.keyword != "seed":
            unit = f" ({o.option.unit})" if o.option.unit else ""
            lines.append(textwrap.fill(f"{o.keyword}: {o.accepts}{unit}; {o.option.help} [{o.flag}]", width=116,
                                       initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)


def markdown_table() -> str:
    """docs/options.md's table: every option's flag, keyword, config field, what it accepts, and help."""
    rows = ["| flag | keyword | config field | accepts | config default | what it does |",
            "| --- | --- | --- | --- | --- | --- |"]
    for o in run_options():
        flag = f"`{o.flag}{' ' + o.option.metavar if o.option.metavar else ''}`"
        field = f"`{o.field}`" if o.field else ("`model_kwargs.widths`" if o.keyword == "widths" else "any")
        unit = f" ({o.option.unit})" if o.option.unit else ""
        default = _field_default(o.field)
        help_text = o.option.help.replace("|", "\\|") + (" (train only)" if o.option.train_only else "")
        rows.append(f"| {flag} | `{o.keyword}` | {field} | {o.accepts}{unit} | {default} | {help_text} |")
    return "\n".join(rows)


def _field_default(dotted: str | None) -> str:
    if dotted is None:
        return "-"
    owner: Any = TrainConfig
    *sections, name = dotted.split(".")
    for section in sections:
        owner = typing.get_type_hints(owner)[section]
    spec = {f.name: f for f in fields(owner)}[name]
    return "-" if spec.default is MISSING else f"`{spec.default!r}`"
