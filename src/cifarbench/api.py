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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cifarbench.config import DataConfig, TrainConfig
from cifarbench.data import ImageDataset, fit_normalisation, load_dataset
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import describe_device, kernel_choice, resolve_device
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.analysis import model_cost, training_flops
from cifarbench.evaluation.metrics import evaluate
from cifarbench.models import create_model
from cifarbench.provenance import environment
from cifarbench.runs.store import RunStore, resolve_runs_dir
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint
from cifarbench.training import distributed as ddp
from cifarbench.training.loop import EpochMetrics, TrainResult, autocast_dtype, check_settings, train

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


def train_run(config: TrainConfig | None = None, *, runs_dir: str | os.PathLike | None = None,
              dataset: ImageDataset | None = None, progress: bool | None = None,
              on_epoch: Callable[[EpochMetrics], None] | None = None, resume: str | None = None,
              data: DataConfig | None = None) -> dict[str, Any]:
    """Train one run end to end: its folder (config, checkpoint, metrics) and its row in the run history.

    With `resume` (a run id, run folder or checkpoint), continue that run from its last checkpoint under its
    own config and id instead (`data` may say where its data is now): the result is the same, bit for bit on
    CPU, as if it had never stopped.
    """
    state = None
    if resume is not None:
        ckpt_path = resolve_checkpoint(resume, runs_dir)
        state = load_checkpoint(ckpt_path)
        if "position" not in state:
            raise CifarbenchError(f"{ckpt_path}: this checkpoint has no training state to resume from")
        position = state["position"]
        if position["step"] >= position["total_steps"] and not position["in_epoch"]:
            raise CifarbenchError(f"run {state['run_id']} already finished; nothing to resume")
        config = TrainConfig.from_dict(state["config"])
        if data is not None:
            config = replace(config, data=data)
    if config is None:
        raise CifarbenchError("train_run needs a config or a run to resume")
    requested = resolve_device(config.device)
    check_settings(config, requested)  # before the run is recorded
    world, device = ddp.setup(requested)
    finished = False
    try:
        summary = _train_run(config, world, device, state, runs_dir=runs_dir, dataset=dataset, progress=progress,
                             on_epoch=on_epoch, ckpt_path=ckpt_path if state is not None else None)
        finished = True
        return summary
    finally:
        ddp.teardown(world, finished=finished)


