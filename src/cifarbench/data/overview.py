"""A first look at a data set, the notebook's opening cells: how many images of each class, and a grid of them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cifarbench.config import DataConfig
from cifarbench.data import load_dataset
from cifarbench.data.dataset import ImageDataset
from cifarbench.errors import CifarbenchError

SPLITS = ("train", "test")


@dataclass(kw_only=True)
class DataOverview:
    """A loaded data set's classes, its images per class in each split, and where it came from."""

    name: str
    classes: list[str]
    counts: dict[str, list[int]]
    """Images per class: {"train": [...], "test": [...]}."""
    info: dict[str, Any]
    """The data set's fingerprint (source, sha256, whether the files are the official ones)."""
    per_class: int = 10
    split: str = "train"
    seed: int = 0
    dataset: ImageDataset | None = field(default=None, repr=False)

    def plot(self, per_class: int | None = None, split: str | None = None, seed: int | None = None):
        """A row of random example images per class (a matplotlib Figure), the notebook's class grids."""
        from cifarbench.reporting.display import inline

        return inline(self._grid(per_class, split, seed))

    def _grid(self, per_class: int | None = None, split: str | None = None, seed: int | None = None):
        from cifarbench.reporting.plots import class_grid_figure

        split = split or self.split
        images = self._split(split)
        per_class = _per_class(self.per_class if per_class is None else per_class, self.counts[split], split)
        return class_grid_figure(images.images, images.labels, self.classes, per_class=per_class,
                                 seed=self.seed if seed is None else seed)

    def _split(self, split: str):
        if split not in SPLITS:
            raise CifarbenchError(f"split must be 'train' or 'test', not {split!r}")
        if self.dataset is None:
            raise CifarbenchError("this overview holds no images (it was read back from JSON)")
        return self.dataset.train if split == "train" else self.dataset.test

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "counts": self.counts, "dataset": self.info}

    def __repr__(self) -> str:
        train, test = sum(self.counts["train"]), sum(self.counts["test"])
        official = "official files" if self.info.get("verified") else "not verified"
        return f"DataOverview({self.name}: {len(self.classes)} classes, {train:,} train / {test:,} test, {official})"

    def _repr_html_(self) -> str:
        from cifarbench.reporting.display import overview_html

        return overview_html(self)


MAX_PER_CLASS = 100
"""The widest grid row: a wider figure passes what matplotlib can draw (2^16 pixels a side) long before memory."""


def _per_class(n: int, counts: Sequence[int] = (), split: str = "train") -> int:
    """`n` images per class, if the grid can show them: at least 1, at most MAX_PER_CLASS and at most the images
    of the smallest (non-empty) class of the split, `counts` being its images per class."""
    if n < 1:
        raise CifarbenchError("--per-class must be at least 1")
    smallest = min((c for c in counts if c), default=MAX_PER_CLASS)
    if n > min(smallest, MAX_PER_CLASS):
        why = (f"the {split} split's smallest class has {smallest:,} images" if smallest < MAX_PER_CLASS
               else f"a grid row shows at most {MAX_PER_CLASS} images")
        raise CifarbenchError(f"--per-class {n} is too many: {why}; choose at most {min(smallest, MAX_PER_CLASS)}")
    return n


def explore(*, dataset: str = "cifar10", data_dir: str | os.PathLike | None = None, verify: bool = True,
            download: bool = True, per_class: int = 10, split: str = "train", seed: int = 0,
            out: str | os.PathLike | None = None, progress: bool | None = None) -> DataOverview:
    """Load a data set and return its overview (`cifarbench explore`); `out` also writes the grid as a PNG."""
    _per_class(per_class)
    if split not in SPLITS:
        raise CifarbenchError(f"split must be 'train' or 'test', not {split!r}")
    ds = load_dataset(DataConfig(dataset=dataset, data_dir=None if data_dir is None else str(data_dir),
                                 verify=verify, download=download), progress=progress)
    counts = {"train": ds.train.class_counts(len(ds.classes)), "test": ds.test.class_counts(len(ds.classes))}
    _per_class(per_class, counts[split], split)
    overview = DataOverview(name=ds.name, classes=list(ds.classes), counts=counts, info=ds.info(), per_class=per_class,
                            split=split, seed=seed, dataset=ds)
    if out is not None:
        from cifarbench.reporting.plots import save_figure

        save_figure(overview._grid(), out)  # written, not shown: the overview's HTML shows it
    return overview
