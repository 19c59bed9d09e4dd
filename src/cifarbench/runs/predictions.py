"""A run's stored test-set predictions: what its final evaluation predicted for each test image, kept in the run
folder (predictions.npz) with the data fingerprint and evaluation settings behind them, so paired statistics
reuse exactly the predictions behind the reported accuracy instead of evaluating again.

The file is data from wherever the run was trained: it is read with `allow_pickle=False` through a bounded
path, and every array is checked (shape, dtype, range) before anything uses it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import atomic_write, check_zip_archive, read_regular_file
from cifarbench.runs.folders import PREDICTIONS

MAX_PREDICTIONS_BYTES = 64 << 20  # 16 bytes per image: room for millions of test images
_FIELDS = {"predicted", "correct", "confidence", "dataset_sha256", "tta", "tta_threshold", "classes"}


@dataclass(frozen=True, kw_only=True)
class StoredPredictions:
    """One run's final test-set evaluation, image by image, in test-set order."""

    predicted: np.ndarray
    """The predicted class of each test image (int64, N)."""
    correct: np.ndarray
    """Whether each prediction matched the label of the copy the run was evaluated on (bool, N)."""
    confidence: np.ndarray
    """The probability the model gave its predicted class (float32, N)."""
    dataset_sha256: str
    """Fingerprint of the data copy (as the run saw it) whose test labels `correct` was scored against."""
    tta: int
    """Test-time augmentation level of the evaluation (0: plain view)."""
    tta_threshold: float
    """Selective TTA's confidence threshold (0: every image got every view)."""
    classes: int

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0

    def rescored(self, labels: np.ndarray) -> StoredPredictions:
        """The same predictions scored against `labels` (a local copy's test labels, same length)."""
        return dataclasses.replace(self, correct=self.predicted == np.asarray(labels))


def write_predictions(run_dir: str | os.PathLike, predicted: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                      *, dataset_sha256: str, tta: int, tta_threshold: float, classes: int) -> Path:
    """Keep a final evaluation's predictions in the run folder, atomically."""
    predicted = np.asarray(predicted, dtype=np.int64)
    arrays = {"predicted": predicted.astype(np.int16 if classes < 2**15 else np.int64),
              "correct": predicted == np.asarray(labels), "confidence": np.asarray(confidence, dtype=np.float32),
              "dataset_sha256": np.array(str(dataset_sha256)), "tta": np.array(int(tta), dtype=np.int64),
              "tta_threshold": np.array(float(tta_threshold)), "classes": np.array(int(classes), dtype=np.int64)}
    return atomic_write(Path(run_dir) / PREDICTIONS, lambda f: np.savez(f, **arrays))


def _declared_bytes(archive: zipfile.ZipFile, member: str) -> int:
    """The bytes an .npy member's header says its array holds (shape x item size)."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # what np.savez writes
            raise ValueError(f".npy format version {version} is not read here")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return math.prod(shape) * dtype.itemsize


def read_predictions(run_dir: str | os.PathLike, *, images: int | None = None) -> StoredPredictions | None:
    """A run's stored predictions, checked; None when the run has none. With `images`, predictions for another
    number of test images are refused. A damaged or malformed file is a one-line error."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file() and not path.is_symlink():
        return None
    what = "stored predictions file"
    payload = read_regular_file(path, MAX_PREDICTIONS_BYTES, what, error=CifarbenchError)
    buffer = io.BytesIO(payload)
    check_zip_archive(buffer, path, max_inflated=4 * MAX_PREDICTIONS_BYTES, max_members=len(_FIELDS) + 1, what=what,
                      error=CifarbenchError)

    def refuse(why: str) -> CifarbenchError:
        return CifarbenchError(f"{path}: not a usable {what} ({why})")

    try:
        with np.load(buffer, allow_pickle=False) as npz:
            if set(npz.files) != _FIELDS:
                raise refuse(f"it holds {sorted(npz.files)}, not {sorted(_FIELDS)}")
            for name in _FIELDS:  # numpy allocates what a header declares: check it against the member first
                if _declared_bytes(npz.zip, f"{name}.npy") > npz.zip.getinfo(f"{name}.npy").file_size:
                    raise refuse(f"{name} declares more data than it holds")
            arrays = {name: npz[name] for name in _FIELDS}
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise refuse(" ".join(str(exc).split())[:200]) from None
    predicted, correct, confidence = arrays["predicted"], arrays["correct"], arrays["confidence"]
    n = len(predicted) if predicted.ndim == 1 else -1
    if n < 0 or predicted.dtype.kind not in "iu" or correct.shape != (n,) or correct.dtype != np.bool_ \
            or confidence.shape != (n,) or confidence.dtype.kind != "f":
        raise refuse("its arrays are not one integer class, one bool and one probability per image")
    scalars = arrays["dataset_sha256"], arrays["tta"], arrays["tta_threshold"], arrays["classes"]
    if any(a.shape != () for a in scalars) or scalars[0].dtype.kind != "U" or scalars[1].dtype.kind not in "iu" \
            or scalars[2].dtype.kind != "f" or scalars[3].dtype.kind not in "iu":
        raise refuse("its fingerprint and evaluation settings are not single values of the right types")
    classes, tta, threshold = int(scalars[3]), int(scalars[1]), float(scalars[2])
    if not 2 <= classes <= 100_000 or tta not in (0, 1, 2) or not 0.0 <= threshold <= 1.0:
        raise refuse(f"classes {classes}, TTA level {tta} or threshold {threshold} is out of range")
    if n and (int(predicted.min()) < 0 or int(predicted.max()) >= classes):
        raise refuse(f"a predicted class is outside 0..{classes - 1}")
    if n and not (np.isfinite(confidence).all() and confidence.min() >= 0 and confidence.max() <= 1):
        raise refuse("a probability is outside [0, 1]")
    if images is not None and n != images:
        raise refuse(f"it has predictions for {n} images, the test set has {images}")
    return StoredPredictions(predicted=predicted.astype(np.int64), correct=correct,
                             confidence=confidence.astype(np.float32), dataset_sha256=str(scalars[0]), tta=tta,
                             tta_threshold=threshold, classes=classes)
