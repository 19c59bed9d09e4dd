"""Named recipes: a recipe turns a model name into the full `TrainConfig` it is trained with."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from cifarbench.config import DataConfig, OptimizerConfig, TrainConfig
from cifarbench.errors import CifarbenchError
from cifarbench.models import get_model_spec

_RECIPES: dict[str, Callable[[str], TrainConfig]] = {}


def register_recipe(name: str) -> Callable[[Callable[[str], TrainConfig]], Callable[[str], TrainConfig]]:
    def wrap(fn: Callable[[str], TrainConfig]) -> Callable[[str], TrainConfig]:
        _RECIPES[name] = fn
        return fn

    return wrap


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


@register_recipe("seed")
def seed_recipe(model: str) -> TrainConfig:
    """The notebook's training, faithfully: SGD lr 0.01, no momentum or decay, batch 100, no augmentation,
    inputs mapped to [-1, 1], fp32; 5 epochs for the FNN and 10 for everything else, as the notebook ran."""
    return TrainConfig(model=model, recipe="seed", epochs=5 if model == "fnn" else 10, batch_size=100,
                       precision="fp32", data=DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                       optimizer=OptimizerConfig(lr=0.01))


def make_config(model: str, recipe: str | None = None, **overrides) -> TrainConfig:
    """The recipe's config for `model` (the model's default recipe when None), with `overrides` applied.

    `overrides` may name TrainConfig fields, and `data_dir`, `verify`, `download` for the data config.
    None values are ignored, so CLI flags that were not given leave the recipe alone.
    """
    spec = get_model_spec(model)
    name = recipe or spec.default_recipe
    if name not in _RECIPES:
        raise CifarbenchError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
    config = _RECIPES[name](model)
    given = {k: v for k, v in overrides.items() if v is not None}
    data_keys = {"data_dir", "verify", "download"}
    data = replace(config.data, **{k: given.pop(k) for k in list(given) if k in data_keys})
    return replace(config, data=data, **given)
