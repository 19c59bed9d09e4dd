"""Models beyond the registry: `path/to/file.py:Name`, `package.module:Name`, or a class or factory passed from
Python, with the source code that defines them.

A model reference is resolved to a `ModelSource`: how to build it and the code that defines it. The code is
copied into every run folder (`model.py`) and its sha256 recorded, so a run is rebuilt from its own copy, not
from whatever the original file says today. Code that arrives with someone else's run is only executed when
the caller says so (`trusted`); see `load_run_code`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cifarbench.errors import CifarbenchError, Keyword

REFERENCE = re.compile(r"(?P<where>[^\x00\n]{1,1000}):(?P<name>[A-Za-z_][A-Za-z0-9_]*)")
"""`file.py:Name` or `package.module:Name`; registered models are plain names."""
MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_SOURCE_BYTES = 1 << 20
HEADER = ("# Model code captured by cifarbench from {origin}.\n"
          "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n")
"""Prepended to source recovered from a notebook cell: the imports such a cell almost always relies on."""


@dataclass(frozen=True)
class ModelSource:
    """A model that is not in the registry: how to build it now, and the code that defines it."""

    ref: str
    """What the config's `model` holds: `file.py:Name` or `module:Name`."""
    name: str
    factory: Callable[..., Any]
    code: str | None
    """The defining source (the whole file or module, or the class recovered from a notebook); None when it
    cannot be recovered."""
    standalone: bool
    """Whether `code` rebuilds the model on its own, in a fresh process."""

    @property
    def sha256(self) -> str | None:
        return code_sha256(self.code) if self.code is not None else None


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


_LIVE: dict[str, ModelSource] = {}  # ref -> the source resolved in this process (latest)
_CODE: dict[str, tuple[str, str]] = {}  # sha256 -> (code, where it came from): code this process may run
_MODULES: dict[str, types.ModuleType] = {}  # sha256 -> the module that code made


def is_reference(model: str) -> bool:
    return bool(REFERENCE.fullmatch(model))


def label(model: str) -> str:
    """A short name for tables and run ids: `Name` of a reference, the registered name otherwise; a group's
    qualifier stays (`Name (code 1a2b3c4d)` for `__main__:Name (code 1a2b3c4d)`)."""
    match = REFERENCE.fullmatch(model)
    if match:
        return match["name"]
    head, sep, rest = model.rpartition(" (")
    match = REFERENCE.fullmatch(head) if sep and rest.endswith(")") else None
    return match["name"] + sep + rest if match else model


