"""The model registry: `@register_model` on a factory, then `create_model(name)` and `list_models()`."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.models import reference
from cifarbench.models.reference import call_factory


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    default_recipe: str


_REGISTRY: dict[str, ModelSpec] = {}


Factory = Callable[..., nn.Module]


def register_model(name: str, *, default_recipe: str = "seed") -> Callable[[Factory], Factory]:
    """Decorator: make a model factory available under `name` (its docstring's first line describes it)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        old = _REGISTRY.get(name)
        # Running a notebook cell again redefines the same factory: it replaces the old one.
        if old is not None and (old.factory.__module__, old.factory.__qualname__) != (factory.__module__,
                                                                                     factory.__qualname__):
            raise CifarbenchError(f"model {name!r} is already registered by {old.factory.__module__}."
                                  f"{old.factory.__qualname__}")
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(name, factory, doc[0] if doc else "", default_recipe)
        return factory

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name is a user error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    if isinstance(name, str) and (name.endswith(".py") or Path(name).is_file()):
        raise CifarbenchError(f"unknown model {name!r}: a model in a file is named {name}:Name"
                              f"{_module_classes(Path(name))}")
    close = difflib.get_close_matches(str(name), list_models(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise CifarbenchError(f"unknown model {name!r}{hint}; registered: {', '.join(list_models())}; or your own model "
                          "as path/to/file.py:Name")


def _module_classes(path: Path) -> str:
    """', e.g. file.py:MyCNN (its nn.Module classes: MyCNN, Block)', read with `ast` (the file is never run);
    empty when the file cannot be read or parsed."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return ""
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    modules: list[str] = []
    for node in classes:  # in file order, so a subclass of an nn.Module class defined above it counts too
        bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
        if any(b == "Module" or b in modules for b in bases):
            modules.append(node.name)
    names = modules or [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    if not names:
        return ""
    what = "its nn.Module classes" if modules else "what it defines"
    return f", e.g. {path}:{names[-1]} ({what}: {', '.join(names)})"  # the model is usually defined last


def create_model(name: str, *, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 **kwargs) -> nn.Module:
    """Build a fresh, randomly initialised registered model (seed torch first for a reproducible init)."""
    return call_factory(get_model_spec(name).factory, name, num_classes=num_classes, in_shape=in_shape, kwargs=kwargs)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(ref: str, *, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                kwargs: Mapping[str, Any] | None = None, code_sha256: str | None = None) -> nn.Module:
    """The one place a model is built from what a config names: a registered model, or your own model's reference
    (built from the code recorded as `code_sha256` when given; see models/reference.py)."""
    spec = _REGISTRY.get(ref)
    if spec is None and not reference.is_reference(ref):
        get_model_spec(ref)  # the one-line error that lists the registered models
    factory = spec.factory if spec is not None else reference.factory_for(ref, code_sha256)
    return call_factory(factory, ref, num_classes=num_classes, in_shape=tuple(in_shape), kwargs=dict(kwargs or {}))


def check_foreign_model(ref: str, code_sha256: str | None, *, source: str) -> None:
    """The rule for a model named by a run this store did not train (imported, a copied folder, a bundle, a
    checkpoint file): data never names code. Only a registered name, or the run's own code recorded by its sha256
    (its model.py, which `reference.load_run_code` runs only with consent) may be built: never an importable
    callable or a file path, with or without --trust-code."""
    if ref in _REGISTRY and code_sha256 is None:
        return
    if reference.is_reference(ref) and code_sha256 is not None:
        return
    if ref in _REGISTRY:
        asked = f"registered model {ref!r} with code attached (sha256 {code_sha256[:12]}...)"
    elif reference.is_reference(ref):
        asked = f"{ref!r}, an importable callable or file, with no code of its own (no model_sha256)"
    else:
        asked = f"{ref!r}, which is no registered model"
    raise CifarbenchError("{source} came from elsewhere and names model {asked}; refusing to build it: a run from "
                          "elsewhere may name a registered model or bring its own model.py (run with {option})",
                          source=source, asked=asked, option=Keyword("trust_code", True))


MAX_FOREIGN_PARAMS = 200_000_000
MAX_FOREIGN_MACS = 2_000_000_000
"""Bounds on a registered model built from a run from elsewhere (resnet18 is 11 M parameters and 0.56 G
multiply-accumulates per CIFAR image): what a config's widths may ask for stays well short of what would take
memory or hours to score."""


def skeleton(build: Callable[[], nn.Module]) -> nn.Module | None:
    """The model `build` makes, on the meta device: shapes without memory. None when the model's own code cannot
    be built there (it is then built for real, and `load_state_dict` checks)."""
    try:
        with torch.device("meta"):
            return build()
    except CifarbenchError:
        raise
    except Exception:
        return None


def weights_misfit(model: nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """Why `state_dict` cannot load into `model` (a skeleton will do), or None: checked before the model is
    built for real, so a checkpoint that claims a huge input shape or width costs nothing before it is refused."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        return (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + (
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
    wrong = [k for k in expected if expected[k] != given[k]]
    if wrong:
        k = wrong[0]
        return f"{k} has shape {list(given[k])}, the model's is {list(expected[k])}"
    return None


def foreign_cost_excess(model: nn.Module, in_shape: tuple[int, int, int]) -> str | None:
    """Why a registered model from elsewhere is too big to build or score here (MAX_FOREIGN_*), or None."""
    from cifarbench.models.macs import count_macs

    params = sum(p.numel() for p in model.parameters())
    if params > MAX_FOREIGN_PARAMS:
        return f"{params:,} parameters, more than {MAX_FOREIGN_PARAMS:,}"
    try:
        macs = count_macs(model, in_shape)
    except Exception:  # a forward that needs real values: its parameter count is what can be checked
        return None
    if macs > MAX_FOREIGN_MACS:
        return f"{macs:,} multiply-accumulates per image, more than {MAX_FOREIGN_MACS:,}"
    return None


def is_fully_connected(ref: str, code_sha256: str | None = None) -> bool:
    """Whether a model has no convolutions (the notebook trains its fully connected net for fewer epochs)."""
    if ref in _REGISTRY:
        model = create_model(ref)
    else:
        model = build_model(ref, code_sha256=code_sha256)
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
