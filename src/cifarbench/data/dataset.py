"""The in-memory form every data set loader returns: uint8 images (N, C, H, W), int64 labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """One split of a data set, as loaded from disk (no normalisation applied)."""

    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        """How many examples of each class this split holds."""
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True, kw_only=True)
class ImageDataset:
    """A labelled image data set with the provenance a result needs to travel with."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    sha256: str  # of the decoded pixels and labels, so the python and binary layouts agree
    verified: bool  # every file matched the official checksums
    source: str  # the folder it was read from
    layout: str  # "python", "binary", ...
    permute_pixels: int | None = None
    """The seed of the pixel permutation applied to every image (`data.prepare`); None for the images as read."""
    base_sha256: str | None = None
    """With `permute_pixels`: the fingerprint of the images as read (`sha256` is then that of the permuted ones)."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def info(self) -> dict:
        """The fingerprint stored with every run (with the permutation's seed and the unpermuted fingerprint
        when the pixels are permuted)."""
        permuted = {} if self.permute_pixels is None else {"permute_pixels": self.permute_pixels,
                                                            "base_sha256": self.base_sha256}
        return {"name": self.name, "sha256": self.sha256, "verified": self.verified,
                "source": self.source, "layout": self.layout,
                "train_size": len(self.train), "test_size": len(self.test), **permuted}


def fingerprint(train: Split, test: Split) -> str:
    """sha256 over the decoded content: the same data gives the same print whatever file layout held it."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(np.ascontiguousarray(split.images).data)
        h.update(split.labels.astype(np.uint8).data)
    return h.hexdigest()


def permuted_fingerprint(base_sha256: str, seed: int) -> str:
    """The fingerprint of a data set whose pixels were permuted with `seed`: a sha256 of the unpermuted
    fingerprint and the seed (the permutation is a pure function of the seed, so this names the content too)."""
    return hashlib.sha256(f"{base_sha256}+permute_pixels={int(seed)}".encode()).hexdigest()