def _train_run(config: TrainConfig, world: ddp.DistEnv, device: torch.device, state: dict | None, *,
               runs_dir: str | os.PathLike | None, dataset: ImageDataset | None, progress: bool | None,
               on_epoch: Callable[[EpochMetrics], None] | None, ckpt_path: Path | None) -> dict[str, Any]:
    # Under torchrun only rank 0 downloads (and shows progress); the others wait for its files (data.download).
    dataset = dataset or load_dataset(config.data, progress=progress if world.is_main else False)
    config = replace(config, data=fit_normalisation(config.data, dataset.image_shape[0]))  # e.g. 0.5/0.5 on MNIST
    if not world.is_main:  # the other ranks train their shares; rank 0 alone writes the run
        result = train(config, dataset, device, progress=False, resume=state, world=world)
        return {"rank": world.rank, "test_accuracy": result.final.accuracy if result.final else None}
    env = environment()
    store = RunStore(runs_dir)
    cost = model_cost(config.model, dataset.image_shape, len(dataset.classes), config.model_kwargs)
    params = cost.params
    if state is not None:
        run_id = state["run_id"]
        run_dir = ckpt_path.parent
        if state["dataset"]["sha256"] != dataset.sha256:
            raise CifarbenchError(f"run {run_id} was trained on data with fingerprint {state['dataset']['sha256'][:12]}"
                                  f"..., not this copy ({dataset.sha256[:12]}...); point --data-dir at the same data")
        store.reopen_run(run_id)
    else:
        run_id = new_run_id(config)
        run_dir = store.dir / run_id
        write_json(run_dir / "config.json", {"run_id": run_id, "config": config.to_dict(), "dataset": dataset.info(),
                                             "device": describe_device(device), **env})
        store.start_run(run_id, config=config.to_dict(), dataset=dataset.info(), device=describe_device(device),
                        params=params, run_dir=str(run_dir.resolve()), code_version=env["code_version"],
                        torch_version=env["torch_version"])

    def checkpoint(result: TrainResult) -> None:
        save_checkpoint({"run_id": run_id, "model": config.model, "classes": list(dataset.classes),
                         "in_shape": list(dataset.image_shape), "config": config.to_dict(), "dataset": dataset.info(),
                         "epoch": len(result.history), **result.state(), **env}, run_dir / CHECKPOINT)

    def after_epoch(metrics: EpochMetrics, result: TrainResult) -> None:
        store.add_epoch(run_id, metrics.to_dict())
        checkpoint(result)  # every epoch: a crash loses at most one epoch
        if on_epoch:
            on_epoch(metrics)

    try:
        result = train(config, dataset, device, on_epoch=after_epoch, on_interrupt=checkpoint, progress=progress,
                       resume=state, world=world)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", error="interrupted by the user; `cifarbench train --resume "
                         f"{run_id}` continues it")
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    assert result.final is not None
    summary = {
        "run_id": run_id, "model": config.model, "recipe": config.recipe, "seed": config.seed,
        "epochs": config.epochs, "test_accuracy": result.final.accuracy, "test_loss": result.final.loss,
        "train_seconds": result.train_seconds, "wall_seconds": result.wall_seconds, "steps": result.steps,
        "tta": config.tta, "tta_threshold": config.tta_threshold, "budget_seconds": config.budget_seconds,
        "device": describe_device(device), "params": params, "flops_per_image": cost.flops_per_image,
        # Compute spent on training, comparable with the speedrun literature's PFLOP figures.
        "train_flops": training_flops(config.model, dataset.image_shape, result.position.images, len(dataset.classes),
                                      config.model_kwargs, config.low_res, result.position.low_images),
        "world_size": world.world_size,
        "dataset": dataset.info(), "history": [h.to_dict() for h in result.history],
        "per_class_accuracy": result.final.per_class_accuracy, "confusion": result.final.confusion,
        "config": config.to_dict(), "run_dir": str(run_dir), **env,
    }
    write_json(run_dir / "metrics.json", summary)
    store.finish_run(run_id, "completed", test_accuracy=result.final.accuracy, test_loss=result.final.loss,
                     train_seconds=result.train_seconds)
    store.close()
    return summary


def run_config(ref: str, runs_dir: str | os.PathLike | None = None) -> TrainConfig:
    """The config a saved run (id, folder or checkpoint) was trained with."""
    return TrainConfig.from_dict(load_checkpoint(resolve_checkpoint(ref, runs_dir))["config"])


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
    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device)
    path, ckpt, config, model, dev = loaded.path, loaded.checkpoint, loaded.config, loaded.model, loaded.device
    dataset = loaded.test_dataset(data_dir=data_dir, verify=verify, dataset=dataset, progress=progress)
    test = DeviceSplit(dataset.test, dev, config.data.mean, config.data.std, config.channels_last)
    # The same test-time augmentation and kernels as the run's final evaluation, so the figures agree.
    with kernel_choice(config.deterministic):
        result = evaluate(model, test, num_classes=len(dataset.classes), batch_size=config.eval_batch_size,
                          autocast_dtype=autocast_dtype(config, dev), tta=config.tta,
                          tta_threshold=config.tta_threshold)
    return {"checkpoint": str(path), "run_id": ckpt.get("run_id"), "model": ckpt["model"], "classes": ckpt["classes"],
            "tta": config.tta, "tta_threshold": config.tta_threshold, "test_accuracy": result.accuracy,
            "test_loss": result.loss, "per_class_accuracy": result.per_class_accuracy,
            "confusion": result.confusion, "n": result.n, "device": describe_device(dev), "dataset": dataset.info(),
            "dataset_matches_training": dataset.sha256 == ckpt["dataset"]["sha256"]}


def aggregate(runs: Sequence[dict[str, Any]], *, target: float | None = None, cost: Any = None,
              label: str | None = None) -> dict[str, Any]:
    """Mean and sample std over seeds of one model's runs; with `target`, their time to reach it; with
    `cost` (an evaluation.analysis.ModelCost), MACs and FLOPs per image."""
    from cifarbench.evaluation.analysis import summarise_time_to_target

    acc = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
    secs = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
    return {"model": label or runs[0]["model"], "recipe": runs[0]["recipe"], "seeds": [r["seed"] for r in runs],
            "test_accuracy_mean": statistics.fmean(acc) if acc else None,
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(secs) if secs else None,
            "train_seconds_std": statistics.stdev(secs) if len(secs) > 1 else 0.0,
            "params": runs[0]["params"],
            "macs_per_image": cost.macs_per_image if cost else None,
            "flops_per_image": cost.flops_per_image if cost else None,
            "time_to_target": summarise_time_to_target(runs, target) if target is not None else None,
            "run_ids": [r["run_id"] for r in runs]}


