"""The Python API the CLI wraps: train a run, evaluate one, compare models over seeds.

Every result dict carries its provenance: config, seed, dataset fingerprint, code version, device, torch.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import describe_device, resolve_device
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.metrics import evaluate
from cifarbench.models import count_parameters, create_model
from cifarbench.provenance import environment
from cifarbench.runs.store import RunStore, resolve_runs_dir
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint
from cifarbench.training.loop import EpochMetrics, TrainResult, autocast_dtype, train

CHECKPOINT = "checkpoint.pt"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def new_run_id(config: TrainConfig) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-s{config.seed}-{secrets.token_hex(2)}"


def train_run(config: TrainConfig, *, runs_dir: str | os.PathLike | None = None, dataset: ImageDataset | None = None,
              progress: bool | None = None, on_epoch: Callable[[EpochMetrics], None] | None = None) -> dict[str, Any]:
    """Train one run end to end: its folder (config, checkpoint, metrics) and its row in the run history."""
    device = resolve_device(config.device)
    dataset = dataset or load_dataset(config.data, progress=progress)
    env = environment()
    store = RunStore(runs_dir)
    run_id = new_run_id(config)
    run_dir = store.dir / run_id
    params = count_parameters(create_model(config.model, num_classes=len(dataset.classes), in_shape=dataset.image_shape))
    write_json(run_dir / "config.json", {"run_id": run_id, "config": config.to_dict(), "dataset": dataset.info(),
                                         "device": describe_device(device), **env})
    store.start_run(run_id, config=config.to_dict(), dataset=dataset.info(), device=describe_device(device),
                    params=params, run_dir=str(run_dir.resolve()), code_version=env["code_version"],
                    torch_version=env["torch_version"])

    def checkpoint(result: TrainResult) -> None:
        save_checkpoint({"run_id": run_id, "model": config.model, "classes": list(dataset.classes),
                         "in_shape": list(dataset.image_shape), "config": config.to_dict(), "dataset": dataset.info(),
                         "epoch": len(result.history), "history": [h.to_dict() for h in result.history],
                         "state_dict": result.model.state_dict(), "optimizer": result.optimizer.state_dict(), **env},
                        run_dir / CHECKPOINT)

    def after_epoch(metrics: EpochMetrics, result: TrainResult) -> None:
        store.add_epoch(run_id, metrics.to_dict())
        checkpoint(result)  # every epoch: a crash loses at most one epoch
        if on_epoch:
            on_epoch(metrics)

    try:
        result = train(config, dataset, device, on_epoch=after_epoch, progress=progress)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", error="interrupted by the user")
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    assert result.final is not None
    summary = {
        "run_id": run_id, "model": config.model, "recipe": config.recipe, "seed": config.seed,
        "epochs": config.epochs, "test_accuracy": result.final.accuracy, "test_loss": result.final.loss,
        "train_seconds": result.train_seconds, "device": describe_device(device), "params": params,
        "dataset": dataset.info(), "history": [h.to_dict() for h in result.history],
        "per_class_accuracy": result.final.per_class_accuracy, "confusion": result.final.confusion,
        "config": config.to_dict(), "run_dir": str(run_dir), **env,
    }
    write_json(run_dir / "metrics.json", summary)
    store.finish_run(run_id, "completed", test_accuracy=result.final.accuracy, test_loss=result.final.loss,
                     train_seconds=result.train_seconds)
    store.close()
    return summary


def resolve_checkpoint(ref: str, runs_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint file path, a run folder, or a run id (prefix) from the run history."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir() and (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    with RunStore(runs_dir) as store:
        run = store.get_run(ref)
    return Path(run["run_dir"]) / CHECKPOINT


def evaluate_checkpoint(ref: str, *, runs_dir: str | os.PathLike | None = None, data_dir: str | None = None,
                        verify: bool | None = None, device: str = "auto", dataset: ImageDataset | None = None,
                        progress: bool | None = None) -> dict[str, Any]:
    """Evaluate a saved model on the whole test set: accuracy, loss, per-class accuracy, confusion matrix."""
    path = resolve_checkpoint(ref, runs_dir)
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if data_dir:
        config.data.data_dir = data_dir
    if verify is not None:
        config.data.verify = verify
    dev = resolve_device(device)
    dataset = dataset or load_dataset(config.data, progress=progress)
    model = create_model(ckpt["model"], num_classes=len(ckpt["classes"]), in_shape=tuple(ckpt["in_shape"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CifarbenchError(f"{path}: weights do not fit model {ckpt['model']!r} ({str(exc).splitlines()[0]})") from None
    model.to(dev)
    test = DeviceSplit(dataset.test, dev, config.data.mean, config.data.std, config.channels_last)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, test, num_classes=len(dataset.classes), batch_size=config.eval_batch_size,
                      autocast_dtype=autocast_dtype(config))
    return {"checkpoint": str(path), "run_id": ckpt.get("run_id"), "model": ckpt["model"], "classes": ckpt["classes"],
            "test_accuracy": result.accuracy, "test_loss": result.loss, "per_class_accuracy": result.per_class_accuracy,
            "confusion": result.confusion, "n": result.n, "device": describe_device(dev), "dataset": dataset.info(),
            "dataset_matches_training": dataset.sha256 == ckpt["dataset"]["sha256"]}


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of one model's runs."""
    acc = [r["test_accuracy"] for r in runs]
    secs = [r["train_seconds"] for r in runs]
    return {"model": runs[0]["model"], "recipe": runs[0]["recipe"], "seeds": [r["seed"] for r in runs],
            "test_accuracy_mean": statistics.fmean(acc), "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(secs), "params": runs[0]["params"],
            "run_ids": [r["run_id"] for r in runs]}


def compare(models: Sequence[str], make: Callable[[str, int], TrainConfig], *, seeds: int = 1,
            runs_dir: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
            progress: bool | None = None, on_run: Callable[[dict[str, Any]], None] | None = None,
            on_epoch: Callable[[TrainConfig, EpochMetrics], None] | None = None) -> dict[str, Any]:
    """Train every model for `seeds` seeds (0..seeds-1) on the same data, then tabulate and plot them.

    `make(model, seed)` builds each run's config, so the caller decides recipe and overrides.
    """
    from cifarbench.reporting.plots import plot_learning_curves

    if seeds < 1:
        raise CifarbenchError("--seeds must be at least 1")
    configs = {m: [make(m, s) for s in range(seeds)] for m in models}  # fail fast on a bad model or flag
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.data, progress=progress)
    runs: dict[str, list[dict[str, Any]]] = {}
    for model, model_configs in configs.items():
        for config in model_configs:
            run = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress,
                            on_epoch=(lambda m, c=config: on_epoch(c, m)) if on_epoch else None)
            runs.setdefault(model, []).append(run)
            if on_run:
                on_run(run)
    plot_path = Path(plot) if plot else resolve_runs_dir(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.png"
    plot_learning_curves({m: [r["history"] for r in rs] for m, rs in runs.items()}, plot_path)
    return {"results": [aggregate(rs) for rs in runs.values()], "plot": str(plot_path), "dataset": dataset.info(),
            **environment()}
