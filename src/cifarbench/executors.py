"""Where runs go besides this process: a Ray cluster (`--executor ray`), one task per training or grading.

A task never writes the driver's run store: it trains into a folder of its own on its node, exports the run as a
bundle (runs export's format) and returns its bytes; the driver imports it under the id it chose before launching
the task, and only if the bundle holds exactly that run of exactly the config sent (bundle.import_launched_run).
So an imported run counts as the user's own (the driver launched it) and nothing else a worker returns can.
Evidence and cluster setup: docs/distributed.md#ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cifarbench.config import TrainConfig
from cifarbench.errors import CifarbenchError, Keyword, Spelling, as_keyword, spelled
from cifarbench.runs.records import RunRecord

EXECUTORS = ("local", "ray")
RETRIES = 1
"""A task whose worker process dies (killed, out of memory, its node lost) is run once more, then reported."""


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, or an address without Ray, before anything runs."""
    if executor not in EXECUTORS:
        raise CifarbenchError("{option} {executor!r}: choose one of {choices}", option=Keyword("executor"),
                              executor=executor, choices=", ".join(EXECUTORS))
    if address is not None and executor != "ray":
        raise CifarbenchError("{address} names a Ray cluster: use it with {ray}", address=Keyword("address"),
                              ray=Keyword("executor", "ray"))
    if executor == "ray":
        require("ray", "ray", Keyword("executor", "ray"))


def require(module: str, extra: str, what: str | Keyword) -> None:
    """One line naming the extra to install when an optional dependency is missing (`what` needs it: a command,
    or an option spelled as the caller spells it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise CifarbenchError("{what} needs {module}, which is not installed: pip install -e '.[{extra}]' in the "
                              "cifarbench folder",
                              what=what, module=module, extra=extra)


def connect(address: str | None = None) -> Any:
    """The ray module, connected: to the cluster at `address`, to a Ray this process already started (tests'
    `ray.init(num_cpus=2)`), or to a new local one."""
    require("ray", "ray", Keyword("executor", "ray"))
    import ray

    if not ray.is_initialized():
        # MKL reads MKL_CBWR at its first call: the workers need it from the start (runtime.py).
        env = {k: os.environ[k] for k in ("MKL_CBWR", "CIFARBENCH_DATA") if k in os.environ}
        # A Ray of our own listens on this machine alone: a Ray node runs any task it is sent.
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": env}, **local)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CifarbenchError(f"could not reach a Ray cluster at {address or 'a new local one'}: "
                                  f"{_line(exc)}") from None
    return ray


def task_resources(ray: Any, config: TrainConfig, threads: int) -> dict[str, float]:
    """What one training task asks the cluster for: a GPU where the cluster has one and the run may use it,
    otherwise the CPUs whose threads it will use."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and config.device in ("auto", "cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    # Never more than the largest node has: such a task would wait forever (e.g. a 2-CPU test cluster on a
    # machine with more cores). The run still uses `threads` threads, so its result does not change.
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return {"num_cpus": max(1, min(threads, int(largest) or 1))}


def _line(exc: BaseException, spelling: Spelling = as_keyword) -> str:
    return " ".join(spelled(exc, spelling).split())[:300] or type(exc).__name__


def failure_line(exc: BaseException, spelling: Spelling = as_keyword) -> str:
    """A failed task in one line: a dead worker says it was retried; a run's own error keeps its message, the
    options it names spelled by `spelling` (the error crossed from the worker with its parts)."""
    cause = getattr(exc, "cause", None)
    if type(exc).__name__ in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ActorDiedError"):
        return f"its Ray worker died (tried {RETRIES + 1} times): {type(exc).__name__}"
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_line(cause, spelling)}"
    return f"{type(exc).__name__}: {_line(exc, spelling)}"


_task_datasets: dict[str, Any] = {}  # a worker process loads each data set once, not once per task