def compare(models: Sequence[str], make: Callable[[str, int], TrainConfig], *, seeds: int = 1,
            runs_dir: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
            progress: bool | None = None, on_run: Callable[[dict[str, Any]], None] | None = None,
            on_epoch: Callable[[TrainConfig, EpochMetrics], None] | None = None, target: float | None = None,
            report: str | os.PathLike | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train every model for `seeds` seeds (0..seeds-1) on the same data, then tabulate and plot them.

    With `jobs` > 1 the runs go to that many worker processes, each with its share of the CPU threads (or its
    own GPU); a run that fails is reported under `failures` and the others' results are kept.

    `make(model, seed)` builds each run's config, so the caller decides recipe and overrides. Each model's
    row has accuracy mean ± std, parameters, MACs/FLOPs per image, training seconds and, with `target` (a
    fraction such as 0.9), the epoch and training second at which each seed first reached it. `report` also
    writes the self-contained HTML report there.
    """
    from cifarbench.reporting.plots import plot_learning_curves

    if seeds < 1 or jobs < 1:
        raise CifarbenchError("--seeds and --jobs must be at least 1")
    _check_target(target)
    configs = {m: [make(m, s) for s in range(seeds)] for m in models}  # fail fast on a bad model or flag
    for model_configs in configs.values():  # a model's seeds differ only in the seed
        check_settings(model_configs[0], resolve_device(model_configs[0].device))
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.data, progress=progress)  # also fills the cache the workers read from
    runs: dict[str, list[dict[str, Any]]] = {}
    failures: list[dict[str, Any]] = []
    if jobs == 1:
        for model, model_configs in configs.items():
            for config in model_configs:
                run = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress,
                                on_epoch=(lambda m, c=config: on_epoch(c, m)) if on_epoch else None)
                runs.setdefault(model, []).append(run)
                if on_run:
                    on_run(run)
    else:
        done = _run_parallel([c for cs in configs.values() for c in cs], jobs, runs_dir, on_run)
        for config, run, error in done:
            if error is None:
                runs.setdefault(config.model, []).append(run)
            else:
                failures.append({"model": config.model, "seed": config.seed, "error": error})
        for rs in runs.values():
            rs.sort(key=lambda r: r["seed"])
        if not runs:
            raise CifarbenchError(f"every run failed; the first: {failures[0]['error']}")
        configs = {m: cs for m, cs in configs.items() if m in runs}
    plot_path = Path(plot) if plot else resolve_runs_dir(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.png"
    plot_learning_curves({m: [r["history"] for r in rs] for m, rs in runs.items()}, plot_path, target=target)
    results = [aggregate(rs, target=target, label=m,
                         cost=model_cost(m, dataset.image_shape, len(dataset.classes), configs[m][0].model_kwargs))
               for m, rs in runs.items()]
    out = {"results": results, "plot": str(plot_path), "target": target, "dataset": dataset.info(),
           "failures": failures, "jobs": jobs, **environment()}
    if report:
        every = [r for rs in runs.values() for r in rs]
        out["report"] = str(build_report(every, results, report, target=target, dataset=dataset, device=first.device))
    return out


def _worker_init(threads: int, gpus: int) -> None:
    """Pin a compare worker to its share of the CPU threads, or to one GPU (by worker number).

    On the CPU each worker also gets its own cores (worker k: cores k*threads ...): two single-threaded
    workers that the scheduler moves between cores keep evicting each other's caches.
    """
    import multiprocessing

    worker = multiprocessing.current_process()._identity[0] - 1
    torch.set_num_threads(threads)
    if gpus:
        torch.cuda.set_device(worker % gpus)
    elif hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= threads * (worker + 1):
            os.sched_setaffinity(0, cores[worker * threads:(worker + 1) * threads])


_worker_datasets: dict[str, ImageDataset] = {}  # a worker loads each data set once, not once per run


def _worker_run(config: TrainConfig, runs_dir: str | os.PathLike | None) -> dict[str, Any]:
    if config.device.startswith("cuda") and torch.cuda.device_count() > 1:
        config = replace(config, device=f"cuda:{torch.cuda.current_device()}")
    key = json.dumps(asdict(config.data), sort_keys=True)
    if key not in _worker_datasets:
        _worker_datasets[key] = load_dataset(config.data, progress=False)
    return train_run(config, runs_dir=runs_dir, dataset=_worker_datasets[key], progress=False)


def _run_parallel(configs: Sequence[TrainConfig], jobs: int, runs_dir: str | os.PathLike | None,
                  on_run: Callable[[dict[str, Any]], None] | None) -> list[tuple[TrainConfig, Any, str | None]]:
    """Each config in a worker process; (config, result or None, error or None) in completion order."""
    import concurrent.futures as cf
    import multiprocessing

    gpus = torch.cuda.device_count() if any(c.device in ("auto", "cuda") for c in configs) else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn: a fork of a process that already ran torch (threads, maybe CUDA) is not safe.
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(threads, gpus))
    done = []
    with pool:
        futures = {pool.submit(_worker_run, c, runs_dir): c for c in configs}
        for future in cf.as_completed(futures):
            config = futures[future]
            try:
                run = future.result()
            except Exception as exc:  # a failed run (or a crashed worker) is reported; the rest go on
                done.append((config, None, f"{type(exc).__name__}: {exc}"))
                continue
            done.append((config, run, None))
            if on_run:
                on_run(run)
    return done


# --- Trained models: load once, then evaluate, predict the test set or classify image files -------------------


@dataclass
class TrainedModel:
    """A checkpoint's model with its weights loaded, in eval mode on `device`, and what it was trained with."""

    path: Path
    checkpoint: dict[str, Any]
    config: TrainConfig
    model: torch.nn.Module
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.checkpoint["in_shape"])  # type: ignore[return-value]

    def test_dataset(self, *, data_dir: str | None = None, verify: bool | None = None, download: bool | None = None,
                     dataset: ImageDataset | None = None, progress: bool | None = None) -> ImageDataset:
        """The data set the model was trained on (its config's, with `data_dir`, `verify`, `download` overriding)."""
        if dataset is not None:
            return dataset
        data = self.config.data
        data = replace(data, data_dir=data_dir or data.data_dir, verify=data.verify if verify is None else verify,
                       download=data.download if download is None else download)
        return load_dataset(data, progress=progress)


