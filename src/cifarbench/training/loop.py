"""One short training loop: setup, then per epoch: shuffle, step over batches, evaluate; then a final evaluation.

Everything a recipe switches (augmentation, schedule, lookahead, whitening, label smoothing, precision, budget)
is read from the `TrainConfig`; with all of them off this is exactly the notebook's loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.data.augment import Augmenter
from cifarbench.data.dataset import ImageDataset, Split
from cifarbench.data.loader import DeviceSplit
from cifarbench.device import keep_cpu_memory, kernel_choice
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.metrics import TTA_VIEWS, EvalResult, confidence, evaluate, predict_logits, sum_dtype
from cifarbench.models import create_model
from cifarbench.training import distributed as ddp
from cifarbench.training.budget import StepPlan
from cifarbench.training.lookahead import Lookahead
from cifarbench.training.muon import MuonSGD
from cifarbench.training.schedules import lr_factor


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    """Mean training loss over the epoch's examples."""
    test_loss: float | None
    test_accuracy: float | None
    """None for epochs that were not evaluated (budgeted runs evaluate only at the end)."""
    seconds: float
    """Cumulative training seconds at the end of this epoch (evaluation excluded), for time-to-accuracy."""
    eval_seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    """On the held-out validation split (`val_split`), when there is one."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoopPosition:
    """Where the loop is, in plain values: enough, with the weights, optimiser and RNG states, to resume a run
    bitwise (the data order and augmentation of an epoch depend only on the seed and the epoch)."""

    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` done; the epoch is finished when `in_epoch` is False."""
    in_epoch: bool = False
    step: int = 0
    total_steps: int = 0
    elapsed: float = 0.0
    loss_sum: float = 0.0
    seen: int = 0
    images: int = 0
    """Training images over the whole run, all ranks together (what the run's compute is counted from)."""
    low_images: int = 0
    """Of those, the ones trained at the reduced resolution (`low_res`)."""


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[EpochMetrics] = field(default_factory=list)
    final: EvalResult | None = None
    position: LoopPosition = field(default_factory=LoopPosition)
    lookahead: Lookahead | None = None
    wall_seconds: float = 0.0
    """Everything from model creation to the end of the final evaluation (what a budget limits)."""

    @property
    def steps(self) -> int:
        return self.position.step

    @property
    def train_seconds(self) -> float:
        return self.history[-1].seconds if self.history else 0.0

    def state(self) -> dict:
        """Everything a resume needs, as tensors and plain values (loads with weights_only=True)."""
        return {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lookahead": self.lookahead.average if self.lookahead else None,
                "position": asdict(self.position), "history": [h.to_dict() for h in self.history],
                "rng": rng_states()}


def rng_states() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, as weights_only-loadable values."""
    import random

    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    import random

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _StopAtStepBoundary:
    """While training, Ctrl-C asks the loop to stop after the current step (so the saved state is consistent);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopAtStepBoundary":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the config asks for on `device`, or None for plain fp32."""
    if config.precision == "auto":
        return torch.bfloat16 if device.type in ("cpu", "cuda") else None
    return torch.bfloat16 if config.precision == "bf16" else None