def reference_of(obj: Any) -> str:
    """The reference under which a class or factory passed from Python is recorded: `module:qualname`."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise CifarbenchError(f"model {obj!r} is not an nn.Module subclass or a function that returns one")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise CifarbenchError(f"model {obj.__qualname__} is not an nn.Module subclass")
    if "<locals>" in obj.__qualname__:
        raise CifarbenchError(f"model {obj.__qualname__} is defined inside a function; define it at the top level "
                              "of a module, file or notebook cell")
    if not obj.__module__:
        raise CifarbenchError(f"model {obj.__qualname__}: cannot tell which module defines it")
    ref = f"{obj.__module__}:{obj.__qualname__}"
    _LIVE[ref] = _capture(ref, obj.__qualname__, obj, sys.modules.get(obj.__module__))
    return ref


def resolve(ref: str) -> ModelSource:
    """Load the model a reference names, and capture its code. Errors are one line naming the reference."""
    match = REFERENCE.fullmatch(ref)
    if not match:
        raise CifarbenchError(f"model {ref!r} is neither a registered model nor `file.py:Name` / `module:Name`")
    where, name = match["where"], match["name"]
    if where.endswith(".py") or "/" in where or "\\" in where:
        return _from_file(ref, Path(where), name)
    if not MODULE.fullmatch(where):
        raise CifarbenchError(f"model {ref!r}: {where!r} is not a .py file or a module name")
    if where == "__main__" and ref in _LIVE:  # a class defined in this notebook or script
        found = getattr(sys.modules["__main__"], name, None)
        if found is not None and found is not _LIVE[ref].factory:
            _LIVE[ref] = _capture(ref, name, found, sys.modules["__main__"])  # the cell was run again
        return _LIVE[ref]
    try:
        module = importlib.import_module(where)
    except Exception as exc:  # an ImportError, or whatever the module raises while importing
        raise CifarbenchError(f"model {ref!r}: cannot import {where} ({type(exc).__name__}: {_line(exc)})") from None
    obj = getattr(module, name, None)
    if obj is None:
        raise CifarbenchError(f"model {ref!r}: {where} has no {name}")
    _LIVE[ref] = _capture(ref, name, obj, module)
    return _LIVE[ref]


def _from_file(ref: str, path: Path, name: str) -> ModelSource:
    from cifarbench.fsutil import read_regular_file

    if path.suffix != ".py":
        raise CifarbenchError(f"model {ref!r}: {path} is not a .py file")
    code = read_regular_file(path, MAX_SOURCE_BYTES, "model file", error=CifarbenchError).decode("utf-8", "replace")
    module = run_code(code, str(path))
    factory = getattr(module, name, None)
    if factory is None:
        defined = sorted(k for k, v in vars(module).items() if _buildable(v) and v.__module__ == module.__name__)
        raise CifarbenchError(f"model {ref!r}: {path} defines no {name}"
                              + (f" (it defines: {', '.join(defined)})" if defined else ""))
    _check_buildable(ref, factory)
    source = ModelSource(ref, name, factory, code, True)
    _LIVE[ref] = source
    return source


def _capture(ref: str, name: str, obj: Any, module: types.ModuleType | None) -> ModelSource:
    """The code that defines `obj`: its module's file when it has one, else (a notebook cell) its own source
    with the usual imports, checked to rebuild on its own."""
    _check_buildable(ref, obj)
    code, standalone = None, False
    path = getattr(module, "__file__", None)
    if module is not None and module.__name__ != "__main__" and path and Path(path).suffix == ".py":
        try:
            code, standalone = Path(path).read_text(encoding="utf-8"), True
        except OSError:
            pass
    if code is None:
        source = _source(obj)
        origin = f"{module.__name__ if module else '?'} ({name})"
        code = None if source is None else HEADER.format(origin=origin) + source
        if code is not None:
            try:  # does the captured text stand alone (no names from other cells)?
                standalone = _buildable(getattr(run_code(code, f"<{ref}>"), name.split(".")[-1], None))
            except CifarbenchError:
                standalone = False
    if code is not None:
        _CODE.setdefault(code_sha256(code), (code, ref))
    return ModelSource(ref, name, obj, code, standalone)


def _source(obj: Any) -> str | None:
    """The source text of a class or function, or None when it cannot be found."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return _cell_source(obj) if inspect.isclass(obj) else None


def _cell_source(cls: type) -> str | None:
    """The source of a class defined in a Jupyter cell. Before Python 3.13 `inspect` looks for a class in its
    module's file, and a kernel's `__main__` has none; the class's methods do know their cell (their code's file
    name, whose text IPython keeps in `linecache`), so the class is found there by name and line."""
    import ast
    import linecache

    methods = [f for f in vars(cls).values() if inspect.isfunction(f)]
    for method in methods:
        lines = linecache.getlines(method.__code__.co_filename)
        try:
            tree = ast.parse("".join(lines))
        except (SyntaxError, ValueError):
            continue
        line = method.__code__.co_firstlineno
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__ and node.lineno <= line <= node.end_lineno:
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                return "".join(lines[start - 1:node.end_lineno])
    return None


def _buildable(obj: Any) -> bool:
    return (inspect.isclass(obj) and issubclass(obj, nn.Module)) or inspect.isfunction(obj)


