"""The fast recipe's ingredients: whitening, augmentation, schedule, lookahead, TTA, budgets, validation split."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from cifarbench.config import AugmentConfig, LookaheadConfig, ScheduleConfig
from cifarbench.data.augment import Augmenter, translate
from cifarbench.data.cifar10 import load_cifar10
from cifarbench.evaluation.metrics import predict_logits
from cifarbench.models import create_model
from cifarbench.training.budget import StepPlan
from cifarbench.training.lookahead import Lookahead
from cifarbench.training.loop import autocast_dtype, make_optimizer, split_validation, train
from cifarbench.training.recipes import (
    CPU_BUDGET_SECONDS,
    CPU_EVAL_BATCH,
    CPU_SPEEDRUN,
    CPU_TTA_THRESHOLD,
    budget_compute,
    cpu_speedrun_settings,
    make_config,
)
from cifarbench.training.schedules import lr_factor

SMALL = {"widths": [8, 16, 16]}


def test_whitening_layer_decorrelates_patches() -> None:
    torch.manual_seed(0)
    # Strongly correlated "images": smooth noise, so raw 2x2 patches are far from white.
    images = torch.nn.functional.avg_pool2d(torch.randn(400, 3, 35, 35), 4, stride=1)
    model = create_model("speedrun", widths=[8, 8, 8])
    model.init_whitening(images, eps=0.0)
    out = model.whiten(images) - model.whiten.bias.view(1, -1, 1, 1)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the other 12 channels are the negatives
    cov = half.T @ half / len(half)
    raw = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    raw_cov = raw.T @ raw / len(raw)
    std = raw_cov.diag().sqrt()
    raw_corr = raw_cov / std[:, None] / std[None, :]
    assert (raw_corr - torch.eye(12)).abs().max() > 0.5  # the input was strongly correlated
    torch.testing.assert_close(cov, torch.eye(12), atol=2e-3, rtol=0)
    assert not model.whiten.weight.requires_grad


def test_translate_shifts_each_image_by_its_own_offset() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    shifts = torch.tensor([[0, 0], [1, -2]])
    out = translate(x, shifts, 2)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])
    # Output pixel (i, j) of image 1 is input pixel (i + 1, j - 2), where that lies inside the image.
    torch.testing.assert_close(out[1, 0, :5, 2:], x[1, 0, 1:, :4])


def test_augmenter_ranges_flips_and_determinism() -> None:
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    index = torch.arange(64)
    aug = Augmenter(AugmentConfig(flip=True, alternate_flip=True, translate=2), 64, seed=3, device=torch.device("cpu"))
    aug.start_epoch(1)
    a = aug(x, index)
    assert a.shape == x.shape and a.min() >= x.min() and a.max() <= x.max()  # reflect padding adds no new values
    assert aug.shifts.abs().max() <= 2
    flips1 = aug.flips.clone()
    aug.start_epoch(2)
    assert torch.equal(aug.flips, ~flips1)  # alternating: every image's orientation swaps each epoch
    again = Augmenter(AugmentConfig(flip=True, translate=2), 64, seed=3, device=torch.device("cpu"))
    again.start_epoch(1)
    assert torch.equal(again(x, index), a)  # a function of (seed, epoch) only
    plain = Augmenter(AugmentConfig(), 64, seed=3, device=torch.device("cpu"))
    assert not plain.active


def test_triangle_schedule() -> None:
    s = ScheduleConfig(kind="triangle", start=0.2, peak=0.25, end=0.1)
    assert lr_factor(s, 0.0) == pytest.approx(0.2)
    assert lr_factor(s, 0.25) == pytest.approx(1.0)
    assert lr_factor(s, 1.0) == pytest.approx(0.1)
    assert lr_factor(s, 0.125) == pytest.approx(0.6)
    assert lr_factor(ScheduleConfig(), 0.7) == 1.0


def test_lookahead_pulls_weights_to_the_average() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    la = Lookahead(model, LookaheadConfig(enabled=True))
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.update(model, decay=0.75)
    torch.testing.assert_close(model.weight, torch.full((1, 2), 0.25))
    assert la.decay(0.0) == 0.0 and la.decay(1.0) == pytest.approx(0.95 ** 5)


def test_bias_lr_scale_groups_batchnorm_biases() -> None:
    config = make_config("speedrun", model_kwargs=SMALL)
    opt = make_optimizer(create_model("speedrun", **SMALL), config)
    other, norm = opt.param_groups
    assert norm["lr"] == pytest.approx(other["lr"] * 64)
    assert norm["weight_decay"] == pytest.approx(other["weight_decay"] / 64)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_tta_averages_mirrored_views() -> None:
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(model, x, 1), 0.5 * (model(x) + model(x.flip(-1))))
        assert predict_logits(model, x, 2).shape == (3, 10)


def test_selective_tta_spends_extra_views_only_on_unsure_images() -> None:
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    calls: list[int] = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    with torch.no_grad():
        plain, full = model(x), predict_logits(model, x, 2)
        confidence = torch.softmax(plain, 1).amax(1)
        threshold = float(confidence.median())
        unsure = confidence < threshold
        assert 0 < int(unsure.sum()) < len(x)
        calls.clear()
        chosen = predict_logits(model, x, 2, threshold)
    assert calls == [8] + [int(unsure.sum())] * 5  # one plain pass, then five extra views of the unsure images
    torch.testing.assert_close(chosen[~unsure], plain[~unsure])
    torch.testing.assert_close(chosen[unsure], full[unsure])
    with torch.no_grad():  # each image's result depends on that image alone
        i = int(unsure.nonzero()[0])
        torch.testing.assert_close(predict_logits(model, x[i:i + 1], 2, threshold), chosen[i:i + 1])
        torch.testing.assert_close(predict_logits(model, x, 2, 1.0), full)  # every image unsure: full TTA


def test_precision_auto_picks_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch) -> None:
    config = make_config("speedrun")
    assert config.precision == "auto"
    monkeypatch.setenv("CIFARBENCH_CPU_BF16", "1")  # a CPU with AVX-512 bf16 or AMX
    assert autocast_dtype(config, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(replace(config, deterministic=True), torch.device("cpu")) is None
    monkeypatch.setenv("CIFARBENCH_CPU_BF16", "0")  # an AVX2-only one: bf16 would be many times slower
    assert autocast_dtype(config, torch.device("cpu")) is None
    assert autocast_dtype(config, torch.device("cuda")) == torch.bfloat16  # the dtype choice, no GPU needed
    assert autocast_dtype(config, torch.device("mps")) is None
    assert autocast_dtype(replace(config, precision="fp32"), torch.device("cuda")) is None


def test_fast_recipe_ingredients_are_switches() -> None:
    c = make_config("speedrun", epochs=10)  # a fixed schedule: airbench's settings
    assert (c.batch_size, c.label_smoothing, c.tta, c.whiten, c.lookahead.enabled) == (1024, 0.2, 2, True, True)
    assert c.model_kwargs == {"widths": [64, 256, 256]} and c.optimizer.lr == pytest.approx(1.5)
    assert c.augment.flip and c.augment.translate == 2 and c.schedule.kind == "triangle"
    assert make_config("cnn-bn").recipe == "fast" and make_config("resnet18").recipe == "fast"
    budgeted = make_config("speedrun", budget_seconds=30)
    assert budgeted.budget_seconds == 30 and not budgeted.eval_every_epoch


def test_fast_recipe_on_a_gpu_keeps_airbench_settings() -> None:
    c = make_config("speedrun", device="cuda")  # no GPU needed: make_config never probes the device
    assert make_config("speedrun", device="auto") == c.__class__(**{**vars(c), "device": "auto"})
    assert (c.budget_seconds, c.epochs, c.batch_size, c.eval_batch_size) == (None, 10, 1024, 2000)
    assert (c.optimizer.name, c.model_kwargs, c.tta_threshold) == ("sgd", {"widths": [64, 256, 256]}, 0.0)


def test_fast_recipe_on_cpu_is_budgeted_and_scales_lr_with_batch() -> None:
    airbench = make_config("speedrun", epochs=10)  # a fixed schedule: the GPU recipe's settings
    c = make_config("speedrun", device="cpu")
    row = cpu_speedrun_settings(CPU_BUDGET_SECONDS)
    assert c.budget_seconds == CPU_BUDGET_SECONDS and c.batch_size == row.batch
    assert c.tta == 2 and c.tta_threshold == CPU_TTA_THRESHOLD  # selective TTA: confident images skip the extra views
    assert c.optimizer.lr == pytest.approx(airbench.optimizer.lr * row.batch / airbench.batch_size)  # per example
    assert c.eval_batch_size == CPU_EVAL_BATCH  # small batches stay in cache on a CPU
    assert make_config("speedrun", device="cpu", eval_batch_size=500).eval_batch_size == 500
    assert c.low_res == 0  # progressive resizing lost 0.4 points of validation accuracy here: opt-in only
    fixed = make_config("speedrun", device="cpu", epochs=10)  # no budget: airbench94's own settings, SGD
    assert (fixed.batch_size, fixed.model_kwargs, fixed.optimizer.name) == (1024, {"widths": [64, 256, 256]}, "sgd")
    assert make_config("speedrun", device="cpu", batch_size=512, epochs=2).optimizer.lr == pytest.approx(0.75)
    assert make_config("cnn", batch_size=512).optimizer.lr == 0.01  # the seed recipe is the notebook's, as given


def budgets_around_each_row_boundary() -> list[float]:
    """A budget well inside the first row, then for each finite bound: just under it, on it, just over it."""
    # The rows are keyed by compute; a budget in seconds buys the reference machine's compute per second.
    bounds = [row.up_to / budget_compute(1.0) for row in CPU_SPEEDRUN if math.isfinite(row.up_to)]
    near = [b for bound in bounds for b in (bound - 1.0, bound, math.nextafter(bound, math.inf))]
    return [bounds[0] / 2, *near, bounds[-1] * 10]


def test_cpu_speedrun_rows_are_sorted_and_the_last_covers_any_budget() -> None:
    bounds = [row.up_to for row in CPU_SPEEDRUN]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and bounds[-1] == math.inf
    # Neighbouring rows differ in some setting; otherwise the boundary between them would mean nothing.
    assert all(a[1:] != b[1:] for a, b in itertools.pairwise(CPU_SPEEDRUN))


@pytest.mark.parametrize("budget", budgets_around_each_row_boundary())
def test_cpu_speedrun_settings_pick_the_first_row_that_covers_the_budget(budget: float) -> None:
    pflop = budget_compute(budget)
    (covering,) = [i for i, row in enumerate(CPU_SPEEDRUN)
                   if pflop <= row.up_to and (i == 0 or pflop > CPU_SPEEDRUN[i - 1].up_to)]
    assert cpu_speedrun_settings(budget) == CPU_SPEEDRUN[covering]


@pytest.mark.parametrize("budget", budgets_around_each_row_boundary())
def test_cpu_budget_config_carries_its_rows_settings(budget: float) -> None:
    row = cpu_speedrun_settings(budget)
    airbench = make_config("speedrun", epochs=10)
    c = make_config("speedrun", "fast", budget_seconds=budget, device="cpu")
    assert c.budget_seconds == budget and not c.eval_every_epoch
    assert c.model_kwargs == {"widths": list(row.widths), "act": row.act} and c.batch_size == row.batch
    assert (c.optimizer.name, c.optimizer.muon_lr) == ("muon", row.muon_lr)
    assert c.optimizer.lr == pytest.approx(airbench.optimizer.lr * row.batch / airbench.batch_size)
    create_model("speedrun", **c.model_kwargs)  # each row's settings build the net


@pytest.mark.slow
@pytest.mark.parametrize("model", ["speedrun", "cnn-bn"])
def test_fast_recipe_trains_on_tiny_data(tiny_py: Path, model: str) -> None:
    dataset = load_cifar10(tiny_py, verify=False, download=False)
    kwargs = {"model_kwargs": SMALL} if model == "speedrun" else {}
    config = make_config(model, data_dir=str(tiny_py), verify=False, epochs=3, batch_size=32, device="cpu", **kwargs)
    result = train(config, dataset, torch.device("cpu"), progress=False)
    assert len(result.history) == 3 and result.final is not None and result.final.n == len(dataset.test)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


class FakeClock:
    """A stand-in for time.perf_counter: advances only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The budget module's clock, faked."""
    from cifarbench.training import budget

    fake = FakeClock()
    monkeypatch.setattr(budget, "time", fake)
    return fake


