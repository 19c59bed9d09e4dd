"""Trained models: load one from its checkpoint, then evaluate it, predict the test set or classify image files
(decoded safely, resized to the model's input and normalised exactly as in training)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset, prepare
from cifarbench.data.dataset import Split
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import autocast_dtype, describe_device, kernel_choice, resolve_device
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.metrics import EvalResult, evaluate
from cifarbench.models import build_model
from cifarbench.models.reference import load_run_code
from cifarbench.models.registry import check_foreign_model, foreign_cost_excess, skeleton, weights_misfit
from cifarbench.reporting.progress import say, tta_views
from cifarbench.runs import folders
from cifarbench.runs.store import RunStore
from cifarbench.training.state import RunCheckpoint

MANY_FILES = 50
"""From this many image files on, prediction says what it is doing before it starts."""
_TOLD: set[tuple] = set()  # (run's, copy's) fingerprints already said once in this process


def resolve_checkpoint(ref: str, runs_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """A checkpoint file or run folder the user points at, or a run id (or unique prefix) of the runs folder,
    whose folder is derived from the runs folder and the id, never from a stored path; and whether it is one of
    this store's own runs (trained here, not imported), whose model code is the user's own."""
    path = Path(ref)
    if path.is_dir() and (path / folders.CHECKPOINT).is_file():
        path = path / folders.CHECKPOINT
    if path.is_file():
        own = folders.run_folder(runs_dir, path.parent.name) if folders.RUN_ID.fullmatch(path.parent.name) else None
        if own is None or not (own / folders.CHECKPOINT).exists() or not path.samefile(own / folders.CHECKPOINT):
            return path, False
        with RunStore(runs_dir, read_only=True) as store:
            try:
                return path, store.get_run(path.parent.name).get("origin") is None
            except CifarbenchError:
                return path, False
    with RunStore(runs_dir, read_only=True) as store:
        run = store.get_run(ref)
    return folders.run_folder(runs_dir, run["id"]) / folders.CHECKPOINT, run.get("origin") is None


@dataclass(kw_only=True)
class TrainedModel:
    """A checkpoint's model with its weights loaded, in eval mode on `device`, and what it was trained with."""

    path: Path
    checkpoint: RunCheckpoint
    config: TrainConfig
    model: torch.nn.Module
    device: torch.device
    own: bool = True
    """Trained into this store; False for a run from elsewhere (imported, copied, a checkpoint file), whose
    settings never choose local resources (`DataConfig.for_loading`)."""

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.classes)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.checkpoint.in_shape

    def test_dataset(self, *, data_dir: str | None = None, verify: bool | None = None, download: bool | None = None,
                     dataset: ImageDataset | None = None, progress: bool | None = None) -> ImageDataset:
        """The data set the model was trained on, as the run saw it (its pixels permuted if the run's were):
        `dataset` when given, else read where `DataConfig.for_loading` says. A copy whose fingerprint differs from
        the run's is said in one line."""
        data = self.config.data
        if dataset is None:
            dataset = load_dataset(data.for_loading(foreign=not self.own, data_dir=data_dir, verify=verify,
                                                    download=download), progress=progress)
        seen = prepare(dataset, data)
        recorded = self.checkpoint.dataset.get("sha256")
        if seen.sha256 != recorded and (recorded, seen.sha256) not in _TOLD:
            _TOLD.add((recorded, seen.sha256))
            say(f"note: run {self.checkpoint.run_id} was trained on data with fingerprint {str(recorded)[:12]}..., "
                f"not this copy's ({seen.sha256[:12]}...)", enabled=progress)
        return seen

    def evaluate(self, dataset: ImageDataset, *, keep_probabilities: bool = False) -> EvalResult:
        """The whole test set with the run's own test-time augmentation and kernels, so its figures agree."""
        return self.evaluate_split(dataset.test, len(dataset.classes), keep_probabilities=keep_probabilities)

    def predicted_classes(self, images: np.ndarray, *, tta: int | None = None) -> np.ndarray:
        """The class each uint8 image (at the model's input size) is given, with the run's own test-time
        augmentation or `tta` views (0, 1, 2; selective TTA off). Needs no labels: what a grader's sandbox returns."""
        trained = self if tta is None else replace(self, config=replace(self.config, tta=tta, tta_threshold=0.0))
        result = trained.evaluate_split(Split(images, np.zeros(len(images), dtype=np.int64)), keep_probabilities=True)
        assert result.probabilities is not None
        return result.probabilities.argmax(1).astype(np.int64)

    def evaluate_split(self, split: Split, num_classes: int | None = None, *,
                       keep_probabilities: bool = False) -> EvalResult:
        """Any labelled images (uint8, at the model's input size) scored as the test set is."""
        c = self.config
        data = DeviceSplit(split, self.device, c.data.mean, c.data.std, c.channels_last)
        with kernel_choice(c.deterministic):
            return evaluate(self.model, data, num_classes=num_classes or len(self.classes),
                            batch_size=c.eval_batch_size, autocast_dtype=autocast_dtype(c, self.device), tta=c.tta,
                            tta_threshold=c.tta_threshold, keep_probabilities=keep_probabilities)


