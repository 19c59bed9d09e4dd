"""Data sets by name: `load_dataset(DataConfig)` returns an `ImageDataset` of uint8 arrays."""

from __future__ import annotations

from dataclasses import replace

from cifarbench.config import DataConfig
from cifarbench.data.dataset import ImageDataset, Split
from cifarbench.errors import CifarbenchError

DATASETS = ("cifar10", "mnist", "fashion-mnist")
IMAGE_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28)}  # (C, H, W)


def load_dataset(config: DataConfig, *, progress: bool | None = None) -> ImageDataset:
    """Load the data set `config` names, from its folder (downloading and verifying as configured)."""
    if config.dataset == "cifar10":
        from cifarbench.data.cifar10 import load_cifar10

        return load_cifar10(config.data_dir, verify=config.verify, download=config.download, progress=progress)
    if config.dataset in ("mnist", "fashion-mnist"):
        from cifarbench.data.mnist import load_idx_dataset

        return load_idx_dataset(config.dataset, config.data_dir, verify=config.verify, download=config.download,
                                progress=progress)
    raise CifarbenchError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(DATASETS)}")


def fit_normalisation(config: DataConfig, channels: int) -> DataConfig:
    """The config with one mean/std entry per image channel: the one place the rule lives.

    A per-channel mean/std that is the same value for every channel (the notebook's 0.5/0.5) carries over to
    any channel count, so the seed recipe works unchanged on 1-channel MNIST; per-channel statistics of
    another data set (CIFAR-10's, say) do not, and are a user error rather than a silent guess.
    """
    if len(config.mean) == channels:
        return config
    if len(set(config.mean)) == 1 and len(set(config.std)) == 1:
        return replace(config, mean=config.mean[:1] * channels, std=config.std[:1] * channels)
    raise CifarbenchError(f"the recipe normalises {len(config.mean)} channels with per-channel statistics "
                          f"{config.mean}, but {config.dataset} images have {channels}; use a recipe made for "
                          "this data set")


__all__ = ["DATASETS", "IMAGE_SHAPES", "ImageDataset", "Split", "fit_normalisation", "load_dataset"]
