"""Running a training: start a run (its folder, its history row, the loop) or resume a stopped one."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from cifarbench import runtime
from cifarbench.config import DataConfig, TrainConfig
from cifarbench.data import ImageDataset, fit_normalisation, load_dataset, prepare
from cifarbench.device import describe_device, resolve_device
from cifarbench.errors import CifarbenchError, Interrupted, Keyword, Spelling, as_keyword
from cifarbench.evaluation.analysis import cost_of, training_flops
from cifarbench.fsutil import atomic_write_text
from cifarbench.models.reference import code_of, label, load_run_code
from cifarbench.models.registry import check_foreign_model
from cifarbench.provenance import environment
from cifarbench.runs import folders
from cifarbench.runs.predictions import write_predictions
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore
from cifarbench.training import distributed as ddp
from cifarbench.training.estimate import RunEstimate, estimate, worth_estimating
from cifarbench.training.loop import (
    TrainResult,
    build_model,
    check_settings,
    low_res_side,
    split_validation,
    steps_in_epoch,
    train,
)
from cifarbench.training.recipes import shape_by_compute
from cifarbench.training.shape import ThreadWatch, probe_throughput
from cifarbench.training.state import EpochMetrics, RunCheckpoint


def train_run(config: TrainConfig | None = None, *, runs_dir: str | os.PathLike | None = None,
              dataset: ImageDataset | None = None, progress: bool | None = None,
              on_epoch: Callable[[EpochMetrics], None] | None = None, resume: str | None = None,
              data: DataConfig | None = None, trust_code: bool = False, started: float | None = None,
              spelling: Spelling = as_keyword, run_id: str | None = None, score_test: bool = True) -> RunRecord:
    """Train one run end to end: its folder (config, checkpoint, metrics) and its row in the run history.

    With `resume` (a run id, run folder or checkpoint in `runs_dir`), continue that run from its last checkpoint
    under its own config and id instead (`data` may say where its data is now): the result is the same, bit for
    bit on CPU, as if it had never stopped. A non-zero torchrun rank returns a record without a run folder.
    An own model is rebuilt from the run's copy of its code; for a run imported from elsewhere that code runs
    only with `trust_code`. `started` (a time.perf_counter() value) is when a budget's clock started, if before
    this call (the CLI: when its process started). `spelling` names options in what the run says (the CLI's flags,
    the API's keywords).

    `run_id` names a new run (a Ray task trains under the id its driver chose, so the bundle it returns can be
    checked against it); without `score_test` the test set is never evaluated (a tuning trial).
    """
    runtime.configure()
    saved = None
    if resume is not None:
        saved, config = _resumable(resume, runs_dir, trust_code)
        config = replace(config, data=data) if data is not None else config
    if config is None:
        raise CifarbenchError("train_run needs a config or a run to resume")
    requested = resolve_device(config.device)
    check_settings(config, requested)  # before the run is recorded
    world, device = ddp.setup(requested)
    finished = False
    threads = torch.get_num_threads()  # a budget's probe may pick fewer for this run; the caller keeps its own
    try:
        record = _train(config, world, device, saved, runs_dir=runs_dir, dataset=dataset, progress=progress,
                        on_epoch=on_epoch, started=started, spelling=spelling, run_id=run_id,
                        score_test=score_test)
        finished = True
        return record
    finally:
        torch.set_num_threads(threads)
        ddp.teardown(world, finished=finished)


def budget_start(config: TrainConfig, dataset: ImageDataset | None = None, started: float | None = None,
                 spelling: Spelling = as_keyword) -> tuple[TrainConfig, float, dict, dict, dict]:
    """The start of a budgeted CPU run: its clock starts, a short probe of this machine picks the precision and
    memory layout (written into the config the run trains and records), the thread count, and measures
    throughput; speedrun's shape is re-picked for the compute that buys (`budget_shape` "compute"). The net
    probed is the reference net when the shape is re-picked, else the config's own model (on `dataset`'s
    shape). Returns the config to train, the clock's start, the probe, the shape choice and the precision choice
    as recorded. `started`: when the clock started, if earlier than now."""
    started = time.perf_counter() if started is None else started
    own = None
    if config.budget_shape != "compute" and dataset is not None:
        def own() -> torch.nn.Module:
            return build_model(config, dataset, torch.device("cpu"))
    shape_of = dataset.image_shape if dataset is not None else (3, 32, 32)
    throughput = probe_throughput(requested=config.precision, deterministic=config.deterministic, model=own,
                                  in_shape=shape_of, classes=len(dataset.classes) if dataset is not None else 10,
                                  budget=config.budget_seconds)
    kernels = throughput.kernels
    config = replace(config, precision=kernels.precision, channels_last=kernels.channels_last)
    slowdown = kernels.slowdown()
    if kernels.requested == "bf16" and not kernels.native_bf16 and slowdown and slowdown > 1:
        note(f"{spelling(Keyword('precision', 'bf16'))} on a CPU without native bf16: its steps measured "
             f"{slowdown:.1f}x slower than fp32 here ({torch.backends.cpu.get_cpu_capability()}); "
             f"{spelling(Keyword('precision', 'auto'))} would train in fp32")
    probe = throughput.to_dict()
    probe.pop("kernels")  # recorded on its own, as `budget.precision`
    shape = {"by": "config", "widths": config.model_kwargs.get("widths")}
    if config.budget_shape == "compute":
        config, shape = shape_by_compute(config, throughput.images_per_second)
    return config, started, probe, shape, kernels.to_dict()


def resumable_config(ref: str, runs_dir: str | os.PathLike | None = None, trust_code: bool = False) -> TrainConfig:
    """The config of a stopped run that `train_run(resume=ref)` would continue (refused when it cannot)."""
    return _resumable(ref, runs_dir, trust_code)[1]


def _resumable(ref: str, runs_dir: str | os.PathLike | None, trust_code: bool) -> tuple[RunCheckpoint, TrainConfig]:
    """The checkpoint of a stopped run in the runs folder, and its config; refused when there is nothing to do."""
    with RunStore(runs_dir) as store:
        run = store.get_run(ref)
    folder = folders.run_folder(runs_dir, run["id"])
    saved = RunCheckpoint.load(folder / folders.CHECKPOINT)
    if saved.training is None:
        raise CifarbenchError(f"run {saved.run_id}: its checkpoint has no training state to resume from")
    if saved.run_id != run["id"]:
        raise CifarbenchError(f"run {run['id']}: its checkpoint belongs to run {saved.run_id!r}")
    if saved.training.position.finished:
        raise CifarbenchError(f"run {saved.run_id} already finished; nothing to resume")
    config = TrainConfig.from_dict(saved.config)
    own = run.get("origin") is None
    if not own:  # a run from elsewhere: data never names code, and its settings never choose local data
        if config.model != saved.model:
            raise CifarbenchError(f"run {saved.run_id}: its checkpoint names model {saved.model!r} but its config "
                                  f"{config.model!r}; refusing a run that does not agree with itself")
        check_foreign_model(config.model, config.model_sha256, source=f"run {saved.run_id!r}")
        config = replace(config, data=config.data.for_loading(foreign=True))
    if config.model_sha256:  # the run's own copy of its code; someone else's only with consent
        load_run_code(folder, config.model, config.model_sha256, trusted=own or trust_code)
    return saved, config


def _train(config: TrainConfig, world: ddp.DistEnv, device: torch.device, saved: RunCheckpoint | None, *,
           runs_dir: str | os.PathLike | None, dataset: ImageDataset | None, progress: bool | None,
           on_epoch: Callable[[EpochMetrics], None] | None, started: float | None = None,
           spelling: Spelling = as_keyword, run_id: str | None = None, score_test: bool = True) -> RunRecord:
    requested = config.to_dict()  # as asked, before the run adapts it: what `compare` finds a finished run by
    # Under torchrun only rank 0 downloads (and shows progress); the others wait for its files (data.download).
    dataset = dataset or load_dataset(config.data, progress=progress if world.is_main else False)
    dataset = prepare(dataset, config.data)  # e.g. the permuted-pixels experiment's scrambled images
    config = replace(config, data=fit_normalisation(config.data, dataset.image_shape[0]))  # e.g. 0.5/0.5 on MNIST
    training, weights = (saved.training, saved.state_dict) if saved is not None else (None, None)
    if not world.is_main:  # the other ranks train their shares; rank 0 alone writes the run
        result = train(config, dataset, device, progress=False, resume=training, resume_weights=weights, world=world)
        return RunRecord(run_id="", model=config.model, recipe=config.recipe, seed=config.seed, epochs=config.epochs,
                         test_accuracy=result.final.accuracy if result.final else None, world_size=world.world_size)
    probe, shape, precision = None, None, None
    if config.budget_seconds and device.type == "cpu" and saved is None and not world.enabled:
        config, started, probe, shape, precision = budget_start(config, dataset, started, spelling)
    else:
        started = None  # only a budget counts what came before the run
    config, model = preflight(config, dataset)  # before anything is written: a refusal leaves nothing behind
    cost = cost_of(model, dataset.image_shape)
    record = RunRecord(run_id="", model=config.model, recipe=config.recipe, seed=config.seed, epochs=config.epochs,
                       status="running", params=cost.params, flops_per_image=cost.flops_per_image,
                       device=describe_device(device), world_size=world.world_size, dataset=dataset.info(),
                       config=config.to_dict(), environment=environment())
    if saved is None and not world.enabled and worth_estimating(config, len(dataset.train) - config.val_split):
        record.estimate = _estimate(config, dataset, device, model, record, probe)
        if progress is not False and record.estimate is not None:
            note(record.estimate.line(label(config.model), spelling), prefix="")
    store = RunStore(runs_dir)
    try:
        if saved is not None:
            record.run_id = saved.run_id
            if saved.dataset["sha256"] != dataset.sha256:
                raise CifarbenchError("run {run} was trained on data with fingerprint {saved}..., not this copy "
                                      "({here}...); point {data_dir} at the same data", run=saved.run_id,
                                      saved=saved.dataset["sha256"][:12], here=dataset.sha256[:12],
                                      data_dir=Keyword("data_dir", ...))
            store.reopen_run(saved.run_id)
        else:
            record.run_id = folders.check_run_id(run_id) if run_id else folders.new_run_id(label(config.model),
                                                                                              config.seed)
        run_dir = folders.run_folder(runs_dir, record.run_id)
        record.run_dir = str(run_dir)
        if saved is None:
            _start(store, record, run_dir, requested)
        return _loop(config, dataset, device, world, record, store, run_dir, model, training, weights, progress,
                     on_epoch, started, probe, shape, precision, resume=resume_command(record.run_id, runs_dir),
                     score_test=score_test)
    finally:
        store.close()


def _estimate(config: TrainConfig, dataset: ImageDataset, device: torch.device, model: torch.nn.Module,
              record: RunRecord, probe: dict | None) -> RunEstimate | None:
    """The run's cost before it starts (`estimate.estimate`): the budget's probe reused, else a few steps timed.
    None where the timed steps fail: the estimate is advice, and the run's own steps say what fails in its words."""
    train_images = len(dataset.train) - config.val_split
    try:
        return estimate(model, config, device, in_shape=dataset.image_shape, classes=len(dataset.classes),
                        params=record.params, flops_per_image=record.flops_per_image, train_images=train_images,
                        test_images=len(dataset.test), steps_per_epoch=steps_in_epoch(train_images, config),
                        probe=probe)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def preflight(config: TrainConfig, dataset: ImageDataset) -> tuple[TrainConfig, torch.nn.Module]:
    """Everything that can be refused before a run is recorded: the validation split, the model (it builds, and
    maps a batch to one score per class), progressive resizing's small images. A model that cannot take the
    channels-last layout (it calls `.view` on a feature map) is trained in the standard layout, with a note.
    Returns the config to train and the model built on the CPU (what its cost is counted from)."""
    split_validation(dataset.train, config.val_split)
    model = build_model(config, dataset, torch.device("cpu"))
    ref, classes = config.model, len(dataset.classes)
    x = (torch.rand(2, *dataset.image_shape) - 0.5) * 2

    def forward(images: torch.Tensor, layout: bool) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(images.contiguous(memory_format=torch.channels_last) if layout else images)

    try:
        out = forward(x, config.channels_last)
    except Exception as first:
        if not config.channels_last:
            raise CifarbenchError(f"model {ref!r} fails on a batch of {tuple(x.shape)} images "
                                  f"({type(first).__name__}: {_line(first)})") from None
        model = model.to(memory_format=torch.contiguous_format)
        try:
            out = forward(x, False)
        except Exception:
            raise CifarbenchError(f"model {ref!r} fails on a batch of {tuple(x.shape)} images "
                                  f"({type(first).__name__}: {_line(first)})") from None
        note(channels_last_note(ref, first))
        config = replace(config, channels_last=False)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CifarbenchError(f"model {ref!r} maps a batch of 2 images to {shape}; it must give (batch, {classes}): "
                              "one score per class")
    low = low_res_side(config, min(dataset.image_shape[1:]))
    if low:
        try:
            forward(x[:, :, :low, :low], config.channels_last)
        except Exception as exc:
            raise CifarbenchError(f"low_res={low}: model {ref!r} cannot take {low}x{low} images "
                                  f"({type(exc).__name__}: {_line(exc)[:120]})") from None
    model.train()
    return config, model


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def channels_last_note(ref: str, error: BaseException) -> str:
    """Why a model trains in the standard layout, as whole sentences: `.view` on a feature map (the usual cause)
    is named with its fix, any other error by its first sentence."""
    fallback = "so it trains in the standard layout (recorded as channels_last=false)"
    if "view size is not compatible" in str(error):
        return (f"model {ref!r} calls .view on a feature map, which the channels-last layout does not allow, "
                f"{fallback}; write x.flatten(1) instead of x.view(x.size(0), -1) to train it channels-last "
                "(faster).")
    return f"model {ref!r} fails on the channels-last layout, {fallback}: {_first_sentence(_line(error))}"