def load_trained_model(ref: str, *, runs_dir: str | os.PathLike | None = None, device: str = "auto",
                       trust_code: bool = False) -> TrainedModel:
    """Load a checkpoint (file, run folder or run id) into its model, ready for inference on `device`.

    An own model is rebuilt from the run folder's copy of its code (`model.py`), whatever the original file says
    now; the copy runs only if the run is this store's own or `trust_code` says so."""
    path, own = resolve_checkpoint(ref, runs_dir)
    ckpt = RunCheckpoint.load(path)
    config = TrainConfig.from_dict(ckpt.config)
    if not own:
        source = f"run {ckpt.run_id!r} ({path})"
        if config.model != ckpt.model:
            raise CifarbenchError(f"{source}: its checkpoint names model {ckpt.model!r} but its config "
                                  f"{config.model!r}; refusing a run that does not agree with itself")
        check_foreign_model(ckpt.model, config.model_sha256, source=source)
    if config.model_sha256:
        load_run_code(path.parent, ckpt.model, config.model_sha256, trusted=own or trust_code)

    def build() -> torch.nn.Module:
        return build_model(ckpt.model, num_classes=len(ckpt.classes), in_shape=ckpt.in_shape,
                           kwargs=config.model_kwargs, code_sha256=config.model_sha256)

    shapes = skeleton(build)
    misfit = weights_misfit(shapes, ckpt.state_dict) if shapes is not None else None
    if misfit:
        raise CifarbenchError(f"{path}: weights do not fit model {ckpt.model!r} ({misfit})")
    excess = foreign_cost_excess(shapes, ckpt.in_shape) if shapes is not None and not own and \
        not config.model_sha256 else None
    if excess:
        raise CifarbenchError(f"{path}: model {ckpt.model!r} from elsewhere is too large to build here ({excess})")
    dev = resolve_device(device)
    model = build()
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise CifarbenchError(f"{path}: weights do not fit model {ckpt.model!r} ({str(exc).splitlines()[0]})") from None
    model.to(dev)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return TrainedModel(path=path, checkpoint=ckpt, config=config, model=model, device=dev, own=own)