def load_trained_model(ref: str, *, runs_dir: str | os.PathLike | None = None, device: str = "auto") -> TrainedModel:
    """Load a checkpoint (file, run folder or run id) into its model, ready for inference on `device`."""
    path = resolve_checkpoint(ref, runs_dir)
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    dev = resolve_device(device)
    model = create_model(ckpt["model"], num_classes=len(ckpt["classes"]), in_shape=tuple(ckpt["in_shape"]),
                         **config.model_kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CifarbenchError(f"{path}: weights do not fit model {ckpt['model']!r} ({str(exc).splitlines()[0]})") from None
    model.to(dev)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return TrainedModel(path, ckpt, config, model, dev)


def predict_test_set(ref: str, *, runs_dir: str | os.PathLike | None = None, data_dir: str | None = None,
                       verify: bool | None = None, device: str = "auto", dataset: ImageDataset | None = None,
                       progress: bool | None = None) -> dict[str, Any]:
    """Per-example class probabilities of a saved model on the whole test set, with the true labels.

    `probabilities` is an (N, classes) float32 array and `labels` an (N,) int64 array, in test-set order.
    """
    from cifarbench.evaluation.analysis import predict_probabilities

    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device)
    config = loaded.config
    dataset = loaded.test_dataset(data_dir=data_dir, verify=verify, dataset=dataset, progress=progress)
    test = DeviceSplit(dataset.test, loaded.device, config.data.mean, config.data.std, config.channels_last)
    with kernel_choice(config.deterministic):  # the run's own kernels: its recorded accuracy is reproduced
        probs = predict_probabilities(loaded.model, test, batch_size=config.eval_batch_size,
                                      autocast_dtype=autocast_dtype(config, loaded.device), tta=config.tta,
                                      tta_threshold=config.tta_threshold)
    return {"checkpoint": str(loaded.path), "run_id": loaded.checkpoint.get("run_id"), "model": loaded.checkpoint["model"],
            "classes": loaded.classes, "probabilities": probs.numpy(), "labels": dataset.test.labels,
            "dataset": dataset.info(), "dataset_matches_training": dataset.sha256 == loaded.checkpoint["dataset"]["sha256"]}