@pytest.mark.slow
def test_budget_is_respected_on_tiny_data(tiny_py: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every clock the run reads is a fake one that advances `step` seconds per optimiser step and not otherwise,
    # so the planned run is exactly predictable, whatever the machine's load.
    step, budget = 0.5, 6.0
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)

    def tick(*_: object) -> None:
        fake.now += step

    dataset = load_cifar10(tiny_py, verify=False, download=False)
    config = make_config("speedrun", data_dir=str(tiny_py), verify=False, batch_size=16, device="cpu",
                         budget_seconds=budget, model_kwargs=SMALL)
    hook = register_optimizer_step_post_hook(tick)
    try:
        result = train(config, dataset, torch.device("cpu"), progress=False)
    finally:
        hook.remove()
    # The plan keeps SAFETY of the budget back; the final evaluation took no (fake) time: the run is the steps
    # that fit in the rest, and its recorded time is theirs.
    assert result.steps == pytest.approx(budget * (1 - StepPlan.SAFETY) / step, abs=1)
    assert result.wall_seconds == pytest.approx(result.steps * step) and result.wall_seconds <= budget
    assert len(result.history) > 1  # several epochs (6 steps each), evaluated only at the end
    assert [h.test_accuracy is None for h in result.history[:-1]] == [True] * (len(result.history) - 1)
    assert result.history[-1].test_accuracy == result.final.accuracy