def train_task(config: dict, run_id: str, threads: int, cwd: str, score_test: bool,
               model_code: str | None) -> bytes:
    """One training in a Ray worker: trains into a folder of its own and returns the run as bundle bytes. An own
    model's code travels with the task (the driver's copy, checked against the config's sha256), so a node needs
    cifarbench and the data, not the user's files."""
    import json

    import torch

    from cifarbench.data import load_dataset
    from cifarbench.models.reference import code_sha256, run_code
    from cifarbench.running import train_run
    from cifarbench.runs.bundle import export_runs

    torch.set_num_threads(threads)
    if os.path.isdir(cwd):  # relative data folders mean what they meant to the driver (on its own machine)
        os.chdir(cwd)
    train_config = TrainConfig.from_dict(config)
    if train_config.model_sha256:
        if model_code is None or code_sha256(model_code) != train_config.model_sha256:
            raise CifarbenchError(f"model {train_config.model!r}: its code did not arrive with the task")
        run_code(model_code, train_config.model.rpartition(":")[0])
    key = json.dumps(asdict(train_config.data), sort_keys=True)
    if key not in _task_datasets:
        _task_datasets[key] = load_dataset(train_config.data, progress=False)
    folder = Path(tempfile.mkdtemp(prefix="cifarbench-task-"))
    try:
        train_run(train_config, runs_dir=folder, dataset=_task_datasets[key], progress=False, run_id=run_id,
                  score_test=score_test)
        return export_runs([run_id], folder / "run.tar.gz", runs_dir=folder).read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def train_on_ray(configs: Sequence[TrainConfig], jobs: int, runs_dir: str | os.PathLike | None,
                 on_run: Callable[[RunRecord], None], *, address: str | None = None, score_test: bool = True,
                 on_launch: Callable[[TrainConfig, str], None] | None = None,
                 spelling: Spelling = as_keyword) -> list[dict[str, Any]]:
    """Each config as one Ray task with the thread count the local pool would give it (so a seed's accuracy is
    the same under either executor); each finished run is imported (`on_run` hears of it) as it arrives.
    Returns the failures (model, seed, error). On Ctrl-C the outstanding tasks are cancelled; what finished is
    stored already."""
    from cifarbench.models.reference import code_of
    from cifarbench.runs import folders
    from cifarbench.runs.bundle import import_launched_run

    ray = connect(address)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    remote = ray.remote(train_task)
    pending: dict[Any, tuple[TrainConfig, str]] = {}
    for config in configs:
        run_id = folders.new_run_id(_label(config.model), config.seed)
        if on_launch:
            on_launch(config, run_id)
        ref = remote.options(max_retries=RETRIES, **task_resources(ray, config, threads)).remote(
            config.to_dict(), run_id, threads, os.getcwd(), score_test,
            code_of(config.model_sha256) if config.model_sha256 else None)
        pending[ref] = (config, run_id)
    failures: list[dict[str, Any]] = []
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            config, run_id = pending.pop(ref)
            try:
                archive = _bundle_file(ray.get(ref), runs_dir)
                try:
                    record = import_launched_run(archive, run_id=run_id, requested=config.to_dict(),
                                                 runs_dir=runs_dir)
                finally:
                    archive.unlink(missing_ok=True)
            except Exception as exc:  # a failed run (or a dead worker, after its retry) is one line; the rest go on
                failures.append({"model": config.model, "seed": config.seed, "run_id": run_id,
                                 "error": failure_line(exc, spelling)})
                continue
            on_run(record)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return failures


def _label(model: str) -> str:
    from cifarbench.models.reference import label

    return label(model)


def _bundle_file(data: bytes, runs_dir: str | os.PathLike | None) -> Path:
    """A task's bundle as a file in the runs folder (what the import reads), written privately."""
    from cifarbench.runs.folders import resolve_runs_dir

    root = resolve_runs_dir(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".task-", suffix=".tar.gz", dir=root)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return Path(name)


def grade_on_ray(archives: Sequence[Path], data: Any, hidden: Any, *, grade: Callable[..., list[Any]],
                 failed: Callable[[str, str], Any], box: Any, device: str, bundle_limits: Any,
                 private: Sequence[Path], address: str | None = None,
                 spelling: Spelling = as_keyword) -> list[list[Any]]:
    """Each submission graded by one Ray task running `grade` (classroom.grade_task: the same box and limits
    inside the task); the rows of each, in the archives' order. A submission that cannot be sent, or whose
    worker died twice, is one row saying so: `failed(archive name, reason)`."""
    ray = connect(address)
    data_ref = ray.put(data)
    hidden_ref = ray.put(hidden)
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus and device in ("auto", "cuda") else {"num_cpus": 1}
    remote = ray.remote(_grade_in_task)
    refs: list[Any] = []
    for archive in archives:
        try:
            content = _read_archive(archive, bundle_limits)
        except CifarbenchError as exc:  # as the local grading says it, from the same bounded read
            refs.append([failed(archive.name, exc.spelled(spelling))])
            continue
        refs.append(remote.options(max_retries=RETRIES, **resources).remote(
            grade, content, str(archive), data_ref, hidden_ref,
            (box.isolation, box.limits) if box is not None else None, device, bundle_limits, [str(p) for p in private],
            spelling))
    out: list[list[Any]] = []
    try:
        for archive, ref in zip(archives, refs, strict=True):
            if isinstance(ref, list):
                out.append(ref)
                continue
            try:
                out.append(ray.get(ref))
            except Exception as exc:
                out.append([failed(archive.name, f"could not be graded ({failure_line(exc, spelling)})")])
    except BaseException:
        for ref in refs:
            if not isinstance(ref, list):
                ray.cancel(ref, force=True)
        raise
    return out


def _read_archive(archive: Path, bundle_limits: Any) -> bytes:
    """A submission's bytes, read with the cap its import would apply."""
    from cifarbench.fsutil import open_regular_file
    from cifarbench.runs.bundle import MAX_MANIFEST_BYTES
    from cifarbench.runs.limits import BundleLimits

    limits = bundle_limits or BundleLimits()
    with open_regular_file(archive, limits.max_bytes + MAX_MANIFEST_BYTES, "runs archive",
                           error=CifarbenchError) as f:
        return f.read()


def _grade_in_task(grade: Callable[..., list[Any]], archive: bytes, name: str, data: Any, hidden: Any, box: Any,
                   device: str, bundle_limits: Any, private: list[str], spelling: Spelling) -> list[Any]:
    import torch

    torch.set_num_threads(1)  # the task asked the cluster for one CPU
    return grade(archive, name, data, hidden, box=box, device=device, bundle_limits=bundle_limits,
                      private=private, spelling=spelling)