def check_settings(config: TrainConfig, device: torch.device) -> None:
    """Refuse a combination `device` cannot honour (callers check before they write anything)."""
    if config.deterministic and device.type == "cpu" and autocast_dtype(config, device) is not None:
        # Measured: speedrun in bf16 with oneDNN off still differed between 1 and 2 threads, and ran 30x slower.
        raise CifarbenchError("--deterministic on a CPU needs --precision fp32 (bf16 convolutions have no "
                              "thread-independent kernel)")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD; BatchNorm biases get `bias_lr_scale` x the learning rate and / that the decay (same net decay).
    With muon, the convolution filters form a group of their own that takes Muon steps."""
    o = config.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.dim() == 4] if o.name == "muon" else []
    norm = [p for p in trainable if id(p) in norm_ids]
    taken = norm_ids | {id(p) for p in filters}
    other = [p for p in trainable if id(p) not in taken]
    groups = [{"params": other, "lr": o.lr, "weight_decay": o.weight_decay}]
    if norm:
        groups.append({"params": norm, "lr": o.lr * o.bias_lr_scale, "weight_decay": o.weight_decay / o.bias_lr_scale})
    if filters:
        groups.append({"params": filters, "lr": o.muon_lr, "momentum": o.muon_momentum, "muon": True})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    if o.name == "muon":
        return MuonSGD(groups, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_validation(train: Split, size: int) -> tuple[Split, Split | None]:
    """Hold out `size` training examples, chosen by a fixed shuffle (the same for every seed, so runs of a
    sweep are compared on one validation set)."""
    if size <= 0:
        return train, None
    if size >= len(train):
        raise CifarbenchError(f"--val-split {size} leaves no training data ({len(train)} examples)")
    order = np.random.default_rng(0).permutation(len(train))
    keep, held = np.sort(order[:-size]), np.sort(order[-size:])
    return Split(train.images[keep], train.labels[keep]), Split(train.images[held], train.labels[held])


def _sync(device: torch.device) -> None:
    # Wall-clock timing of asynchronous devices is only honest after a sync.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_part(split: Split | None, world: ddp.DistEnv) -> Split | None:
    """This rank's contiguous share of an evaluation split (all of it in a single process)."""
    if split is None or not world.enabled:
        return split
    part = np.array_split(np.arange(len(split)), world.world_size)[world.rank]
    return Split(split.images[part], split.labels[part])


def _merge_ranks(ev: EvalResult, world: ddp.DistEnv, device: torch.device) -> EvalResult:
    """Combine the ranks' evaluations of their shares into the whole split's."""
    if not world.enabled:
        return ev
    confusion = ddp.all_sum(torch.tensor(ev.confusion, dtype=torch.int64, device=device), world)
    loss_sum = ddp.all_sum(torch.tensor([ev.loss * ev.n], dtype=sum_dtype(device), device=device), world).item()
    return EvalResult.from_counts(confusion, loss_sum)