def test_step_plan_fits_steps_into_time_left(clock: FakeClock) -> None:
    clock.now = 2.0
    plan = StepPlan(10**9, budget=10.0, started=0.0, eval_seconds=lambda: 1.0)
    assert plan.progress(5) < 1e-6  # uncalibrated: the schedule stays at its start
    plan.calibrate(step=20, step_seconds=0.1)
    # 10 s * 0.97 - 2 s spent - 1 s evaluation = 6.7 s left -> 67 more steps (66 with float rounding)
    assert 20 + 66 <= plan.total_steps <= 20 + 67


def test_step_plan_prices_the_final_evaluation_at_the_current_speed(clock: FakeClock) -> None:
    # The evaluation (10 s) was timed when steps took 0.1 s; an epoch later they take 0.2 s (a busy shared
    # machine), so the evaluation is expected to take 20 s too: 100 s * 0.97 - 2 s spent - 20 s = 75 s left,
    # 375 steps at 0.2 s (425 if the evaluation were still priced at 10 s).
    clock.now = 2.0
    plan = StepPlan(10**9, budget=100.0, started=0.0, eval_seconds=lambda: 10.0)
    plan.calibrate(step=20, step_seconds=0.1)
    plan.replan(40, seconds=4.0, steps=20)
    assert 40 + 374 <= plan.total_steps <= 40 + 375
    # Faster than at calibration: the estimate is not shrunk (one fast epoch is no promise).
    plan.replan(60, seconds=1.0, steps=20)
    assert plan.total_steps <= 60 + (97 - 2 - 10) / 0.05


