"""User-facing errors: the CLI prints their message as one line and exits with status 1.

A message names what the user typed, in the caller's own spelling: a flag from the CLI (`--no-verify`), a keyword
from Python (`verify=False`). So a message never spells an option as text; it holds a `Keyword` part and each
front door spells it: `CifarbenchError("{option} leaves no training data", option=Keyword("val_split", 500))`
reads `val_split=500 leaves ...` from `str()` (the Python API's spelling, what a notebook shows) and
`--val-split 500 leaves ...` from `spelled(as_flag)` (what the CLI prints). `flag_of` is the one mapping from a
keyword to its flag; the CLI builds its option flags with it too.
"""

import difflib
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class _Unset(enum.Enum):
    UNSET = "unset"  # an enum member, so a Keyword keeps "no value" through pickling (compare's workers)


UNSET = _Unset.UNSET


@dataclass(frozen=True)
class Keyword:
    """An option named in a message: its Python keyword (`val_split`; `limits.timeout` for a field of the object a
    keyword takes) and, where the message gives one, its value (`Keyword("verify", False)`; `...` for "a value")."""

    name: str
    value: Any = UNSET


OBJECTS = {"limits": "Limits", "bundle_limits": "BundleLimits"}
"""Keywords that take an object: a message names its fields as `limits=Limits(timeout=...)`."""

FLAGS = {"limits.timeout": "--timeout", "limits.memory_mib": "--memory", "bundle_limits.max_bytes": "--max-bundle-mib",
         "bundle_limits.max_members": "--max-bundle-members", "bundle_limits.max_runs": "--max-bundle-runs",
         "params": "--param"}
"""The flags `flag_of`'s rule does not give: the fields of a keyword's object, which the CLI flattens, and `tune`'s
`params` list, one `--param` each."""


def flag_of(name: str, value: Any = UNSET) -> str:
    """The CLI's flag for keyword `name`: `--` and the keyword with dashes (`val_split` -> `--val-split`), `--no-...`
    for a False (`verify=False` -> `--no-verify`), or the flag `FLAGS` gives."""
    if name in FLAGS:
        return FLAGS[name]
    return f"--{'no-' if value is False else ''}{name.replace('_', '-')}"


def as_flag(keyword: Keyword) -> str:
    """The CLI's spelling: `--val-split 500`, `--no-verify`, `--deterministic`, `--data-dir`."""
    flag = flag_of(keyword.name, keyword.value)
    if keyword.value is UNSET or keyword.value is ... or isinstance(keyword.value, bool):
        return flag
    return f"{flag} {keyword.value}"


def as_keyword(keyword: Keyword) -> str:
    """The Python API's spelling: `val_split=500`, `verify=False`, `data_dir=...`, `limits=Limits(timeout=...)`;
    a bare name without a value (`val_split`)."""
    value = "..." if keyword.value is ... else "" if keyword.value is UNSET else repr(keyword.value)
    owner, _, field = keyword.name.rpartition(".")
    if owner in OBJECTS:
        return f"{owner}={OBJECTS[owner]}({field}={value or '...'})"
    return f"{keyword.name}={value}" if value else keyword.name


Spelling = Callable[[Keyword], str]
"""How a front door spells an option: `as_flag` (the CLI) or `as_keyword` (Python)."""


class CifarbenchError(Exception):
    """Something the user can fix (missing data, a bad file, a bad flag); never a bug.

    `message` is plain text, or with `parts` a template whose `{name}` fields they fill: a `Keyword` is spelled
    by the front door, an exception by its own message in the same spelling, anything else formatted as given.
    A template's parts survive pickling (the attributes travel with the exception), so an error raised in a
    worker process is still spelled by the caller."""

    def __init__(self, message: str = "", *args: object, **parts: Any) -> None:
        super().__init__(message, *args)
        self.parts = parts

    def spelled(self, spelling: Spelling) -> str:
        """The message with each option it names spelled by `spelling`."""
        if not self.parts or not self.args or not isinstance(self.args[0], str):
            return super().__str__()
        return self.args[0].format_map({k: spelled(v, spelling) if isinstance(v, BaseException)
                                        else spelling(v) if isinstance(v, Keyword) else v
                                        for k, v in self.parts.items()})

    def __str__(self) -> str:
        return self.spelled(as_keyword)


def spelled(exc: BaseException, spelling: Spelling) -> str:
    """Any exception's message, a CifarbenchError's with its options spelled by `spelling`."""
    return exc.spelled(spelling) if isinstance(exc, CifarbenchError) else str(exc)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) that stopped work with something to say: what was kept and how to go on."""

    def __init__(self, message: str, *, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.message, self.signal_name = message, signal_name


class DataError(CifarbenchError):
    """A data set is missing, fails verification or is malformed."""


class DownloadError(DataError):
    """A download failed, or what arrived is not what was expected."""


def unknown_keyword(name: str, known: Sequence[str], function: str) -> CifarbenchError:
    """The error for a keyword a Python API function does not take, with the likeliest one it meant: a CLI-style
    `no_verify` is `verify=False`, a near miss (`epoch`) the closest name (`epochs`)."""
    if name.startswith("no_") and name[3:] in known:
        hint = f"; pass {name[3:]}=False"
    else:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; it takes: {', '.join(known)}"
    return CifarbenchError(f"{function}() has no keyword {name!r}{hint}")
