"""Named recipes: a recipe turns a model name into the full `TrainConfig` it is trained with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from cifarbench.config import (
    AugmentConfig,
    DataConfig,
    LookaheadConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    check_field,
)
from cifarbench.errors import CifarbenchError
from cifarbench.models import get_model_spec
from cifarbench.models.reference import is_reference, resolve

_RECIPES: dict[str, Callable[[str], TrainConfig]] = {}


def register_recipe(name: str) -> Callable[[Callable[[str], TrainConfig]], Callable[[str], TrainConfig]]:
    def wrap(fn: Callable[[str], TrainConfig]) -> Callable[[str], TrainConfig]:
        _RECIPES[name] = fn
        return fn

    return wrap


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


@register_recipe("seed")
def seed_recipe(model: str) -> TrainConfig:
    """The notebook's training, faithfully: SGD lr 0.01, no momentum or decay, batch 100, no augmentation,
    inputs mapped to [-1, 1], fp32; 5 epochs for a fully connected net (the notebook's FNN loop) and 10 for
    everything else (its CNN loop)."""
    from cifarbench.models import is_fully_connected

    return TrainConfig(model=model, recipe="seed", epochs=5 if is_fully_connected(model) else 10, batch_size=100,
                       precision="fp32", data=DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                       optimizer=OptimizerConfig(lr=0.01))


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the CIFAR-10 training set
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@register_recipe("fast")
def fast_recipe(model: str) -> TrainConfig:
    """Speedrun-class training (after airbench94): batch 1024, Nesterov SGD, triangular learning rate, label
    smoothing 0.2, flip + 2-pixel translation with alternating flips, lookahead averaging, patch-whitening init,
    mirror+translate test-time augmentation, bf16 + channels-last. Each ingredient is a config switch. Under a
    CPU budget, speedrun's widths, batch, activation and optimiser (Muon for the filters) come from CPU_SPEEDRUN,
    and its final evaluation is selective TTA (CPU_TTA_THRESHOLD).

    airbench states its rates per 1024 examples for a summed loss; with our mean loss at batch 1024 its
    lr 11.5 / (1024 * (1 + 1/(1 - 0.85))) per example becomes 1.5 per step, and its weight decay 0.0153 per
    1024 examples becomes 0.0153 / 11.5 as PyTorch's (lr-coupled) weight_decay."""
    batch = 1024
    config = TrainConfig(
        model=model, recipe="fast", epochs=10, batch_size=batch, precision="auto", drop_last=True,
        label_smoothing=0.2, whiten=True, whiten_bias_fraction=0.3, tta=2, eval_batch_size=2000,
        data=DataConfig(mean=CIFAR_MEAN, std=CIFAR_STD),
        optimizer=OptimizerConfig(lr=1.5 * batch / 1024, momentum=0.85, nesterov=True, weight_decay=0.0153 / 11.5,
                                  bias_lr_scale=64.0),
        augment=AugmentConfig(flip=True, alternate_flip=True, translate=2),
        schedule=ScheduleConfig(kind="triangle", start=0.2, peak=0.23, end=0.07),
        lookahead=LookaheadConfig(enabled=True, start=0.3, every=5, decay_base=0.95, decay_pow=3.0))
    if model == "speedrun":
        return replace(config, model_kwargs={"widths": [64, 256, 256]})  # airbench94's, written out in the run
    # Conventional nets (trainable BatchNorm scales, ReLU, no whitening layer): the usual SGD settings,
    # scaled linearly to the batch size, with the same augmentation, schedule shape and TTA.
    batch, epochs = (512, 30) if model == "resnet18" else (256, 15)
    return replace(config, batch_size=batch, epochs=epochs, label_smoothing=0.1, whiten=False, tta=1,
                   optimizer=OptimizerConfig(lr=0.1 * batch / 128, momentum=0.9, nesterov=True, weight_decay=5e-4),
                   lookahead=LookaheadConfig(enabled=False))


@register_recipe("airbench94")
def airbench94_recipe(model: str) -> TrainConfig:
    """airbench94 as published, for the same-budget comparison: Keller Jordan, "94% on CIFAR-10 in 3.29 seconds
    on a single GPU" (arXiv:2404.00498) and airbench94.py in github.com/KellerJordan/cifar10-airbench: batch 1024,
    lr 11.5 per 1024 examples of a summed loss (1.5 per step of our mean loss, as in `fast_recipe`), momentum
    0.85 Nesterov, weight decay 0.0153, BatchNorm-bias lr x64, label smoothing 0.2, 9.9 epochs (10 here: whole
    epochs), widths 64-256-256, 2x2 patch-whitening init, flip + 2-pixel translation with alternating flips,
    lookahead, TTA level 2 over every image, evaluation in batches of 2000, bf16. Unlike the fast recipe it keeps
    these settings on any device: under `--budget` only the schedule's length is fitted."""
    if model != "speedrun":
        raise CifarbenchError(f"recipe 'airbench94' trains the speedrun net (airbench94's), not {model!r}")
    return replace(fast_recipe(model), recipe="airbench94")


CPU_BUDGET_SECONDS = 120.0
CPU_EVAL_BATCH = 256
"""Evaluation batch of the fast recipe on a CPU: airbench's 2000 suits a GPU, while on a CPU small batches keep
activations in cache, and the budget gives the time saved to training (docs/cpu-performance.md#evaluation-batch-256)."""


REFERENCE_IMAGES_PER_SECOND = 3200.0
"""Training images/s of the reference net (speedrun 32-64-256, batch 512, SiLU, bf16) in the loop on the machine
the table was tuned on (the AMD machine of docs/results.md: its 120 s runs took 694-715 steps of 512)."""
REFERENCE_TRAIN_FLOPS = 0.1649e9
"""Training FLOPs per image of the reference net (three forward passes, `evaluation.analysis.training_flops`)."""
PROBE_TO_LOOP = 1.0
"""The loop's images/s at a row's batch over the start-of-run probe's (`training.shape`, batch 128, plain SGD):
converts the probe into the loop's rate. A 30 s run measured 1.05 (docs/cpu-performance.md#shape-by-compute),
within the noise of a shared machine, so the probe's rate is taken as the loop's."""


def budget_compute(seconds: float, images_per_second: float = REFERENCE_IMAGES_PER_SECOND) -> float:
    """The training PFLOP of the reference net that `seconds` buy at `images_per_second`: the measure of compute
    the CPU_SPEEDRUN rows are keyed by."""
    return seconds * images_per_second * REFERENCE_TRAIN_FLOPS / 1e15


class CpuSpeedrun(NamedTuple):
    """speedrun's settings for CPU budgets that buy up to `up_to` PFLOP of the reference net's training."""

    up_to: float
    widths: tuple[int, int, int]
    batch: int
    muon_lr: float
    """The filters train with Muon at this rate; the other parameters keep the recipe's SGD."""
    act: str = "gelu"
    """The net's activation: SiLU is cheaper than GELU on a CPU, which pays at short budgets
    (docs/cpu-performance.md#silu)."""


# Chosen on a validation split (benchmarks/tune_budget.py; never the test set): short budgets want a narrow
# first block, small batches and SiLU, long ones width and GELU. Evidence: docs/cpu-performance.md#widths-per-budget.
# The rows were tuned at 45, 150 and 450 s on the AMD machine and are keyed by what those seconds bought there,
# so a slower processor gets the row tuned for the compute it can afford (docs/cpu-performance.md#shape-by-compute).
CPU_SPEEDRUN = (CpuSpeedrun(budget_compute(45.0), (32, 64, 128), 512, 0.15, "silu"),
                CpuSpeedrun(budget_compute(150.0), (32, 64, 256), 512, 0.15, "silu"),
                CpuSpeedrun(budget_compute(450.0), (48, 192, 384), 512, 0.15),
                CpuSpeedrun(float("inf"), (64, 256, 256), 1024, 0.2))

CPU_TTA_THRESHOLD = 0.6
"""Selective TTA under a CPU budget: only images whose plain prediction has a top-class probability below
this get the other five views. Chosen on the validation split with benchmarks/tta_threshold.py: about as
accurate as full TTA in under half its time (docs/cpu-performance.md#selective-tta)."""


def cpu_speedrun_for_compute(pflop: float) -> CpuSpeedrun:
    """speedrun's widths, batch size and Muon rate for a CPU budget that buys `pflop` of reference training."""
    return next(row for row in CPU_SPEEDRUN if pflop <= row.up_to)


def cpu_speedrun_settings(budget: float) -> CpuSpeedrun:
    """The row for a CPU run of `budget` seconds on the reference machine (what a config names before its run
    measures this machine; `shape_by_compute` then re-picks)."""
    return cpu_speedrun_for_compute(budget_compute(budget))


def with_cpu_row(config: TrainConfig, row: CpuSpeedrun) -> TrainConfig:
    """`config` (a budgeted fast-recipe speedrun) with the shape, batch and Muon rate of `row`; the SGD rate is
    per example (airbench's convention), so it scales with the batch."""
    optimizer = replace(config.optimizer, name="muon", muon_lr=row.muon_lr,
                        lr=config.optimizer.lr * row.batch / config.batch_size)
    return replace(config, model_kwargs={"widths": list(row.widths), "act": row.act}, batch_size=row.batch,
                   optimizer=optimizer)


def shape_by_compute(config: TrainConfig, images_per_second: float) -> tuple[TrainConfig, dict]:
    """The config with the CPU_SPEEDRUN row for the compute its budget buys at `images_per_second` (the start-of-run
    probe's reference-net rate), and the choice with its inputs, as the run records it."""
    loop_rate = images_per_second * PROBE_TO_LOOP
    pflop = budget_compute(config.budget_seconds, loop_rate)
    row = cpu_speedrun_for_compute(pflop)
    chosen = with_cpu_row(config, row)
    return chosen, {"by": "compute", "probe_images_per_second": images_per_second,
                    "expected_images_per_second": loop_rate, "expected_pflop": pflop,
                    "reference_seconds": pflop / budget_compute(1.0),
                    "row": {"up_to_pflop": row.up_to, "widths": list(row.widths), "batch": row.batch,
                            "act": row.act, "muon_lr": row.muon_lr},
                    "nominal_widths": list(config.model_kwargs.get("widths", []))}


def make_config(model: str, recipe: str | None = None, **overrides) -> TrainConfig:
    """The recipe's config for `model` (the model's default recipe when None), with `overrides` applied.

    `overrides` may name TrainConfig fields, and `dataset`, `data_dir`, `verify`, `download`, `permute_pixels` for
    the data config.
    None values are ignored, so CLI flags that were not given leave the recipe alone. Recipes that differ by
    device (the fast recipe is budgeted on a CPU) take the device from `device`: pass the resolved one
    (`device.resolve_device`); with "auto" a config is the same on every machine and gets no CPU settings.
    """
    own = is_reference(model)
    name = recipe or ("seed" if own else get_model_spec(model).default_recipe)
    if name not in _RECIPES:
        raise CifarbenchError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
    if own:  # your own model: its code now, whose sha256 the run records (and whose copy it keeps)
        overrides.setdefault("model_sha256", resolve(model).sha256)
    config = _RECIPES[name](model)
    data_keys = {"dataset", "data_dir", "verify", "download", "permute_pixels"}
    # Checked before the recipe computes with them (a NaN budget picks no CPU row, a zero batch scales the lr
    # to zero), so a refusal names the override itself.
    given = {k: check_field(DataConfig if k in data_keys else TrainConfig, k, v) for k, v in overrides.items()
             if v is not None}
    if name == "fast" and str(given.get("device", config.device)) == "cpu":
        if "epochs" not in given and "budget_seconds" not in given:
            # A GPU runs the fast recipe's 10 epochs in seconds, a CPU in many minutes: there the recipe is
            # "the best model in CPU_BUDGET_SECONDS" unless the user asks for epochs or another budget.
            given["budget_seconds"] = CPU_BUDGET_SECONDS
        given.setdefault("eval_batch_size", CPU_EVAL_BATCH)
        if model == "speedrun" and "model_kwargs" not in given and given.get("budget_seconds"):
            row = cpu_speedrun_settings(given["budget_seconds"])
            given["model_kwargs"] = {"widths": list(row.widths), "act": row.act}
            if "batch_size" not in given:
                # The row named here is the reference machine's; the run re-picks it from this machine's
                # measured throughput when it starts (running.train_run), since make_config measures nothing.
                given.setdefault("budget_shape", "compute")
            given.setdefault("batch_size", row.batch)
            given.setdefault("tta_threshold", CPU_TTA_THRESHOLD)
            config = replace(config, optimizer=replace(config.optimizer, name="muon", muon_lr=row.muon_lr))
    if name == "fast" and given.get("batch_size", config.batch_size) != config.batch_size and "optimizer" not in given:
        # The fast recipe's rates are per example (airbench's convention): the step's rate scales with the batch.
        given["optimizer"] = replace(config.optimizer, lr=config.optimizer.lr * given["batch_size"] / config.batch_size)
    if given.get("budget_seconds"):
        # A budgeted run spends its time on training: one evaluation, at the end, unless asked otherwise.
        given.setdefault("eval_every_epoch", False)
    data = replace(config.data, **{k: given.pop(k) for k in list(given) if k in data_keys})
    return replace(config, data=data, **given)


def with_optimizer(config: TrainConfig, name: str) -> TrainConfig:
    """The config trained with optimiser `name` at the recipe's default settings for it (what `--optimizer`
    does; `--lr` then overrides the rate). sgd and muon keep the recipe's SGD settings. adam and adamw use the
    rate 1e-3 (Kingma & Ba's default, which also suits the notebook's small nets at batch 100), BatchNorm
    parameters at the same rate, and for adamw a decoupled weight decay of 0.05 (x the rate per step)."""
    if name in ("sgd", "muon"):
        return replace(config, optimizer=replace(config.optimizer, name=name))
    return replace(config, optimizer=OptimizerConfig(name=name, lr=1e-3, weight_decay=0.05 if name == "adamw" else 0.0))


def config_for(model: str, *, recipe: str | None = None, seed: int = 0, device: str = "auto",
               optimizer: str | None = None, lr: float | None = None, widths: list[int] | None = None,
               set: dict | None = None, **overrides) -> TrainConfig:  # noqa: A002 - the --set flag's name
    """The config a run of `model` trains with, as the CLI and the Python API ask for it: the recipe's, on the
    device resolved now (so the config records the one it runs on), with the optimiser's recipe settings,
    then `lr`, speedrun's `widths` and any `set` changes (dotted field names, validated like the rest)."""
    from cifarbench.device import resolve_device

    if widths is not None:
        overrides["model_kwargs"] = {"widths": list(widths)}
    config = make_config(model, recipe, seed=seed, device=str(resolve_device(device)), **overrides)
    if optimizer:
        config = with_optimizer(config, optimizer)
    return config.with_changes({**({"optimizer.lr": lr} if lr is not None else {}), **(set or {})})