def predict_images(ref: str, images: Sequence[str | os.PathLike], *, top: int = 3,
                   runs_dir: str | os.PathLike | None = None, device: str = "auto") -> dict[str, Any]:
    """Classify PNG/JPEG files with a saved model: the `top` classes and probabilities of each image."""
    from cifarbench.predict import classify_files

    if top < 1:
        raise CifarbenchError("--top must be at least 1")
    loaded = load_trained_model(ref, runs_dir=runs_dir, device=device)
    predictions = classify_files(loaded.model, images, in_shape=loaded.in_shape, mean=loaded.config.data.mean,
                                 std=loaded.config.data.std, classes=loaded.classes, device=loaded.device,
                                 channels_last=loaded.config.channels_last, top=top, tta=loaded.config.tta,
                                 tta_threshold=loaded.config.tta_threshold)
    return {"checkpoint": str(loaded.path), "run_id": loaded.checkpoint.get("run_id"),
            "model": loaded.checkpoint["model"], "classes": loaded.classes, "predictions": predictions}


# --- Stored runs: show, compare without retraining, report, remove ----------------------------------------------


def _run_record(row: dict[str, Any]) -> dict[str, Any]:
    """A run-history row in the shape `train_run` returns (the fields a comparison reads)."""
    return {"run_id": row["id"], "model": row["model"], "recipe": row["recipe"], "seed": row["seed"],
            "epochs": row["epochs"], "status": row["status"], "test_accuracy": row["test_accuracy"],
            "test_loss": row["test_loss"], "train_seconds": row["train_seconds"], "params": row["params"],
            "device": row["device"], "history": row.get("history", []), "config": row["config"],
            "dataset": row["dataset"], "run_dir": row["run_dir"], "code_version": row["code_version"],
            "torch_version": row["torch_version"]}


