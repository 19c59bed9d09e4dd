"""Comparing models: train each over seeds (in this process or in worker processes) and summarise, or summarise
runs already in the history."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from cifarbench import runtime
from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset
from cifarbench.device import resolve_device
from cifarbench.errors import INTERFACE, CifarbenchError
from cifarbench.provenance import environment
from cifarbench.running import train_run
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.folders import resolve_runs_dir
from cifarbench.runs.records import Comparison, RunRecord, summarise
from cifarbench.training.loop import check_settings
from cifarbench.training.state import EpochMetrics


def check_target(target: float | None) -> None:
    if target is not None and not 0 < target <= 1:
        raise CifarbenchError(f"--target {target:g} is not a fraction in (0, 1]; write e.g. 0.9 for 90%")


def compare(models: Sequence[str], make: Callable[[str, int], TrainConfig], *, seeds: int = 1,
            runs_dir: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
            progress: bool | None = None, on_run: Callable[[RunRecord], None] | None = None,
            on_epoch: Callable[[TrainConfig, EpochMetrics], None] | None = None, target: float | None = None,
            report: str | os.PathLike | None = None, jobs: int = 1) -> Comparison:
    """Train every model for `seeds` seeds (0..seeds-1) on the same data, then tabulate and plot them.

    With `jobs` > 1 the runs go to that many worker processes, each with its share of the CPU threads (or its
    own GPU); a run that fails is reported under `failures` and the others' results are kept.

    `make(model, seed)` builds each run's config, so the caller decides recipe and overrides. Each model's
    row has accuracy mean ± std, parameters, FLOPs per image, training seconds and, with `target` (a fraction
    such as 0.9), the epoch and training second at which each seed first reached it. `report` also writes the
    self-contained HTML report there.
    """
    from cifarbench.reporting.plots import plot_learning_curves

    runtime.configure()
    if seeds < 1 or jobs < 1:
        raise CifarbenchError("--seeds and --jobs must be at least 1")
    check_target(target)
    configs = {m: [make(m, s) for s in range(seeds)] for m in models}  # fail fast on a bad model or flag
    for model_configs in configs.values():  # a model's seeds differ only in the seed
        check_settings(model_configs[0], resolve_device(model_configs[0].device))
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.data, progress=progress)  # also fills the cache the workers read from
    every = [c for cs in configs.values() for c in cs]
    if jobs == 1:
        runs, failures = [], []
        for config in every:
            runs.append(train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress,
                                  on_epoch=(lambda m, c=config: on_epoch(c, m)) if on_epoch else None))
            if on_run:
                on_run(runs[-1])
    else:
        runs, failures = _run_parallel(every, jobs, runs_dir, on_run)
        if not runs:
            raise CifarbenchError(f"every run failed; the first: {failures[0]['error']}")
    runs.sort(key=lambda r: (list(configs).index(r.model), r.seed))  # models as asked, seeds in order
    results = summarise(runs, target)
    plot_path = Path(plot) if plot else resolve_runs_dir(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.png"
    plot_learning_curves({s.model: [[h.to_dict() for h in r.history] for r in runs if r.run_id in s.run_ids]
                          for s in results}, plot_path, target=target)
    comparison = Comparison(results, runs, target, dataset.info(), failures, str(plot_path), None, jobs, environment())
    if report:
        from cifarbench.reporting.report import build_report

        comparison.report = str(build_report(runs, results, report, target=target, dataset=dataset,
                                             device=first.device, runs_dir=runs_dir))
    return comparison


def compare_runs(refs: Sequence[str], *, runs_dir: str | os.PathLike | None = None,
                 target: float | None = None) -> Comparison:
    """The comparison table of stored runs, from the run history alone (no training, no data needed)."""
    check_target(target)
    runs = stored_runs(refs, runs_dir=runs_dir)
    return Comparison(summarise(runs, target), runs, target, environment=environment())


def _worker_init(threads: int, gpus: int, interface: str) -> None:
    """Pin a compare worker to its share of the CPU threads, or to one GPU (by worker number).

    On the CPU each worker also gets its own cores (worker k: cores k*threads ...): two single-threaded
    workers that the scheduler moves between cores keep evicting each other's caches.
    """
    import multiprocessing

    worker = multiprocessing.current_process()._identity[0] - 1
    INTERFACE.set(interface)  # errors spelled for the caller: flags for the CLI, keywords for Python
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
    return train_run(config, runs_dir=runs_dir, dataset=_worker_datasets[key], progress=False).to_dict()


def _run_parallel(configs: Sequence[TrainConfig], jobs: int, runs_dir: str | os.PathLike | None,
                  on_run: Callable[[RunRecord], None] | None) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """Each config in a worker process: the finished runs, and the failures (model, seed, error)."""
    import concurrent.futures as cf
    import multiprocessing

    gpus = torch.cuda.device_count() if any(c.device in ("auto", "cuda") for c in configs) else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn: a fork of a process that already ran torch (threads, maybe CUDA) is not safe.
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(threads, gpus, INTERFACE.get()))
    runs, failures = [], []
    with pool:
        futures = {pool.submit(_worker_run, c, runs_dir): c for c in configs}
        for future in cf.as_completed(futures):
            config = futures[future]
            try:
                run = RunRecord.from_dict(future.result())
            except Exception as exc:  # a failed run (or a crashed worker) is reported; the rest go on
                failures.append({"model": config.model, "seed": config.seed, "error": f"{type(exc).__name__}: {exc}"})
                continue
            runs.append(run)
            if on_run:
                on_run(run)
    return runs, failures
