"""Data sets by name: `load_dataset(DataConfig)` returns an `ImageDataset` of uint8 arrays."""

from __future__ import annotations

from dataclasses import replace

from cifarbench.config import DataConfig
from cifarbench.data.dataset import ImageDataset, Split, permuted_fingerprint
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


def prepare(dataset: ImageDataset, config: DataConfig) -> ImageDataset:
    """The data set as a run of `config` sees it: with `config.permute_pixels`, every train and test image under
    that seed's fixed pixel permutation (the same for every image and channel). Accepts the data set as read or
    as prepared for another config, so one loaded copy serves plain and permuted runs alike."""
    if dataset.permute_pixels == config.permute_pixels:
        return dataset
    base = original(dataset)
    return base if config.permute_pixels is None else _permuted(base, config.permute_pixels)


def original(dataset: ImageDataset) -> ImageDataset:
    """The data set with its images as read (undoing `prepare`'s permutation): what people should look at."""
    return dataset if dataset.permute_pixels is None else _permuted(dataset, dataset.permute_pixels, inverse=True)


def _permuted(dataset: ImageDataset, seed: int, *, inverse: bool = False) -> ImageDataset:
    from cifarbench.data.permutation import inverse_permutation, permute_pixels, pixel_permutation

    permutation = pixel_permutation(seed, dataset.image_shape)
    if inverse:
        permutation = inverse_permutation(permutation)
    train = Split(permute_pixels(dataset.train.images, permutation.numpy()), dataset.train.labels)
    test = Split(permute_pixels(dataset.test.images, permutation.numpy()), dataset.test.labels)
    if inverse:
        return replace(dataset, train=train, test=test, sha256=dataset.base_sha256, permute_pixels=None,
                       base_sha256=None)
    return replace(dataset, train=train, test=test, sha256=permuted_fingerprint(dataset.sha256, seed),
                   permute_pixels=seed, base_sha256=dataset.sha256)


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


__all__ = ["DATASETS", "IMAGE_SHAPES", "ImageDataset", "Split", "fit_normalisation", "load_dataset", "original",
           "prepare"]