def test_step_plan_prices_a_shrinking_selective_tta_evaluation(clock: FakeClock) -> None:
    # Full TTA timed at 10 s; after an epoch only a fifth of it is expected (confident images skip the extra
    # views): 100 s * 0.97 - 2 s spent - 2 s = 93 s left, 465 steps at 0.2 s (425 at the full price).
    share = iter([0.2])
    clock.now = 2.0
    plan = StepPlan(10**9, budget=100.0, started=0.0, eval_seconds=lambda: 10.0,
                    eval_share=lambda: next(share))
    plan.calibrate(step=20, step_seconds=0.2)
    assert 20 + 424 <= plan.total_steps <= 20 + 425  # until an epoch has passed, the full price
    plan.replan(40, seconds=4.0, steps=20)
    assert 40 + 464 <= plan.total_steps <= 40 + 465


def run_steps(plan: StepPlan, clock: FakeClock, first: int, last: int, seconds: float = 0.1) -> None:
    for step in range(first, last + 1):
        clock.now += seconds
        plan.after_step(step)


def test_step_plan_replans_within_an_epoch(monkeypatch) -> None:
    # A short budget is less than two epochs: waiting for an epoch's end to re-plan would keep pricing the
    # evaluation as it was at the start. Every 1/REPLANS of the schedule the plan asks again.
    from cifarbench.training import budget

    clock = FakeClock()
    monkeypatch.setattr(budget, "time", clock)
    asked: list[float] = []

    def share() -> float:  # the model grows surer: fewer images will need the extra TTA views
        asked.append(0.5 if not asked else 0.3)
        return asked[-1]

    plan = StepPlan(10**9, budget=100.0, started=0.0, eval_seconds=lambda: 10.0, eval_share=share)
    run_steps(plan, clock, 1, 4)  # calibrated at step 4: 0.1 s a step
    # 100 s * 0.97 - 0.4 s spent - 10 s (full TTA) = 86.6 s left: 866 more steps
    assert abs(plan.total_steps - (4 + 866)) <= 1 and asked == []
    step = 4 + plan.total_steps // StepPlan.REPLANS
    run_steps(plan, clock, 5, step - 1)
    assert asked == []  # not yet
    run_steps(plan, clock, step, step)
    # Half the evaluation's price expected now: 5 s more for training, 50 steps.
    assert len(asked) == 1 and abs(plan.total_steps - (4 + 866 + 50)) <= 1
    run_steps(plan, clock, step + 1, step + plan.total_steps // StepPlan.REPLANS)
    assert len(asked) == 2 and abs(plan.total_steps - (4 + 866 + 70)) <= 1


def test_step_plan_counts_paused_time_as_spent_but_not_as_step_time(monkeypatch) -> None:
    from cifarbench.training import budget

    clock = FakeClock()
    monkeypatch.setattr(budget, "time", clock)
    plan = StepPlan(10**9, budget=100.0, started=0.0, eval_seconds=lambda: 0.0)
    run_steps(plan, clock, 1, 4)
    assert abs(plan.total_steps - (4 + 966)) <= 1  # 97 s - 0.4 s at 0.1 s a step
    every = plan.total_steps // StepPlan.REPLANS
    run_steps(plan, clock, 5, 10)
    plan.pause()
    clock.now += 20.0  # an evaluation between epochs
    plan.resume()
    run_steps(plan, clock, 11, 4 + every)
    # Re-planned at 0.1 s a step (not 0.1 s plus the 20 s spread over the stretch), with 20 s less to spend.
    assert abs(plan.total_steps - (4 + every + (97 - clock.now) / 0.1)) <= 1


def test_step_plan_counts_cheap_small_image_steps(clock: FakeClock) -> None:
    # First half of the steps on small images at half the cost: 6.7 s left after 20 steps (as above), a
    # small step 0.05 s and a full one 0.1 s (from the guessed ratio, until a full step is measured).
    clock.now = 2.0
    plan = StepPlan(10**9, budget=10.0, started=0.0, eval_seconds=lambda: 1.0, low_fraction=0.5, low_cost=0.5)
    assert plan.is_low(0)  # uncalibrated runs start small
    plan.calibrate(step=20, step_seconds=0.05, low=True)
    n = plan.total_steps
    cost = lambda total: (math.ceil(total / 2) - 20) * 0.05 + (total - math.ceil(total / 2)) * 0.1  # noqa: E731
    assert cost(n) <= 6.7 < cost(n + 2)  # the longest schedule that fits: 102 steps, not 87 at full price
    assert 100 <= n <= 102
    assert plan.is_low(n // 2 - 1) and not plan.is_low(n // 2 + 1)
    # An epoch of full-size steps measured slower than guessed: the plan shrinks to fit.
    plan.replan(60, seconds=4.0, steps=20, low_steps=0)
    assert plan.total_steps < n


def test_progressive_resizing_trains_the_first_half_on_small_images(tiny_py: Path, monkeypatch) -> None:
    import torch.nn.functional as F

    dataset = load_cifar10(tiny_py, verify=False, download=False)
    sizes: list[tuple[int, int]] = []
    interpolate = F.interpolate

    def spy(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        sizes.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(F, "interpolate", spy)
    config = make_config("speedrun", data_dir=str(tiny_py), verify=False, epochs=2, batch_size=16, device="cpu",
                         model_kwargs=SMALL, low_res=20)
    result = train(config, dataset, torch.device("cpu"), progress=False)
    assert result.steps % 2 == 0 and sizes == [(20, 20)] * (result.steps // 2)
    # The run's compute is counted from these: every training image, the small ones apart.
    assert result.position.images == 16 * result.steps and result.position.low_images == 16 * (result.steps // 2)
    assert result.final is not None and result.final.n == len(dataset.test)  # evaluated at full size


def test_validation_split_is_fixed_disjoint_and_used(tiny_py: Path) -> None:
    dataset = load_cifar10(tiny_py, verify=False, download=False)
    kept, held = split_validation(dataset.train, 30)
    assert len(kept) == len(dataset.train) - 30 and len(held) == 30
    again = split_validation(dataset.train, 30)[1]
    assert torch.equal(torch.from_numpy(held.images), torch.from_numpy(again.images))
    config = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=2, batch_size=10, val_split=30,
                         device="cpu")
    result = train(config, dataset, torch.device("cpu"), progress=False)
    assert all(h.val_accuracy is not None for h in result.history)
