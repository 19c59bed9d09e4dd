"""User-facing errors: the CLI prints their message as one line and exits with status 1.

A message names what the user typed. Messages are written with the CLI's spelling (`--no-verify`); raised
while Python code is the caller (the default interface), each flag is spelled as the API's keyword instead
(`verify=False`), so a notebook user is never told to pass a flag."""

import contextvars
import difflib
import re
from collections.abc import Sequence

INTERFACE: contextvars.ContextVar[str] = contextvars.ContextVar("cifarbench_interface", default="python")
"""'python' (the library's callers) or 'cli' (set by the command line's entry point)."""

PYTHON_SPELLING = {
    "--no-verify": "verify=False", "--no-download": "download=False", "--trust-code": "trust_code=True",
    "--data-dir": "data_dir=", "--runs-dir": "runs_dir=", "--val-split": "val_split",
    "--budget": "budget", "--epochs": "epochs", "--batch-size": "batch_size", "--lr": "lr", "--seeds": "seeds",
    "--seed": "seed", "--jobs": "jobs", "--target": "target", "--top": "top", "--device": "device",
    "--precision": "precision", "--optimizer": "optimizer", "--deterministic": "deterministic=True",
    "--sync-bn": "sync_bn=True", "--tensorboard": "tensorboard", "--resume": "resume", "--dataset": "dataset",
    "--per-class": "per_class", "--labels": "labels", "--widths": "widths", "--tta": "tta", "--out": "out",
    "--student": "student", "--hidden": "hidden", "--hidden-labels": "hidden_labels", "--work-dir": "work_dir",
    "--retrain": "retrain=True", "--roster": "roster", "--isolation": "isolation",
    "--timeout": "limits=Limits(timeout=)", "--memory": "limits=Limits(memory_mib=)",
    "--max-bundle-mib": "bundle_limits=BundleLimits(max_bytes=)",
    "--max-bundle-members": "bundle_limits=BundleLimits(max_members=)",
    "--max-bundle-runs": "bundle_limits=BundleLimits(max_runs=)",
    "--param": "params", "--trials": "trials", "--study": "study", "--executor": "executor", "--address": "address",
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def python_spelling(message: str) -> str:
    """`message` with each CLI flag it names spelled as the Python API's keyword (a `command` in backticks is
    left as it is: it is something to run in a shell)."""
    parts = message.split("`")
    return "`".join(p if i % 2 else _FLAG.sub(lambda m: PYTHON_SPELLING.get(m.group(0), m.group(0)), p)
                    for i, p in enumerate(parts))


class CifarbenchError(Exception):
    """Something the user can fix (missing data, a bad file, a bad flag); never a bug."""

    def __init__(self, message: str = "", *args: object) -> None:
        if INTERFACE.get() == "python" and isinstance(message, str):
            message = python_spelling(message)
        super().__init__(message, *args)


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
