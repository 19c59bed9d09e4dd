"""Data sets by name: `load_dataset(DataConfig)` returns an `ImageDataset` of uint8 arrays."""

from __future__ import annotations

from cifarbench.config import DataConfig
from cifarbench.data.dataset import ImageDataset, Split
from cifarbench.errors import CifarbenchError

DATASETS = ("cifar10",)


def load_dataset(config: DataConfig, *, progress: bool | None = None) -> ImageDataset:
    """Load the data set `config` names, from its folder (downloading and verifying as configured)."""
    if config.dataset == "cifar10":
        from cifarbench.data.cifar10 import load_cifar10

        return load_cifar10(config.data_dir, verify=config.verify, download=config.download, progress=progress)
    raise CifarbenchError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "ImageDataset", "Split", "load_dataset"]