def _first_sentence(text: str, limit: int = 160) -> str:
    """`text` up to the end of its first sentence, or to its last whole word within `limit` characters, with a
    bracket the cut left open left out."""
    end = text.find(". ")
    cut = text[:end + 1] if 0 <= end < limit else text
    if len(cut) > limit:
        cut = cut[:limit].rsplit(" ", 1)[0] + " ..."
    while cut.count("(") > cut.count(")"):
        cut = cut[:cut.rindex("(")].rstrip() + " ..."
    return cut


def note(message: str, prefix: str = "note: ") -> None:
    """Tell the user something about their run that is not an error, in one line where progress goes (stderr from
    a script, the cell's output in a notebook: not an error's pink)."""
    from cifarbench.progress import progress_stream

    print(f"{prefix}{message}", file=progress_stream(), flush=True)


def _epochs_saved(run_dir: Path) -> int:
    """Epochs the run's checkpoint holds (0 before the first)."""
    try:
        saved = RunCheckpoint.load(run_dir / folders.CHECKPOINT)
    except (CifarbenchError, OSError):
        return 0
    return len(saved.training.history) if saved.training else 0


def resume_command(run_id: str, runs_dir: str | os.PathLike | None) -> str:
    """The command that continues a stopped run, with the runs folder when it is not the default."""
    return f"cifarbench train --resume {run_id}" + (f" --runs-dir {runs_dir}" if runs_dir else "")