def stored_runs(refs: Sequence[str], *, runs_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The runs named by ids (or unique prefixes), in the order given, each once, with their learning curves."""
    if not refs:
        raise CifarbenchError("name at least one run (`cifarbench runs` lists them)")
    with RunStore(runs_dir) as store:
        rows = [store.get_run(ref) for ref in refs]
    unique = {row["id"]: row for row in rows}
    return [_run_record(row) for row in unique.values()]


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by (model, recipe), labelled by the model alone unless it comes with several recipes."""
    keys = list(dict.fromkeys((r["model"], r["recipe"]) for r in runs))
    models = [m for m, _ in keys]
    groups: dict[str, list[dict[str, Any]]] = {}
    for model, recipe in keys:
        label = model if models.count(model) == 1 else f"{model} ({recipe})"
        groups[label] = [r for r in runs if (r["model"], r["recipe"]) == (model, recipe)]
    return groups


def _stored_cost(run: dict[str, Any]):
    from cifarbench.data import IMAGE_SHAPES

    name = (run.get("dataset") or {}).get("name")
    if name not in IMAGE_SHAPES:
        return None
    return model_cost(run["model"], IMAGE_SHAPES[name], 10, run["config"].get("model_kwargs"))


def compare_runs(refs: Sequence[str], *, runs_dir: str | os.PathLike | None = None,
                 target: float | None = None) -> dict[str, Any]:
    """The comparison table of stored runs, from the run history alone (no training, no data needed)."""
    _check_target(target)
    return _comparison(stored_runs(refs, runs_dir=runs_dir), target)


def _comparison(runs: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    results = [aggregate(rs, target=target, cost=_stored_cost(rs[0]), label=label)
               for label, rs in group_runs(runs).items()]
    return {"results": results, "runs": [_run_summary(r, target) for r in runs], "target": target}


def _run_summary(run: dict[str, Any], target: float | None) -> dict[str, Any]:
    from cifarbench.evaluation.analysis import time_to_target

    return {"run_id": run["run_id"], "model": run["model"], "recipe": run["recipe"], "seed": run["seed"],
            "status": run.get("status", "completed"), "test_accuracy": run["test_accuracy"],
            "train_seconds": run["train_seconds"], "epochs": len(run["history"]),
            "time_to_target": time_to_target(run["history"], target) if target is not None else None,
            "dataset_sha256": (run.get("dataset") or {}).get("sha256")}


def _check_target(target: float | None) -> None:
    if target is not None and not 0 < target <= 1:
        raise CifarbenchError(f"--target {target:g} is not a fraction in (0, 1]; write e.g. 0.9 for 90%")


def report_runs(refs: Sequence[str], out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                target: float | None = None, data_dir: str | None = None, verify: bool | None = None,
                download: bool | None = None, device: str = "auto", progress: bool | None = None) -> dict[str, Any]:
    """One self-contained HTML report of stored runs: table, learning curves, per-class accuracy, confusion
    matrices, the most confident mistakes, configs and the data fingerprint. Returns the comparison."""
    _check_target(target)
    runs = stored_runs(refs, runs_dir=runs_dir)
    comparison = _comparison(runs, target)
    path = build_report(runs, comparison["results"], out, target=target, data_dir=data_dir, verify=verify,
                        download=download, device=device, progress=progress)
    return {**comparison, "report": str(path)}


def build_report(runs: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]], out: str | os.PathLike, *,
                 target: float | None = None, dataset: ImageDataset | None = None, data_dir: str | None = None,
                 verify: bool | None = None, download: bool | None = None, device: str = "auto",
                 progress: bool | None = None,
                 title: str | None = None, gallery: int = 8) -> Path:
    """Write the HTML report of `runs` (aggregated as `results`); the test set is evaluated from each run's
    checkpoint (loaded from the runs' own data config unless `dataset` is given)."""
    import numpy as np

    from cifarbench.evaluation.analysis import confident_mistakes, confusion_matrix, per_class_accuracy
    from cifarbench.reporting import html, plots
    from cifarbench.reporting.tables import comparison_headers, comparison_rows

    names = sorted({(r.get("dataset") or {}).get("name") for r in runs}, key=str)
    if len(names) > 1:
        raise CifarbenchError(f"these runs were trained on different data sets ({', '.join(map(str, names))}); "
                              "report them separately")
    groups = group_runs(runs)
    notes: list[str] = []
    confusions: dict[str, Any] = {}
    per_class: dict[str, list[list[float]]] = {}
    galleries: dict[str, list[dict[str, Any]]] = {}
    for label, group in groups.items():
        for run in group:
            ckpt = Path(run["run_dir"]) / CHECKPOINT if run.get("run_dir") else None
            if ckpt is None or not ckpt.is_file():
                notes.append(f"run {run['run_id']} has no checkpoint; it is in the tables but not in the "
                             "per-example figures")
                continue
            if dataset is None:
                dataset = load_trained_model(str(ckpt), device=device).test_dataset(
                    data_dir=data_dir, verify=verify, download=download, progress=progress)
            pred = predict_test_set(str(ckpt), device=device, dataset=dataset)
            if not pred["dataset_matches_training"]:
                notes.append(f"run {run['run_id']} was trained on data with another fingerprint than the test set "
                             f"evaluated here ({dataset.sha256[:12]})")
            matrix = confusion_matrix(pred["labels"], pred["probabilities"].argmax(1), len(pred["classes"]))
            confusions[label] = confusions.get(label, 0) + matrix
            per_class.setdefault(label, []).append(per_class_accuracy(matrix))
            if label not in galleries:  # the first seed's run of each model
                galleries[label] = confident_mistakes(pred["probabilities"], pred["labels"], gallery)
    figures = [("Learning curves", "Test accuracy after every epoch, per epoch and per cumulative training second.",
                plots.learning_curves_figure({label: [r["history"] for r in rs] for label, rs in groups.items()},
                                             target=target))]
    if dataset is not None and confusions:
        classes = list(dataset.classes)
        seeds_note = "; several seeds are pooled (counts summed)" if any(len(v) > 1 for v in per_class.values()) else ""
        figures += [
            ("Per-class accuracy", "Recall of each class on the test set, mean over seeds (whiskers: min-max).",
             plots.per_class_figure(per_class, classes)),
            ("Confusion matrices", f"Rows: true class, columns: predicted; colour = row fraction{seeds_note}.",
             plots.confusion_figure({k: np.asarray(v) for k, v in confusions.items()}, classes,
                                    {k: len(v) for k, v in per_class.items()})),
            ("Most confident mistakes", "Wrong test predictions with the highest probability (first seed of each "
             "model), captioned with the true class, the predicted one and its probability.",
             plots.mistakes_figure(galleries, dataset.test.images, classes)),
            ("Test images by class", "Random test images of each class, with its number of test images.",
             plots.class_grid_figure(dataset.test.images, dataset.test.labels, classes, per_class=8)),
        ]
    run_headers = ["run", "model", "recipe", "seed", "status", "test accuracy", "train s", "epochs",
                   *([f"time to {100 * target:g}%"] if target is not None else []), "data sha256", "verified data"]
    run_rows = []
    for r in runs:
        s = _run_summary(r, target)
        ttt = s["time_to_target"]
        cell = "not reached" if ttt is None else f"epoch {ttt['epoch']}, {ttt['seconds']:.1f} s"
        acc = "-" if s["test_accuracy"] is None else f"{100 * s['test_accuracy']:.2f}%"
        secs = "-" if s["train_seconds"] is None else f"{s['train_seconds']:.1f}"
        data = r.get("dataset") or {}
        run_rows.append([s["run_id"], s["model"], s["recipe"], str(s["seed"]), s["status"], acc, secs, str(s["epochs"]),
                         *([cell] if target is not None else []), str(data.get("sha256", "-"))[:16],
                         "yes" if data.get("verified") else "no"])
    fingerprints = list({(r.get("dataset") or {}).get("sha256"): r.get("dataset") or {} for r in runs}.values())
    if len(fingerprints) > 1:
        notes.append("the runs were trained on copies of the data with different fingerprints; their accuracies "
                     "are not directly comparable")
    document = html.render_report(
        title=title or f"cifarbench: {' vs '.join(groups)} on {names[0]}",
        summary=(comparison_headers(results), comparison_rows(results)),
        runs=(run_headers, run_rows),
        figures=[(heading, caption, plots.png_bytes(fig)) for heading, caption, fig in figures],
        configs={r["run_id"]: r["config"] for r in runs},
        datasets=fingerprints,
        environment={k: str(runs[0].get(k)) for k in ("code_version", "torch_version", "device") if runs[0].get(k)},
        notes=notes)
    return html.write_report(document, out)