def build_model(config: TrainConfig, dataset: ImageDataset, device: torch.device,
                whiten_images: torch.Tensor | None = None) -> nn.Module:
    """Create the model, initialise its whitening layer from training images if asked, set its layout."""
    model = create_model(config.model, num_classes=len(dataset.classes), in_shape=dataset.image_shape,
                         **config.model_kwargs).to(device)
    if config.whiten and hasattr(model, "init_whitening") and whiten_images is not None:
        model.init_whitening(whiten_images)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train(config: TrainConfig, dataset: ImageDataset, device: torch.device, *,
          on_epoch: Callable[[EpochMetrics, TrainResult], None] | None = None,
          on_interrupt: Callable[[TrainResult], None] | None = None,
          progress: bool | None = None, resume: dict | None = None,
          world: ddp.DistEnv = ddp.SINGLE) -> TrainResult:
    """Train `config.model` on the training set; evaluate after every epoch (if configured) and at the end.

    `resume` is a `TrainResult.state()` saved earlier: training continues from that exact point. On Ctrl-C the
    loop stops after the current step, calls `on_interrupt` (to save the state) and raises KeyboardInterrupt.
    Under torchrun (`world`), each rank trains on its slice of every global batch and evaluates its slice of
    the test set; the sums are combined so every example counts exactly once.
    """
    from tqdm.auto import tqdm  # imported here: a library import should not pay for the progress bar

    started = time.perf_counter()
    check_settings(config, device)
    amp = autocast_dtype(config, device)
    if device.type == "cpu":
        keep_cpu_memory()
    torch.manual_seed(config.seed)
    train_split, val_split = split_validation(dataset.train, config.val_split)
    mean, std, cl = config.data.mean, config.data.std, config.channels_last
    train_data = DeviceSplit(train_split, device, mean, std, cl)
    test_data = DeviceSplit(_rank_part(dataset.test, world), device, mean, std, cl)
    val_data = DeviceSplit(_rank_part(val_split, world), device, mean, std, cl) if val_split is not None else None
    whiten_images = train_data.normalise(train_data.images[:5000]) if config.whiten else None
    model = build_model(config, dataset, device, whiten_images)
    forward: nn.Module = model
    if world.enabled:
        if config.sync_bn:
            if device.type != "cuda":
                raise CifarbenchError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = torch.compile(forward) if config.compile else forward
    optimizer = make_optimizer(model, config)
    augment = Augmenter(config.augment, len(train_data), config.seed, device)
    classes = len(dataset.classes)
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)

    def run_eval(data: DeviceSplit, tta: int = 0) -> EvalResult:
        # The plain model, not the DDP wrapper: evaluation needs no gradient sync, and ranks see different data.
        ev = evaluate(model, data, num_classes=classes, batch_size=config.eval_batch_size, autocast_dtype=amp, tta=tta,
                      tta_threshold=config.tta_threshold)
        return _merge_ranks(ev, world, device)

    def final_eval_estimate() -> float:
        """Seconds the final evaluation will take: one timed batch, scaled."""
        x = test_data.normalise(test_data.images[:config.eval_batch_size])
        model.eval()  # the plain model: no DDP collectives in a measurement
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            predict_logits(model, x, 0)  # the first call at a new shape also builds its kernels: not timed
            _sync(device)
            t = time.perf_counter()
            predict_logits(model, x, 0)
            _sync(device)
        model.train()
        return (time.perf_counter() - t) * math.ceil(len(test_data) / len(x)) * TTA_VIEWS[config.tta]

    def final_eval_share() -> float:
        """With selective TTA, the share of a full TTA evaluation's cost the final one should need now: the plain
        pass, plus the extra views for the share of images the model is unsure of. That share is measured on
        un-augmented training images (never the test set); the model has trained on them, so it is less often
        unsure of them than of new images (after 120 s: 27-28% below 0.6 against 33% of held-out images),
        hence the margin of 1.5x."""
        views = TTA_VIEWS[config.tta]
        if views == 1 or config.tta_threshold <= 0:
            return 1.0
        x = train_data.normalise(train_data.images[:config.eval_batch_size])
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            top = confidence(model(x))
        model.train()
        unsure = min(1.0, 1.5 * float((top < config.tta_threshold).float().mean()))
        return (1 + unsure * (views - 1)) / views

    side = min(dataset.image_shape[1:])
    low_res = config.low_res if 0 < config.low_res < side and config.low_res_fraction > 0 else 0
    low_fraction = config.low_res_fraction if low_res else 0.0
    steps_per_epoch = (len(train_data) // config.batch_size if config.drop_last and len(train_data) >= config.batch_size
                       else math.ceil(len(train_data) / config.batch_size))
    plan = StepPlan(10**9 if config.budget_seconds else config.epochs * steps_per_epoch, config.budget_seconds,
                    started, final_eval_estimate, lambda: _sync(device),
                    # Ranks must agree on the step count: rank 0's plan rules, and no rank stops on its own.
                    guard_every_step=device.type == "cpu" and not world.enabled,
                    agree=lambda steps: ddp.broadcast_int(steps, world, device),
                    # A small step costs about its share of pixels, plus a fixed part (measured: 20 px ~0.44
                    # of a 32 px step); only a first guess, replaced by measured times as the run goes.
                    low_fraction=low_fraction, low_cost=0.1 + 0.9 * (low_res / side) ** 2,
                    eval_share=final_eval_share)
    result = TrainResult(model, optimizer)
    pos = result.position
    pos.total_steps = plan.total_steps
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        for g in optimizer.param_groups:  # base rates are the config's, not the schedule's last value
            g["lr"] = g["base_lr"]
        if resume["lookahead"] is not None:
            result.lookahead = Lookahead(model, config.lookahead)
            for name, avg in resume["lookahead"].items():
                result.lookahead.average[name].copy_(avg)
        result.position = pos = LoopPosition(**resume["position"])
        result.history = [EpochMetrics(**h) for h in resume["history"]]
        # A resumed run keeps the schedule it had planned (and with it where the small images end).
        plan = StepPlan(pos.total_steps, low_fraction=low_fraction)
        set_rng_states(resume["rng"])
    with kernel_choice(config.deterministic), _StopAtStepBoundary() as stop:
        while pos.step < plan.total_steps:
            if not pos.in_epoch:
                pos.epoch, pos.batch, pos.in_epoch, pos.loss_sum, pos.seen = pos.epoch + 1, 0, True, 0.0, 0
            model.train()
            augment.start_epoch(pos.epoch)
            _sync(device)
            epoch_start = time.perf_counter()
            plan.resume()
            loss_sum = torch.tensor(pos.loss_sum, dtype=sum_dtype(device), device=device)
            batches = train_data.batch_indices(config.batch_size, generator=epoch_generator(config.seed, pos.epoch),
                                               drop_last=config.drop_last)
            show = world.is_main and (progress is None or progress)
            bar = tqdm(batches, total=steps_per_epoch, initial=pos.batch, desc=f"{config.model} epoch {pos.epoch}",
                       leave=False, disable=None if show else True, unit="batch")
            for i, idx in enumerate(bar):
                if i < pos.batch:
                    continue  # done before the interruption this run resumes from
                if pos.step >= plan.total_steps:
                    break
                progress_now = plan.progress(pos.step)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(config.schedule, progress_now)
                if whiten_bias is not None:
                    whiten_bias.requires_grad_(progress_now < config.whiten_bias_fraction)
                images = len(idx)  # the global batch (a tensor: training batches are always shuffled)
                idx = ddp.shard(idx, world, len(train_data))
                x = train_data.normalise(train_data.images[idx])
                x = augment(x, idx) if augment.active else x
                low = plan.is_low(pos.step)
                if low:
                    x = F.interpolate(x, size=(low_res, low_res), mode="bilinear", antialias=True)
                y = train_data.labels[idx]
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = F.cross_entropy(forward(x), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().to(loss_sum.dtype) * len(y)
                pos.step, pos.batch, pos.seen = pos.step + 1, i + 1, pos.seen + len(y)
                pos.images += images
                pos.low_images += images if low else 0
                la = config.lookahead
                if la.enabled and progress_now >= la.start and pos.step % la.every == 0:
                    if result.lookahead is None:
                        result.lookahead = Lookahead(model, la)
                    else:
                        result.lookahead.update(model, result.lookahead.decay(plan.progress(pos.step)))
                plan.after_step(pos.step, low)
                pos.total_steps = plan.total_steps
                if stop.requested:
                    bar.close()
                    pos.loss_sum = float(loss_sum)
                    pos.elapsed += time.perf_counter() - epoch_start
                    if on_interrupt:
                        on_interrupt(result)
                    raise KeyboardInterrupt
            bar.close()
            if result.lookahead is not None:
                result.lookahead.update(model, 1.0)  # end every epoch on the averaged weights
            plan.pause()  # what follows (evaluations) is not step time
            _sync(device)
            pos.elapsed += time.perf_counter() - epoch_start
            seen = ddp.all_sum(torch.tensor([pos.seen], dtype=torch.int64, device=device), world)
            pos.in_epoch, pos.loss_sum = False, float(ddp.all_sum(loss_sum, world))
            pos.seen = int(seen.item())
            last = pos.step >= plan.total_steps
            eval_start = time.perf_counter()
            val = run_eval(val_data) if val_data is not None else None
            # The final evaluation uses the configured test-time augmentation; per-epoch ones are plain.
            test = run_eval(test_data, config.tta) if last else (run_eval(test_data) if config.eval_every_epoch else None)
            metrics = EpochMetrics(pos.epoch, pos.loss_sum / max(pos.seen, 1),
                                   test.loss if test else None, test.accuracy if test else None,
                                   pos.elapsed, time.perf_counter() - eval_start,
                                   val.loss if val else None, val.accuracy if val else None)
            result.history.append(metrics)
            if test is not None:
                result.final = test
            result.wall_seconds = time.perf_counter() - started
            if on_epoch:
                on_epoch(metrics, result)
    return result