@dataclass(kw_only=True)
class Evaluation:
    """A saved model scored on a whole test set."""

    checkpoint: str
    run_id: str
    model: str
    classes: list[str]
    tta: int
    tta_threshold: float
    result: EvalResult
    device: str
    dataset: dict
    dataset_matches_training: bool
    probabilities: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def test_accuracy(self) -> float:
        return self.result.accuracy

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("result", "probabilities", "labels")}
        r = self.result
        return {**d, "test_accuracy": r.accuracy, "test_loss": r.loss, "per_class_accuracy": r.per_class_accuracy,
                "confusion": r.confusion, "n": r.n}

    def to_json(self) -> str:
        """`to_dict` as JSON text (what `cifarbench eval --json` prints)."""
        return json.dumps(self.to_dict(), indent=2)

    def plot(self, kind: str = "per_class"):
        """Per-class accuracy as a matplotlib Figure, or `kind="confusion"` for the confusion matrix."""
        from cifarbench.reporting.display import evaluation_figure

        return evaluation_figure(self, kind)

    def __repr__(self) -> str:
        return (f"Evaluation({self.run_id!r}, {self.model}, test {100 * self.test_accuracy:.2f}% of "
                f"{self.result.n:,} images)")

    def _repr_html_(self) -> str:
        from cifarbench.reporting.display import evaluation_html

        return evaluation_html(self)


def evaluate_checkpoint(ref: str, *, runs_dir: str | os.PathLike | None = None, data_dir: str | None = None,
                        verify: bool | None = None, download: bool | None = None, device: str = "auto",
                        dataset: ImageDataset | None = None, progress: bool | None = None,
                        keep_probabilities: bool = False, trust_code: bool = False) -> Evaluation:
    """Evaluate a saved model on the whole test set: accuracy, loss, per-class accuracy, confusion matrix (and,
    with `keep_probabilities`, each test image's class probabilities)."""
    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device, trust_code=trust_code)
    dataset = loaded.test_dataset(data_dir=data_dir, verify=verify, download=download, dataset=dataset,
                                  progress=progress)
    c = loaded.config
    if c.tta:
        say(f"evaluating the test set ({tta_views(c.tta)} TTA views)...", enabled=progress)
    result = loaded.evaluate(dataset, keep_probabilities=keep_probabilities)
    return Evaluation(checkpoint=str(loaded.path), run_id=loaded.checkpoint.run_id, model=loaded.checkpoint.model,
                      classes=loaded.classes, tta=c.tta, tta_threshold=c.tta_threshold, result=result,
                      device=describe_device(loaded.device), dataset=dataset.info(),
                      dataset_matches_training=dataset.sha256 == loaded.checkpoint.dataset["sha256"],
                      probabilities=result.probabilities, labels=dataset.test.labels if keep_probabilities else None)


def predict_test_set(ref: str, **kwargs) -> Evaluation:
    """`evaluate_checkpoint` with per-example probabilities (N, classes) and labels (N,), in test-set order."""
    return evaluate_checkpoint(ref, keep_probabilities=True, **kwargs)


class Predictions(dict):
    """`predict_images`' result: a plain dict (what `cifarbench predict --json` prints) that shows itself as a short
    line, or in a notebook as a table of each image's top classes, instead of its whole contents."""

    def __repr__(self) -> str:
        n = len(self.get("predictions", []))
        return f"Predictions({self.get('run_id')!r}, {self.get('model')}, {n:,} images)"

    def _repr_html_(self) -> str:
        from cifarbench.reporting.display import predictions_html

        return predictions_html(self)


def unfinished_warning(loaded: TrainedModel) -> str | None:
    """A line saying the checkpoint is of a run that stopped before its planned training (interrupted, crashed,
    or still running), so its predictions are not the finished model's; None when it finished or cannot tell."""
    training = loaded.checkpoint.training
    if training is None or training.position.finished:
        return None
    done, run = len(training.history), loaded.checkpoint.run_id
    stopped = (f"after {done} epoch(s), at step {training.position.step} of its {training.position.total_steps}"
               if loaded.config.budget_seconds else f"after {done} of its {loaded.config.epochs} epochs")
    return (f"run {run} stopped {stopped}: these predictions come from an unfinished model "
            f"(`cifarbench train --resume {run}` continues it)")