def delete_run(ref: str, *, runs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Remove a run: its folder (only if it looks like one of ours) and its rows in the run history."""
    with RunStore(runs_dir) as store:
        run = store.get_run(ref)
        if run["status"] == "running":
            raise CifarbenchError(f"run {run['id']} is still running (pid {run['pid']} on {run['host']}); stop it first")
        folder = Path(run["run_dir"]) if run.get("run_dir") else None
        removed: list[str] = []
        state = "none recorded" if folder is None else "already gone"
        if folder is not None and (folder.exists() or folder.is_symlink()):
            for f in _run_folder_files(folder, run["id"]):  # checks everything before deleting anything
                f.unlink()
                removed.append(str(f))
            folder.rmdir()
            state = "removed"
        store.delete_run(run["id"])
    return {"run_id": run["id"], "run_dir": str(folder) if folder else None, "folder": state, "removed_files": removed}


RUN_FILES = {"config.json", CHECKPOINT, "metrics.json"}


def _run_folder_files(folder: Path, run_id: str) -> list[Path]:
    """The files of a run folder, after checking it is one: named after the run, not a link, holding only what
    `train_run` writes (and its temp files), with a config.json that names the run. Anything else is refused."""
    refuse = f"refusing to delete {folder}: "
    if folder.is_symlink() or not folder.is_dir():
        raise CifarbenchError(refuse + "not a plain folder")
    if folder.name != run_id:
        raise CifarbenchError(refuse + f"its name is not the run id {run_id}")
    entries = list(folder.iterdir())
    if not entries:
        return []
    for entry in entries:
        temp = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if entry.is_symlink() or not entry.is_file() or not (entry.name in RUN_FILES or temp):
            raise CifarbenchError(refuse + f"it holds {entry.name!r}, which cifarbench does not write; "
                                  "not a run folder (remove it by hand if you are sure)")
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != run_id:
        raise CifarbenchError(refuse + f"its config.json does not name run {run_id}")
    return entries
