"""Classify image files with a trained model: decode safely, resize to the model's input, normalise as in training.

Images can also be scored against a labels file: `filename,label` rows, CSV or TSV (see `read_labels`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cifarbench.data.dataset import Split
from cifarbench.data.images import open_image
from cifarbench.data.loader import DeviceSplit
from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import MiB, read_regular_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_LABELS_BYTES = 16 * MiB


def prepare_image(image: Image.Image, in_shape: Sequence[int]) -> np.ndarray:
    """An RGB or grey PIL image -> uint8 (C, H, W) at the model's input size.

    The whole image is resized (no crop), with Lanczos filtering so that large photos are averaged down
    rather than aliased; CIFAR's own images are whole objects in a square frame too.
    """
    channels, height, width = in_shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def load_images(paths: Sequence[str | os.PathLike], in_shape: Sequence[int]) -> np.ndarray:
    """uint8 (N, C, H, W) of the files, each opened safely and resized to `in_shape` (every file is checked before
    any result is used, so a bad one is a one-line error naming it)."""
    return np.stack([prepare_image(open_image(p), in_shape) for p in paths])


def expand_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named: a folder stands for the PNG and JPEG files directly in it, sorted by name."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise CifarbenchError(f"{path} holds no .png, .jpg or .jpeg files")
            files += found
        else:
            files.append(path)
    if not files:
        raise CifarbenchError("no images given")
    return files


def read_labels(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, int]:
    """A labels file: rows `filename,label` separated by commas (CSV) or by tabs (TSV, as a spreadsheet saves
    them), the label a class name (any case) or a class index, with an optional header row `filename,label`.
    Files are named by their name alone (no folder). Returns name -> index."""
    text = read_regular_file(path, MAX_LABELS_BYTES, "labels file", error=CifarbenchError).decode("utf-8-sig",
                                                                                                 "replace")
    delimiter = labels_delimiter(text)
    shape = "`filename,label`" if delimiter == "," else "`filename<TAB>label`"
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    for line, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise CifarbenchError(f"{path}, line {line}: expected {shape} (comma- or tab-separated), got "
                                  f"{len(row)} fields")
        name, label = row[0].strip(), row[1].strip()
        if line == 1 and label.lower() == "label" and "label" not in by_name:
            continue  # the header
        index = by_name.get(label.lower())
        if index is None and label.isdigit() and int(label) < len(classes):
            index = int(label)
        if index is None:
            raise CifarbenchError(f"{path}, line {line}: {label!r} is not one of the model's classes "
                                  f"({', '.join(classes)}) or an index 0-{len(classes) - 1}")
        name = Path(name).name
        if name in labels:
            raise CifarbenchError(f"{path}, line {line}: {name} is labelled twice")
        labels[name] = index
    if not labels:
        raise CifarbenchError(f"{path}: no `filename,label` rows")
    return labels


def labels_delimiter(text: str) -> str:
    """A tab when the file's first non-blank row is two tab-separated fields (a TSV), else a comma: one separator
    per file, so a comma inside a tab-separated file name stays part of the name."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "\t" if len(first.split("\t")) == 2 else ","


def match_labels(images: Sequence[Path], labels: Mapping[str, int], source: str | os.PathLike) -> np.ndarray:
    """Each image's label index, looked up by file name; every image needs one, and every label needs its image
    (a typo on either side would otherwise silently change what is scored)."""
    names = [Path(p).name for p in images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CifarbenchError(f"two images are named {twice[0]}; {source} names files by their name alone")
    missing = [n for n in names if n not in labels]
    if missing:
        raise CifarbenchError(f"{source} has no label for {len(missing)} image(s): {', '.join(missing[:5])}"
                              + (", ..." if len(missing) > 5 else ""))
    extra = sorted(set(labels) - set(names))
    if extra:
        raise CifarbenchError(f"{source} labels {len(extra)} file(s) that are not among the images: "
                              f"{', '.join(extra[:5])}" + (", ..." if len(extra) > 5 else ""))
    return np.array([labels[n] for n in names], dtype=np.int64)


@torch.no_grad()
def classify_files(model: nn.Module, paths: Sequence[str | os.PathLike], *, in_shape: Sequence[int],
                   mean: Sequence[float], std: Sequence[float], classes: Sequence[str], device: torch.device,
                   channels_last: bool = False, top: int = 3, tta: int = 0,
                   tta_threshold: float = 0.0) -> list[dict[str, Any]]:
    """The `top` classes with their probabilities for each file, in the order given.

    Every file is opened (and refused, with a one-line error) before any is classified. `tta` is the test-time
    augmentation the model was evaluated with, and `tta_threshold` its selective-TTA threshold (see
    evaluation.metrics.predict_logits).
    """
    from cifarbench.evaluation.metrics import predict_logits

    images = load_images(paths, in_shape)
    # The training pipeline's own normalisation, so a file sees exactly what a test image saw.
    data = DeviceSplit(Split(images, np.zeros(len(images), dtype=np.int64)), device, mean, std, channels_last)
    model.eval()
    probs = torch.cat([torch.softmax(predict_logits(model, x, tta, tta_threshold).float(), dim=1)
                       for x, _ in data.batches(256)]).cpu()
    k = min(top, len(classes))
    values, indices = probs.topk(k, dim=1)
    return [{"image": str(path), "top": [{"class": classes[int(i)], "index": int(i), "probability": float(v)}
                                         for v, i in zip(vals, idx, strict=True)]}
            for path, vals, idx in zip(paths, values, indices, strict=True)]