def predict_images(ref: str, images: Sequence[str | os.PathLike], *, top: int = 3,
                   runs_dir: str | os.PathLike | None = None, device: str = "auto",
                   trust_code: bool = False, progress: bool | None = None) -> Predictions:
    """Classify PNG/JPEG files (a folder: the images in it) with a saved model: the `top` classes and
    probabilities of each image."""
    from cifarbench.image_files import classify_files, expand_images

    if top < 1:
        raise CifarbenchError("--top must be at least 1")
    images = expand_images(images)
    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device, trust_code=trust_code)
    c = loaded.config
    if len(images) >= MANY_FILES:
        say(f"predicting {len(images)} files...", enabled=progress)
    predictions = classify_files(loaded.model, images, in_shape=loaded.in_shape, mean=c.data.mean, std=c.data.std,
                                 classes=loaded.classes, device=loaded.device, channels_last=c.channels_last, top=top,
                                 tta=c.tta, tta_threshold=c.tta_threshold)
    warning = unfinished_warning(loaded)
    return Predictions(checkpoint=str(loaded.path), run_id=loaded.checkpoint.run_id, model=loaded.checkpoint.model,
                       classes=loaded.classes, predictions=predictions, warnings=[warning] if warning else [])


@dataclass(kw_only=True)
class ImageScore:
    """A saved model scored on labelled image files: accuracy, per-class accuracy, confusion, each image's verdict."""

    checkpoint: str
    run_id: str
    model: str
    classes: list[str]
    labels_file: str
    images: list[str]
    labels: list[int]
    predicted: list[int]
    result: EvalResult
    warnings: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.result.accuracy

    def wrong(self) -> list[tuple[str, str, str]]:
        """(image, label, predicted) of every image the model got wrong, in the order given."""
        return [(i, self.classes[y], self.classes[p])
                for i, y, p in zip(self.images, self.labels, self.predicted, strict=True) if y != p]

    def plot(self, kind: str = "per_class"):
        """Per-class accuracy as a matplotlib Figure, or `kind="confusion"` for the confusion matrix."""
        from cifarbench.reporting.display import evaluation_figure

        return evaluation_figure(self, kind)

    def __repr__(self) -> str:
        return (f"ImageScore({self.run_id!r}, {self.model}, accuracy {100 * self.accuracy:.2f}% of "
                f"{self.result.n:,} images in {self.labels_file!r})")

    def _repr_html_(self) -> str:
        from cifarbench.reporting.display import score_html

        return score_html(self)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"checkpoint": self.checkpoint, "run_id": self.run_id, "model": self.model, "classes": self.classes,
                "labels_file": self.labels_file, "accuracy": r.accuracy, "loss": r.loss, "n": r.n,
                "per_class_accuracy": r.per_class_accuracy, "confusion": r.confusion, "warnings": self.warnings,
                "images": [{"image": i, "label": self.classes[y], "predicted": self.classes[p], "correct": y == p}
                           for i, y, p in zip(self.images, self.labels, self.predicted, strict=True)]}


def score_images(ref: str, images: Sequence[str | os.PathLike], labels: str | os.PathLike, *,
                 runs_dir: str | os.PathLike | None = None, device: str = "auto",
                 trust_code: bool = False) -> ImageScore:
    """Score a saved model on PNG/JPEG files (a folder: the images in it) against a labels file of
    `filename,label` rows (predict.read_labels), with the run's own normalisation and test-time augmentation."""
    from cifarbench.image_files import expand_images, load_images, match_labels, read_labels

    files = expand_images(images)
    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device, trust_code=trust_code)
    truth = match_labels(files, read_labels(labels, loaded.classes), labels)
    result = loaded.evaluate_split(Split(load_images(files, loaded.in_shape), truth), keep_probabilities=True)
    assert result.probabilities is not None
    predicted = result.probabilities.argmax(1).tolist()
    warning = unfinished_warning(loaded)
    return ImageScore(checkpoint=str(loaded.path), run_id=loaded.checkpoint.run_id, model=loaded.checkpoint.model,
                      classes=loaded.classes, labels_file=str(labels), images=[str(f) for f in files],
                      labels=truth.tolist(), predicted=predicted, result=result, warnings=[warning] if warning else [])