def _check_buildable(ref: str, obj: Any) -> None:
    if not _buildable(obj):
        raise CifarbenchError(f"model {ref!r} is not an nn.Module subclass or a function that returns one")


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def run_code(code: str, origin: str) -> types.ModuleType:
    """Execute model code as a fresh module (once per distinct text) and return the module."""
    sha = code_sha256(code)
    if sha not in _MODULES:
        module = types.ModuleType(f"cifarbench_model_{sha[:16]}")
        module.__file__ = origin
        sys.modules[module.__name__] = module  # dataclasses and pickling look their module up here
        try:
            exec(compile(code, origin, "exec"), module.__dict__)  # noqa: S102 - the caller's own or trusted code
        except Exception as exc:
            del sys.modules[module.__name__]
            raise CifarbenchError(f"model code {origin} failed to run ({type(exc).__name__}: {_line(exc)})") from None
        _MODULES[sha] = module
        _CODE.setdefault(sha, (code, origin))
    return _MODULES[sha]


def factory_for(ref: str, sha256: str | None) -> Callable[..., Any]:
    """What builds model `ref` whose recorded code has `sha256`: the live object when it is still that code,
    else the recorded code (loaded earlier with `load_run_code`), else the reference resolved now."""
    name = label(ref)
    live = _LIVE.get(ref)
    if live is not None and (sha256 is None or live.sha256 == sha256):
        return live.factory
    if sha256 is not None:
        if sha256 not in _CODE:
            raise CifarbenchError(f"the code of model {ref!r} (sha256 {sha256[:12]}...) is not loaded; load it from "
                                  "its run folder")
        code, origin = _CODE[sha256]
        factory = getattr(run_code(code, origin), name, None)
        if factory is None:
            raise CifarbenchError(f"model code {origin} defines no {name}")
        return factory
    return resolve(ref).factory


def load_run_code(folder: Path, ref: str, sha256: str, *, trusted: bool) -> None:
    """Make a run's own copy of its model code (`folder/model.py`) available to build its model.

    Only code this process may run is loaded: the caller's own runs, or others' with `trusted`. The copy must
    be the recorded one (its sha256), so an edited copy is refused too."""
    from cifarbench.fsutil import read_regular_file

    path = folder / "model.py"
    if not trusted:  # before the cache: code loaded for one run is no consent for another that names its sha256
        raise CifarbenchError("refusing to run {path}: model code that came with a run from elsewhere; read it "
                              "first, then pass {option} to run it", path=path, option=Keyword("trust_code", True))
    if sha256 in _CODE:
        return
    code = read_regular_file(path, MAX_SOURCE_BYTES, "model code", error=CifarbenchError).decode("utf-8", "replace")
    if code_sha256(code) != sha256:
        raise CifarbenchError(f"{path} is not the code the run was trained with (sha256 differs from the "
                              f"recorded {sha256[:12]}...)")
    _CODE[sha256] = (code, str(path))


def code_of(sha256: str) -> str | None:
    """The captured code with this sha256, if this process has it."""
    entry = _CODE.get(sha256)
    return entry[0] if entry else None


def call_factory(factory: Callable[..., Any], ref: str, *, num_classes: int, in_shape: tuple[int, int, int],
                 kwargs: dict[str, Any]) -> nn.Module:
    """Build a model: `num_classes` and `in_shape` are passed only where the signature takes them (a class with
    no arguments, like the notebook's, gets none), model_kwargs by name. Errors name the reference."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    reserved = sorted(k for k in kwargs if k in ("num_classes", "in_shape"))
    if reserved:  # they come from the data (and a checkpoint's are checked): never from model_kwargs
        raise CifarbenchError(f"model {ref!r}: model_kwargs may not set {', '.join(reserved)}; it comes from the data")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params and not takes_any)
    if unknown:
        raise CifarbenchError("model {ref!r} has no argument {unknown} (set with {option} model_kwargs.NAME=VALUE)",
                              ref=ref, unknown=", ".join(map(repr, unknown)), option=Keyword("set"))
    given = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_shape", tuple(in_shape))):
        if key in params:
            given.setdefault(key, value)
    try:
        model = factory(**given)
    except CifarbenchError:
        raise
    except Exception as exc:
        raise CifarbenchError(f"model {ref!r}: building it raised {type(exc).__name__}: {_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CifarbenchError(f"model {ref!r} returned {type(model).__name__}, not an nn.Module")
    return model
