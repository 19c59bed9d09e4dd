"""Comparing models: train each over seeds (in this process or in worker processes) and summarise, or summarise
runs already in the history."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from cifarbench import runtime
from cifarbench.config import TrainConfig
from cifarbench.data import ImageDataset, load_dataset
from cifarbench.device import resolve_device
from cifarbench.errors import CifarbenchError, Interrupted, Keyword, Spelling, as_keyword, spelled
from cifarbench.evaluation.stats import PairComparison, pairwise_comparisons, training_warnings
from cifarbench.provenance import environment
from cifarbench.running import train_run
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.folders import resolve_runs_dir
from cifarbench.runs.records import Comparison, RunRecord, group_runs, summarise
from cifarbench.scoring import score_runs
from cifarbench.training.loop import check_settings
from cifarbench.training.state import EpochMetrics


def check_target(target: float | None) -> None:
    if target is not None and not 0 < target <= 1:
        raise CifarbenchError("{option} {target:g} is not a fraction in (0, 1]; write e.g. 0.9 for 90%",
                              option=Keyword("target"), target=target)


def compare(models: Sequence[str], make: Callable[[str, int], TrainConfig], *, seeds: int = 1,
            runs_dir: str | os.PathLike | None = None, progress: bool | None = None,
            on_run: Callable[[RunRecord], None] | None = None,
            on_epoch: Callable[[TrainConfig, EpochMetrics], None] | None = None, target: float | None = None,
            jobs: int = 1, retrain: bool = False, on_reuse: Callable[[RunRecord], None] | None = None,
            spelling: Spelling = as_keyword, executor: str = "local", address: str | None = None) -> Comparison:
    """Train every model for `seeds` seeds (0..seeds-1) on the same data, then tabulate and compare them.

    A finished run of this runs folder trained from the same config (code and seed included) on the same data is
    reused, not trained again (`on_reuse` hears of each), unless `retrain`: so a compare after a train, or run again
    after an interruption, trains only what is missing.

    With `jobs` > 1 the runs go to that many worker processes, each with its share of the CPU threads (or its
    own GPU); a run that fails is reported under `failures` and the others' results are kept, its error with
    options spelled by `spelling` (the caller's: the CLI's flags, or the Python API's keywords). With `executor`
    "ray" each run is a task on the Ray cluster at `address` (a local one without), with the threads a local
    worker would have, and comes back as a bundle that is stored here (executors.py).

    `make(model, seed)` builds each run's config, so the caller decides recipe and overrides. Each model's
    row has accuracy mean ± std, parameters, FLOPs per image, training seconds and, with `target` (a fraction
    such as 0.9), the epoch and training second at which each seed first reached it. The paired tests use each
    run's stored predictions (`scoring.score_runs`): nothing is evaluated again. The front doors write the
    learning-curve figure and the HTML report (`api.write_comparison`).
    """
    from cifarbench.executors import check_executor

    runtime.configure()
    if seeds < 1 or jobs < 1:
        raise CifarbenchError("{seeds} and {jobs} must be at least 1", seeds=Keyword("seeds"), jobs=Keyword("jobs"))
    check_executor(executor, address)
    check_target(target)
    configs = {m: [make(m, s) for s in range(seeds)] for m in models}  # fail fast on a bad model or flag
    for model_configs in configs.values():  # a model's seeds differ only in the seed
        check_settings(model_configs[0], resolve_device(model_configs[0].device))
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.data, progress=progress)  # also fills the cache the workers read from
    every = [c for cs in configs.values() for c in cs]
    reused = [] if retrain else [r for r in (finished_run(c, dataset, runs_dir) for c in every) if r is not None]
    for run in reused:
        if on_reuse:
            on_reuse(run)
    done = {(r.model, r.seed) for r in reused}
    every = [c for c in every if (c.model, c.seed) not in done]
    runs, failures = list(reused), []
    try:
        if executor == "ray" and every:
            from cifarbench.executors import train_on_ray

            def arrived(run: RunRecord) -> None:
                runs.append(run)
                if on_run:
                    on_run(run)

            failures = train_on_ray(every, jobs, runs_dir, arrived, address=address, spelling=spelling)
        elif jobs == 1:
            for config in every:
                runs.append(train_run(config, runs_dir=runs_dir, dataset=dataset, progress=progress,
                                      on_epoch=(lambda m, c=config: on_epoch(c, m)) if on_epoch else None,
                                      spelling=spelling))
                if on_run:
                    on_run(runs[-1])
        elif every:
            trained, failures = _run_parallel(every, jobs, runs_dir, on_run, spelling)
            runs += trained
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, runs, len(reused) + len(every)) from None
    if not runs:
        raise CifarbenchError(f"every run failed; the first: {failures[0]['error']}")
    runs.sort(key=lambda r: (list(configs).index(r.model), r.seed))  # models as asked, seeds in order
    results = summarise(runs, target)
    comparison = Comparison(results=results, runs=runs, target=target, dataset=dataset.info(), failures=failures,
                            plot_file=None, report=None, jobs=jobs, environment=environment())
    scores = score_runs(runs, dataset=dataset, device=first.device, runs_dir=runs_dir, progress=progress)
    comparison.pairs, comparison.warnings = pairwise(runs, scores.correct()), [*scores.notes, *run_warnings(runs)]
    return comparison


def finished_run(config: TrainConfig, dataset: ImageDataset, runs_dir: str | os.PathLike | None) -> RunRecord | None:
    """A completed run of this runs folder (trained here, not imported) that was asked for with exactly `config`
    (model, its code's sha256, seed and every setting) and trained on the same data: what `compare` reuses."""
    from cifarbench.data import prepare
    from cifarbench.runs import folders
    from cifarbench.runs.store import RunStore

    if not (resolve_runs_dir(runs_dir) / "cifarbench.db").is_file():
        return None
    wanted, fingerprint = json.loads(json.dumps(config.to_dict())), None  # as config.json holds it (lists)
    with RunStore(runs_dir, read_only=True) as store:
        rows = [r for r in store.list_runs() if r.get("status") == "completed" and r.get("origin") is None
                and r.get("model") == config.model and r.get("seed") == config.seed]
    for row in rows:
        try:
            stored = json.loads((folders.run_folder(runs_dir, row["id"]) / folders.CONFIG).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(stored, dict) or stored.get("requested") != wanted:
            continue
        fingerprint = fingerprint or prepare(dataset, config.data).sha256
        if (row.get("dataset") or {}).get("sha256") == fingerprint:
            return stored_runs([row["id"]], runs_dir=runs_dir)[0]
    return None


def _interrupted(exc: KeyboardInterrupt, finished: list[RunRecord], planned: int) -> Interrupted:
    """What an interrupted compare kept, and the one command that finishes it (the same command: it reuses the
    finished runs and resumes nothing else)."""
    stopped = f"; {exc.message}" if isinstance(exc, Interrupted) else ""
    kept = ", ".join(f"{r.model} seed {r.seed} ({r.run_id})" for r in finished) or "none"
    return Interrupted(f"compare interrupted with {len(finished)} of {planned} runs finished ({kept}){stopped}. "
                       "Run the same command again to finish: it reuses the finished runs and trains the rest",
                       signal_name=getattr(exc, "signal_name", "SIGTERM" if exc.args == ("SIGTERM",) else "SIGINT"))


def compare_runs(refs: Sequence[str], *, runs_dir: str | os.PathLike | None = None, target: float | None = None,
                 mcnemar: bool = False, data_dir: str | None = None, verify: bool | None = None,
                 download: bool | None = None, device: str = "auto", trust_code: bool = False,
                 progress: bool | None = None) -> Comparison:
    """The comparison table of stored runs, from the run history alone (no training, no data needed), with each
    pair's accuracy difference over paired seeds. With `mcnemar` (or a `data_dir`) also McNemar's test of each
    pair's predictions: the runs' own stored predictions (`scoring.score_runs`; a run without them is evaluated
    from its checkpoint, and said so under `warnings`)."""
    check_target(target)
    runs = stored_runs(refs, runs_dir=runs_dir)
    correct, notes = None, []
    if mcnemar or data_dir is not None:
        scores = score_runs(runs, device=device, runs_dir=runs_dir, trust_code=trust_code, progress=progress,
                            data_dir=data_dir, verify=verify, download=download)
        correct, notes = scores.correct(), scores.notes
    return Comparison(results=summarise(runs, target), runs=runs, target=target, environment=environment(),
                      pairs=pairwise(runs, correct), warnings=[*notes, *run_warnings(runs)])


def pairwise(runs: Sequence[RunRecord], correct: dict[str, np.ndarray] | None = None) -> list[PairComparison]:
    """Every pair of the runs' models (as `group_runs` labels them): the difference of test accuracy over their
    common seeds with a 95% Student-t interval, and McNemar's exact test per seed where `correct` has both runs."""
    groups = group_runs(runs)
    accuracy = {label: {r.seed: r.test_accuracy for r in rs if r.test_accuracy is not None}
                for label, rs in groups.items()}
    per_example = None
    if correct:
        per_example = {label: {r.seed: correct[r.run_id] for r in rs if r.run_id in correct}
                       for label, rs in groups.items()}
    return pairwise_comparisons(accuracy, per_example)


def run_warnings(runs: Sequence[RunRecord]) -> list[str]:
    """One line per warning about a run's training (under-trained, near chance, diverged)."""
    lines = []
    for label, group in group_runs(runs).items():
        for run in group:
            classes = len(run.per_class_accuracy or []) or 10  # every data set cifarbench reads has 10 classes
            lines += [f"{label} seed {run.seed} ({run.run_id}): {w}" for w in training_warnings(run.history, classes)]
    return lines


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
    return train_run(config, runs_dir=runs_dir, dataset=_worker_datasets[key], progress=False).to_dict()


def _run_parallel(configs: Sequence[TrainConfig], jobs: int, runs_dir: str | os.PathLike | None,
                  on_run: Callable[[RunRecord], None] | None,
                  spelling: Spelling = as_keyword) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """Each config in a worker process: the finished runs, and the failures (model, seed, error)."""
    import concurrent.futures as cf
    import multiprocessing

    gpus = torch.cuda.device_count() if any(c.device in ("auto", "cuda") for c in configs) else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn: a fork of a process that already ran torch (threads, maybe CUDA) is not safe.
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(threads, gpus))
    runs, failures = [], []
    with pool:
        futures = {pool.submit(_worker_run, c, runs_dir): c for c in configs}
        for future in cf.as_completed(futures):
            config = futures[future]
            try:
                run = RunRecord.from_dict(future.result())
            except Exception as exc:  # a failed run (or a crashed worker) is reported; the rest go on
                failures.append({"model": config.model, "seed": config.seed, "error": f"{type(exc).__name__}: "
                                                                                      f"{spelled(exc, spelling)}"})
                continue
            runs.append(run)
            if on_run:
                on_run(run)
    return runs, failures