def _start(store: RunStore, record: RunRecord, run_dir: Path, requested: dict) -> None:
    """The run's folder with its config.json (the config as run, and as requested; and its model's code), and its
    history row: both or neither."""
    estimate = record.estimate.to_dict() if record.estimate is not None else None
    folders.write_json(run_dir / folders.CONFIG, {"run_id": record.run_id, "config": record.config,
                                                  "requested": requested, "dataset": record.dataset,
                                                  "device": record.device, "estimate": estimate,
                                                  **record.environment})
    sha = record.config.get("model_sha256")
    if sha:
        atomic_write_text(run_dir / folders.MODEL_CODE, code_of(sha))
    try:
        store.start_run(record, model_sha256=sha)
    except BaseException:
        folders.delete_run_folder(run_dir, record.run_id)
        raise


def _loop(config: TrainConfig, dataset: ImageDataset, device: torch.device, world: ddp.DistEnv, record: RunRecord,
          store: RunStore, run_dir: Path, model: torch.nn.Module, training, weights, progress: bool | None,
          on_epoch: Callable[[EpochMetrics], None] | None, started: float | None = None, probe: dict | None = None,
          shape: dict | None = None, precision: dict | None = None, resume: str = "",
          score_test: bool = True) -> RunRecord:
    def checkpoint(result: TrainResult) -> None:
        RunCheckpoint(run_id=record.run_id, model=config.model, classes=list(dataset.classes),
                      in_shape=dataset.image_shape, config=record.config, dataset=record.dataset,
                      state_dict=result.model.state_dict(), environment=record.environment,
                      training=result.state()).save(run_dir / folders.CHECKPOINT)

    def after_epoch(metrics: EpochMetrics, result: TrainResult) -> None:
        store.add_epoch(record.run_id, metrics)
        checkpoint(result)  # every epoch: a crash loses at most one epoch
        if on_epoch:
            on_epoch(metrics)

    watch = None
    if probe is not None:  # the probe chose the threads against the processes running then: re-checked as it goes
        watch = ThreadWatch(probe["most_threads"])
        watch.busy = probe["others_running"]
    try:
        result = train(config, dataset, device, on_epoch=after_epoch, on_interrupt=checkpoint, progress=progress,
                       resume=training, resume_weights=weights, world=world, started=started, threads=watch,
                       score_test=score_test)
    except KeyboardInterrupt as exc:
        signal_name = "SIGTERM" if exc.args == ("SIGTERM",) else "SIGINT"
        why = "stopped by SIGTERM (a timeout or a shutdown)" if signal_name == "SIGTERM" else "interrupted"
        done = _epochs_saved(run_dir)
        store.finish_run(record.run_id, "interrupted", error=f"{why}; `{resume}` continues it")
        raise Interrupted(f"run {record.run_id} {why} after {done} of {config.epochs} epochs; its checkpoint "
                          f"({run_dir / folders.CHECKPOINT}) is kept: `{resume}` continues it",
                          signal_name=signal_name) from None
    except BaseException as exc:
        store.finish_run(record.run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    assert result.final is not None or not score_test
    final = result.final
    side = min(dataset.image_shape[1:])
    record.status = "completed"
    if final is not None:  # a tuning trial never touches the test set
        record.test_accuracy, record.test_loss = final.accuracy, final.loss
        record.per_class_accuracy, record.confusion = final.per_class_accuracy, final.confusion
    record.train_seconds, record.wall_seconds, record.steps = result.train_seconds, result.wall_seconds, result.steps
    record.history = result.history
    record.budget = result.budget
    if record.budget is not None:
        record.budget.probe, record.budget.shape, record.budget.precision = probe, shape, precision
    record.train_flops = training_flops(model, dataset.image_shape, result.position.images,
                                        low_res_side(config, side), result.position.low_images)
    if final is not None and final.predictions is not None and final.confidences is not None:  # paired tests reuse
        write_predictions(run_dir, final.predictions, dataset.test.labels, final.confidences,
                          dataset_sha256=dataset.sha256, tta=result.final_tta[0], tta_threshold=result.final_tta[1],
                          classes=len(dataset.classes))
    folders.write_json(run_dir / folders.METRICS, record.to_dict())
    store.finish_run(record.run_id, "completed", record=record)
    return record
