"""The model registry: `@register_model` on a factory, then `create_model(name)` and `list_models()`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from cifarbench.errors import CifarbenchError


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
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
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
        raise CifarbenchError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, *, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 **kwargs) -> nn.Module:
    """Build a fresh, randomly initialised model (seed torch first for a reproducible init)."""
    factory = get_model_spec(name).factory
    unknown = sorted(set(kwargs) - set(inspect.signature(factory).parameters))
    if unknown:  # e.g. a typo in --set model_kwargs.NAME: one clear line, not a TypeError
        raise CifarbenchError(f"model {name!r} has no argument {', '.join(map(repr, unknown))}")
    return factory(num_classes=num_classes, in_shape=in_shape, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(ref: str, *, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The one place a model is built from the name a config holds (seed torch first for a reproducible init)."""
    return create_model(ref, num_classes=num_classes, in_shape=tuple(in_shape), **dict(kwargs or {}))
